"""General ability (`ut.*`): greedy answers to the items `benchmarks/utility.py` loaded (MMLU, TriviaQA,
GSM8K, HumanEval), with the chat template, scored by `metrics.py`.

Each benchmark writes `utility.<bench>.jsonl` (one record per item: response, correctness, refusal,
length); the returned values are recomputed from those files by `aggregate_utility_from_records`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from unierase.evaluation import metrics as m
from unierase.evaluation.config import EvalConfig, UtilityConfig
from unierase.evaluation.engine import RefusalDetector, generate, load_encoder
from unierase.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from unierase.models import ModelConfig, autocast_dtype, chat_prompt
from unierase.records import UtilityItem

RECORD_FILE = "utility.{bench}.jsonl"
SUMMARY_FILE = "utility.json"


# ------------------------------------------------------------------------------ scoring


def _score(bench: str, item: UtilityItem, response: str, cfg: UtilityConfig) -> dict[str, Any]:
    """Per-item correctness (and HumanEval's extracted code)."""
    gold = item.gold
    if bench == "mmlu":
        return {"correct": m.mmlu_correct(response, gold["answer"])}
    if bench == "triviaqa":
        return {"correct": m.triviaqa_correct(response, gold["aliases"], match=cfg.triviaqa_match,
                                              answer=gold["answer"])}
    if bench == "gsm8k":
        return {"correct": m.gsm8k_correct(response, gold["answer"], parse=cfg.gsm8k_parse)}
    code = m.humaneval_extract(response)
    if code is not None and cfg.humaneval_prepend_prompt and f"def {gold['entry_point']}" not in code:
        code = gold["prompt"] + code
    passed = code is not None and m.humaneval_passes(code, gold["test"], gold["entry_point"], cfg.humaneval_timeout_s)
    return {"code": code, "correct": passed}


def aggregate_utility_from_records(records_by_bench: Mapping[str, Sequence[dict]]) -> dict[str, float | None]:
    """ut.<bench>.{acc, refusal_rate, mean_len}; null where a benchmark has no items or no refusal scores."""
    def mean(values: list[Any]) -> float | None:
        if not values or any(v is None for v in values):
            return None
        return float(np.mean(np.asarray(values, dtype=float)))

    out: dict[str, float | None] = {}
    for bench, rows in records_by_bench.items():
        out[f"ut.{bench}.acc"] = mean([r["correct"] for r in rows])
        out[f"ut.{bench}.refusal_rate"] = mean([r.get("refusal") for r in rows])
        out[f"ut.{bench}.mean_len"] = mean([r["n_tokens"] for r in rows])
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
    """Answer and score `items` (benchmark -> items); write `utility.<bench>.jsonl` and `utility.json`."""
    out_dir = Path(out_dir)
    notes: dict[str, Any] = {"items": {b: len(v) for b, v in items.items()}, "null_reasons": {}}
    if "triviaqa" in items:
        notes["triviaqa"] = "closed-book subset; the reference used a reading-comprehension variant"
    encoder, reason = load_encoder(cfg.encoder)
    detector = RefusalDetector(encoder, refusals, cfg.refusal_threshold) if encoder and refusals else None
    if detector is None:
        notes["null_reasons"]["refusal_rate"] = reason or "no refusal pool given"
    for bench, bench_items in items.items():
        prompts = [chat_prompt(tokenizer, item.message, model_cfg) for item in bench_items]
        responses = generate(model, tokenizer, prompts, cfg.utility.max_new_tokens, cfg.batch_size,
                             autocast_dtype=autocast_dtype(model_cfg))
        refusal = detector.score(responses) if detector else [(None, None)] * len(responses)
        records = [
            {"uid": item.uid, "response": response, **_score(bench, item, response, cfg.utility),
             "refusal": flag, "refusal_max_cosine": max_cos, "n_tokens": len(tokenizer.tokenize(response)),
             "gold": {k: v for k, v in item.gold.items() if k != "test"}}
            for item, response, (flag, max_cos) in zip(bench_items, responses, refusal)
        ]
        atomic_write_jsonl(out_dir / RECORD_FILE.format(bench=bench), records)
    metrics = aggregate_utility_from_records(
        {b: read_jsonl(out_dir / RECORD_FILE.format(bench=b)) for b in items})
    atomic_write_json(out_dir / SUMMARY_FILE, {"metrics": metrics, "notes": notes, "config": dataclasses.asdict(cfg)})
    return metrics
