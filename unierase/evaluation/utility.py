"""General ability (`ut.*`) on the items `benchmarks/utility.py` loaded (docs/metrics.md, "ut: general ability").

- MMLU, `mmlu_protocol=loglik` (default): no generation; the log-probability of each choice after
  lm-evaluation-harness's 0-shot prompt, raw text (`acc`, `acc_norm`). `generate`: the paper's protocol.
- TriviaQA, GSM8K, HumanEval (and MMLU `generate`): a greedy answer with the chat template, scored by the
  protocol's rule (`acc`) and by a lenient extraction (`acc_lenient`).

Each accuracy comes with lm-eval's standard error (`<key>_stderr`). Each benchmark writes
`utility.<bench>.jsonl` (one record per item); the returned values are recomputed from those files by
`aggregate_utility_from_records`.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from unierase.chat import chat_prompt
from unierase.evaluation import utility_metrics as um
from unierase.evaluation.config import EvalConfig, UtilityConfig
from unierase.evaluation.engine import RefusalDetector, generate, load_encoder
from unierase.evaluation.loglik import continuation_logprobs
from unierase.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from unierase.models import ModelConfig, autocast_dtype
from unierase.progress import Progress
from unierase.records import UtilityItem

RECORD_FILE = "utility.{bench}.jsonl"
SUMMARY_FILE = "utility.json"
# What guessing scores: 1 in 4 on MMLU; an open answer or a program is not guessed.
CHANCE = {"mmlu": 0.25, "triviaqa": 0.0, "gsm8k": 0.0, "humaneval": 0.0}
# Record field -> metric suffix: the protocol's rule, lm-eval's length-normalised choice, the lenient extraction.
ACCURACIES = {"correct": "acc", "correct_norm": "acc_norm", "correct_lenient": "acc_lenient"}
LETTERS = ("A", "B", "C", "D")


# ------------------------------------------------------------------------------ MMLU, log-likelihood


def mmlu_request(gold: Mapping[str, Any], fmt: str) -> tuple[str, list[str]]:
    """(context, choices) of lm-eval's 0-shot MMLU tasks: `mmlu` (letters) or `mmlu_continuation`.
    Each choice is scored as the continuation " <choice>" (lm-eval's target delimiter)."""
    subject = gold["subject"].replace("_", " ")
    question, options = gold["question"].strip(), gold["choices"]
    if fmt == "letters":
        listed = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, options))
        return (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                f"{question}{listed}\nAnswer:", list(LETTERS))
    if fmt == "continuation":
        return (f"The following are questions (with answers) about {subject}.\n\nQuestion: {question}\nAnswer:",
                list(options))
    raise ValueError(f"unknown MMLU format {fmt!r} (letters | continuation)")


def _mmlu_loglik_records(model: PreTrainedModel, tokenizer: Any, items: Sequence[UtilityItem], cfg: EvalConfig,
                         model_cfg: ModelConfig) -> list[dict[str, Any]]:
    ucfg = cfg.utility
    contexts, continuations, requests = [], [], []
    for item in items:
        context, choices = mmlu_request(item.gold, ucfg.mmlu_format)
        if ucfg.loglik_chat_template:
            # The assistant turn starts the answer itself, so no delimiter space before the choice.
            context, delimiter = chat_prompt(tokenizer, context, model_cfg), ""
        else:
            delimiter = " "
        requests.append(choices)
        contexts += [context] * len(choices)
        continuations += [delimiter + choice for choice in choices]
    scores = continuation_logprobs(model, tokenizer, contexts, continuations, cfg.batch_size,
                                   autocast_dtype=autocast_dtype(model_cfg))
    records, start = [], 0
    for item, choices in zip(items, requests):
        own = scores[start : start + len(choices)]
        start += len(choices)
        gold = LETTERS.index(item.gold["answer"])
        pred, pred_norm = um.choice_predictions([s.logprob for s in own], choices)
        records.append({
            "uid": item.uid, "choices": choices, "logprobs": [s.logprob for s in own],
            "n_tokens_choice": [s.n_tokens for s in own], "is_greedy": [s.is_greedy for s in own],
            "pred": LETTERS[pred], "pred_norm": LETTERS[pred_norm],
            "correct": pred == gold, "correct_norm": pred_norm == gold, "gold": item.gold,
        })
    return records


# ------------------------------------------------------------------------------ generation


def _score(bench: str, item: UtilityItem, response: str, cfg: UtilityConfig) -> dict[str, Any]:
    """Per-item correctness under the protocol's rule and the lenient extraction (and HumanEval's code)."""
    gold = item.gold
    if bench == "mmlu":
        return {"correct": um.mmlu_correct(response, gold["answer"]),
                "correct_lenient": um.mmlu_extract_lenient(response) == gold["answer"]}
    if bench == "triviaqa":
        return {"correct": um.triviaqa_correct(response, gold["aliases"], match=cfg.triviaqa_match,
                                              answer=gold["answer"]),
                "correct_lenient": um.triviaqa_correct_lenient(response, gold["aliases"])}
    if bench == "gsm8k":
        return {"correct": um.gsm8k_correct(response, gold["answer"], parse=cfg.gsm8k_parse),
                "correct_lenient": um.gsm8k_correct_lenient(response, gold["answer"])}
    entry = gold["entry_point"]

    def passes(code: str | None) -> bool:
        return code is not None and um.humaneval_passes(code, gold["test"], entry, cfg.humaneval_timeout_s)

    code = um.humaneval_extract(response)
    if code is not None and cfg.humaneval_prepend_prompt and f"def {entry}" not in code:
        code = gold["prompt"] + code
    lenient = um.humaneval_extract_lenient(response)
    if f"def {entry}" not in lenient:
        lenient = gold["prompt"] + lenient
    passed = passes(code)
    # The sandbox costs a process per run: the lenient code runs only where it differs.
    return {"code": code, "correct": passed, "code_lenient": lenient,
            "correct_lenient": passed if lenient == code else passes(lenient)}


def _generation_records(model: PreTrainedModel, tokenizer: Any, bench: str, items: Sequence[UtilityItem],
                        cfg: EvalConfig, model_cfg: ModelConfig,
                        detector: RefusalDetector | None) -> list[dict[str, Any]]:
    prompts = [chat_prompt(tokenizer, item.message, model_cfg) for item in items]
    responses = generate(model, tokenizer, prompts, cfg.utility.max_new_tokens, cfg.batch_size,
                         autocast_dtype=autocast_dtype(model_cfg), desc=f"{bench} generation ({len(items)} items)")
    refusal = detector.score(responses) if detector else [(None, None)] * len(responses)
    return [
        {"uid": item.uid, "response": response, **_score(bench, item, response, cfg.utility),
         "refusal": flag, "refusal_max_cosine": max_cos, "n_tokens": len(tokenizer.tokenize(response)),
         "gold": {k: v for k, v in item.gold.items() if k != "test"}}
        for item, response, (flag, max_cos) in zip(items, responses, refusal)
    ]


# ------------------------------------------------------------------------------ aggregation


def aggregate_utility_from_records(records_by_bench: Mapping[str, Sequence[dict]]) -> dict[str, float | None]:
    """ut.<bench>.{n, acc, acc_stderr, refusal_rate, mean_len}, plus acc_norm (log-likelihood MMLU) or
    acc_lenient (generated answers) with their stderr; null where a benchmark has no items, or its records
    lack the field (refusal and length of log-likelihood MMLU, which writes no response)."""
    def mean(values: list[Any]) -> float | None:
        if not values or any(v is None for v in values):
            return None
        return float(np.mean(np.asarray(values, dtype=float)))

    out: dict[str, float | None] = {}
    for bench, rows in records_by_bench.items():
        out[f"ut.{bench}.n"] = len(rows)
        for field, name in ACCURACIES.items():
            if field == "correct" or (rows and field in rows[0]):
                values = [r[field] for r in rows]
                out[f"ut.{bench}.{name}"] = mean(values)
                out[f"ut.{bench}.{name}_stderr"] = um.mean_stderr(values)
        out[f"ut.{bench}.refusal_rate"] = mean([r.get("refusal") for r in rows])
        out[f"ut.{bench}.mean_len"] = mean([r.get("n_tokens") for r in rows])
    return out


def compare_with_chance(metrics: Mapping[str, float | None]) -> dict[str, float | None]:
    """(accuracy − chance) / stderr per accuracy key: above 2, the benchmark separates the model from guessing."""
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        bench, _, name = key.removeprefix("ut.").partition(".")
        if name in ACCURACIES.values():
            stderr = metrics.get(f"{key}_stderr")
            out[key] = None if value is None or not stderr else (value - CHANCE[bench]) / stderr
    return out


def evaluate_utility(
    model: PreTrainedModel,
    tokenizer: Any,
    items: Mapping[str, Sequence[UtilityItem]],
    cfg: EvalConfig,
    model_cfg: ModelConfig,
    out_dir: Path,
    refusals: Sequence[str],
) -> dict[str, float | None]:
    """Score `items` (benchmark -> items); write `utility.<bench>.jsonl` and `utility.json`."""
    out_dir = Path(out_dir)
    ucfg = cfg.utility
    loglik_mmlu = "mmlu" in items and ucfg.mmlu_protocol == "loglik"
    notes: dict[str, Any] = {"items": {b: len(v) for b, v in items.items()}, "seconds": {}, "null_reasons": {},
                             "chance": CHANCE}
    if "triviaqa" in items:
        notes["triviaqa"] = "closed-book subset; the reference used a reading-comprehension variant"
    if loglik_mmlu:
        notes["mmlu"] = (f"log-likelihood, lm-eval `{'mmlu' if ucfg.mmlu_format == 'letters' else 'mmlu_continuation'}`"
                         f" 0-shot, {'chat template' if ucfg.loglik_chat_template else 'raw text'}")
        notes["null_reasons"]["ut.mmlu.refusal_rate"] = notes["null_reasons"]["ut.mmlu.mean_len"] = \
            "log-likelihood scoring generates no response"
    detector = None
    if any(bench != "mmlu" or not loglik_mmlu for bench in items):  # some benchmark writes responses
        encoder, reason = load_encoder(cfg.encoder)
        detector = RefusalDetector(encoder, refusals, cfg.refusal_threshold) if encoder and refusals else None
        if detector is None:
            notes["null_reasons"]["refusal_rate"] = reason or "no refusal pool given"
    bar = Progress(len(items), "general ability", "benchmark")
    for bench, bench_items in items.items():
        start = time.perf_counter()  # per-set cost, for sizing the subsets (conf/eval/fast.yaml)
        if bench == "mmlu" and loglik_mmlu:
            records = _mmlu_loglik_records(model, tokenizer, bench_items, cfg, model_cfg)
        else:
            records = _generation_records(model, tokenizer, bench, bench_items, cfg, model_cfg, detector)
        atomic_write_jsonl(out_dir / RECORD_FILE.format(bench=bench), records)
        notes["seconds"][bench] = round(time.perf_counter() - start, 1)
        bar.step(note=f"{bench}: {len(records)} items, {notes['seconds'][bench]} s")
    bar.close()
    metrics = aggregate_utility_from_records(
        {b: read_jsonl(out_dir / RECORD_FILE.format(bench=b)) for b in items})
    notes["z_vs_chance"] = compare_with_chance(metrics)
    atomic_write_json(out_dir / SUMMARY_FILE, {"metrics": metrics, "notes": notes, "config": dataclasses.asdict(cfg)})
    return metrics
