"""How many general-ability items does a model need before its accuracy separates from chance?

Scores each benchmark once on its largest requested size (the `eval` preset's scoring, with dotted
overrides), then reads the smaller sizes as prefixes of the same seeded subsample (`subsample` keeps the
first int(f·N) of one shuffle, so the first k items of a larger subsample are the k-item subsample).
Prints, per benchmark and size: accuracy, lm-eval's standard error, (accuracy − chance) / stderr, and
the scoring time scaled to k items.

    python -m scripts.utility_sizing <model dir> mmlu=100,200,400 triviaqa=50,100 [--eval fast] \
        [--set utility.mmlu_format=continuation ...]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from benchmarks.utility import LOADERS, subsample
from unierase.evaluation.config import EvalConfig
from unierase.evaluation.utility import (
    ACCURACIES,
    CHANCE,
    RECORD_FILE,
    aggregate_utility_from_records,
    evaluate_utility,
)
from unierase.io import read_jsonl
from unierase.models import ModelConfig, load_saved

ROOT = Path(__file__).resolve().parents[1]


def _eval_config(preset: str, overrides: list[str]) -> EvalConfig:
    node = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(ROOT / "conf" / "eval" / f"{preset}.yaml"),
                           OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("sizes", nargs="+", help="bench=k1,k2,... (item counts)")
    parser.add_argument("--eval", default="fast", help="conf/eval preset whose scoring is used")
    parser.add_argument("--set", nargs="*", default=[], help="dotted eval overrides, e.g. utility.mmlu_format=letters")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = _eval_config(args.eval, args.set)
    model_cfg = ModelConfig()  # the SmolLM2 chat format and bf16 autocast of the demo
    model = load_saved(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    utility_dir = Path(os.environ.get("UNIERASE_DATA", ROOT.parent / "shared" / "data")) / "utility"
    refusals = (utility_dir.parent / "tofu" / "idontknow.txt").read_text(encoding="utf-8").splitlines()
    print("| benchmark | items | metric | accuracy | stderr | (acc − chance)/stderr | seconds (scaled) |\n"
          "|---|---:|---|---:|---:|---:|---:|")
    for spec in args.sizes:
        bench, _, counts = spec.partition("=")
        sizes = sorted(int(k) for k in counts.split(","))
        items = LOADERS[bench](utility_dir)
        chosen = subsample(items, 1.0, cfg.seed)[: sizes[-1]]
        assert chosen[: sizes[0]] == subsample(items, (sizes[0] + 0.5) / len(items), cfg.seed)  # prefix property
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            evaluate_utility(model, tokenizer, {bench: chosen}, cfg, model_cfg, Path(out), refusals)
            seconds = time.perf_counter() - start
            records = read_jsonl(Path(out) / RECORD_FILE.format(bench=bench))
        for k in sizes:
            metrics = aggregate_utility_from_records({bench: records[:k]})
            for name in ACCURACIES.values():
                acc, se = metrics.get(f"ut.{bench}.{name}"), metrics.get(f"ut.{bench}.{name}_stderr")
                if acc is None:
                    continue
                z = f"{(acc - CHANCE[bench]) / se:.2f}" if se else "–"
                print(f"| {bench} | {k} | {name} | {acc:.3f} | {se if se is None else f'{se:.3f}'} | {z} "
                      f"| {seconds * k / sizes[-1]:.0f} |")


if __name__ == "__main__":
    main()
