"""General ability (`ut.*`, SPEC-metrics UT-1..UT-6): MMLU, TriviaQA, GSM8K and HumanEval from
`<data_dir>/utility`, greedy answers with the chat template, scored by `metrics.py`.

Each benchmark writes `utility.<bench>.jsonl` (one record per item: response, correctness, refusal,
length); the returned values are recomputed from those files by `aggregate_utility_from_records`.
"""
from __future__ import annotations

import csv
import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from transformers import PreTrainedModel

from unierase.evaluation import metrics as m
from unierase.evaluation.engine import RefusalDetector, generate, load_encoder
from unierase.evaluation.knowledge import EvalConfig
from unierase.io import DataError, atomic_write_json, atomic_write_jsonl, read_jsonl
from unierase.models import ModelConfig, autocast_dtype, chat_prompt

# The instruction wording is the project's; the required answer phrases are the protocol (SPEC UT-1..4).
MMLU_PROMPT = ("Answer the following multiple-choice question by choosing one option (A, B, C or D). "
               "End your response with this exact sentence: The correct answer is <letter>.\n\n"
               "Question: {question}\nOptions:\nA. {A}\nB. {B}\nC. {C}\nD. {D}")
TRIVIAQA_PROMPT = ("Answer the following question with a short word or phrase. End your response with this "
                   "exact format: The correct answer is <answer>.\n\nQuestion: {question}")
GSM8K_PROMPT = ("Solve the following math problem step by step. End your response with this exact format: "
                "The final answer is <number>.\n\nProblem: {question}")
HUMANEVAL_PROMPT = ("Complete the following Python function. Output only the complete function (signature and "
                    "body) with correct indentation and no examples or explanation, in this format: "
                    "Code: <your code>\n\nFunction:\n{prompt}")

T = TypeVar("T")
RECORD_FILE = "utility.{bench}.jsonl"
SUMMARY_FILE = "utility.json"


@dataclass(frozen=True)
class UtilityItem:
    uid: str
    message: str  # the user turn
    gold: dict[str, Any]  # what scoring needs (letter, aliases, answer field, test...)


# ------------------------------------------------------------------------------ loading


def load_mmlu(utility_dir: Path) -> list[UtilityItem]:
    """All test questions, subjects in sorted file order, rows in file order (headerless CSV)."""
    folder = Path(utility_dir) / "mmlu" / "test"
    files = sorted(folder.glob("*_test.csv"))
    if not files:
        raise DataError(f"no MMLU test files (*_test.csv) in {folder}")
    items = []
    for path in files:
        subject = path.name.removesuffix("_test.csv")
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            line = 1  # first physical line of the next record (fields may span lines)
            try:
                for row in reader:
                    if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                        raise DataError(f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer "
                                        f"letter A-D), got {len(row)} column(s): {row[-1:]!r}")
                    items.append(UtilityItem(
                        uid=f"mmlu/{subject}/{len(items)}",
                        message=MMLU_PROMPT.format(question=row[0], A=row[1], B=row[2], C=row[3], D=row[4]),
                        gold={"answer": row[5]},
                    ))
                    line = reader.line_num + 1
            except csv.Error as err:
                raise DataError(f"{path}:{line}: malformed CSV ({err})") from None
    return items


def load_triviaqa(utility_dir: Path) -> list[UtilityItem]:
    path = Path(utility_dir) / "triviaqa.jsonl"
    items = []
    for line, row in enumerate(read_jsonl(path, required=("question", "answer", "aliases")), start=1):
        if not isinstance(row["aliases"], list) or not row["aliases"]:
            raise DataError(f"{path}:{line}: 'aliases' must be a non-empty list")
        items.append(UtilityItem(f"triviaqa/{line - 1}", TRIVIAQA_PROMPT.format(question=row["question"]),
                                 {"answer": row["answer"], "aliases": row["aliases"]}))
    return items


def load_gsm8k(utility_dir: Path) -> list[UtilityItem]:
    path = Path(utility_dir) / "gsm8k.jsonl"
    items = []
    for line, row in enumerate(read_jsonl(path, required=("question", "answer")), start=1):
        try:
            m.gsm8k_gold(row["answer"])
        except ValueError:
            raise DataError(f"{path}:{line}: 'answer' does not end in '#### <number>'") from None
        items.append(UtilityItem(f"gsm8k/{line - 1}", GSM8K_PROMPT.format(question=row["question"]),
                                 {"answer": row["answer"]}))
    return items


def load_humaneval(utility_dir: Path) -> list[UtilityItem]:
    path = Path(utility_dir) / "human_eval.jsonl"
    rows = read_jsonl(path, required=("task_id", "prompt", "test", "entry_point"))
    return [UtilityItem(row["task_id"], HUMANEVAL_PROMPT.format(prompt=row["prompt"]),
                        {"prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]})
            for row in rows]


LOADERS: dict[str, Callable[[Path], list[UtilityItem]]] = {
    "mmlu": load_mmlu, "triviaqa": load_triviaqa, "gsm8k": load_gsm8k, "humaneval": load_humaneval,
}


def subsample(items: Sequence[T], fraction: float, seed: int) -> list[T]:
    """SPEC subsampling: shuffle the full list with random.Random(seed), keep the first int(f·N)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"utility fraction {fraction} is not in [0, 1]")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled[: int(fraction * len(shuffled))]


# ------------------------------------------------------------------------------ scoring


def _score(bench: str, item: UtilityItem, response: str, cfg: EvalConfig) -> dict[str, Any]:
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
    data_dir: Path,
    cfg: EvalConfig,
    model_cfg: ModelConfig,
    out_dir: Path,
    refusals: Sequence[str],
) -> dict[str, float | None]:
    """Run `cfg.utility_benchmarks`; write `utility.<bench>.jsonl` and `utility.json` (metrics, notes)."""
    out_dir = Path(out_dir)
    unknown = set(cfg.utility_benchmarks) - set(LOADERS)
    if unknown:
        raise ValueError(f"unknown utility benchmark(s) {sorted(unknown)} ({' | '.join(LOADERS)})")
    # Every file is read and checked before the first (slow) generation.
    items = {b: subsample(LOADERS[b](Path(data_dir) / "utility"), getattr(cfg, f"{b}_fraction"), cfg.seed)
             for b in cfg.utility_benchmarks}
    notes: dict[str, Any] = {"items": {b: len(v) for b, v in items.items()}, "null_reasons": {}}
    if "triviaqa" in items:
        notes["triviaqa"] = "closed-book subset; the reference used a reading-comprehension variant"
    encoder, reason = load_encoder(cfg.encoder)
    detector = RefusalDetector(encoder, refusals, cfg.refusal_threshold) if encoder and refusals else None
    if detector is None:
        notes["null_reasons"]["refusal_rate"] = reason or "no refusal pool given"
    for bench, bench_items in items.items():
        prompts = [chat_prompt(tokenizer, item.message, model_cfg) for item in bench_items]
        responses = generate(model, tokenizer, prompts, cfg.utility_max_new_tokens, cfg.batch_size,
                             autocast_dtype=autocast_dtype(model_cfg))
        refusal = detector.score(responses) if detector else [(None, None)] * len(responses)
        records = [
            {"uid": item.uid, "response": response, **_score(bench, item, response, cfg),
             "refusal": flag, "refusal_max_cosine": max_cos, "n_tokens": len(tokenizer.tokenize(response)),
             "gold": {k: v for k, v in item.gold.items() if k != "test"}}
            for item, response, (flag, max_cos) in zip(bench_items, responses, refusal)
        ]
        atomic_write_jsonl(out_dir / RECORD_FILE.format(bench=bench), records)
    metrics = aggregate_utility_from_records(
        {b: read_jsonl(out_dir / RECORD_FILE.format(bench=b)) for b in items})
    atomic_write_json(out_dir / SUMMARY_FILE, {"metrics": metrics, "notes": notes, "config": dataclasses.asdict(cfg)})
    return metrics
