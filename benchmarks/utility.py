"""The general-ability sets (MMLU, TriviaQA, GSM8K, HumanEval) read from a local `utility/` folder.

Each loader checks its file as it reads it (file:line in every error) and returns `UtilityItem`s whose
`message` is the user turn of the protocol's prompt; `load_utility` reads every requested set and
keeps the seeded subsample, before any model runs.
"""
from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from unierase.evaluation.config import UTILITY_BENCHMARKS
from unierase.evaluation.utility_metrics import gsm8k_gold
from unierase.io import DataError, read_jsonl, read_text
from unierase.records import UtilityItem

# The instruction wording is the project's; the required answer phrases are what scoring looks for
# (docs/metrics.md, UT-1 to UT-4).
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


def load_mmlu(utility_dir: Path) -> list[UtilityItem]:
    """All test questions, subjects in sorted file order, rows in file order (headerless CSV)."""
    folder = Path(utility_dir) / "mmlu" / "test"
    files = sorted(folder.glob("*_test.csv"))
    if not files:
        raise DataError(f"no MMLU test files (*_test.csv) in {folder}")
    items = []
    for path in files:
        subject = path.name.removesuffix("_test.csv")
        with io.StringIO(read_text(path), newline="") as handle:  # read_text: a non-UTF-8 byte names its line
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
                        # The fields themselves too: log-likelihood scoring builds lm-eval's prompt from them.
                        gold={"answer": row[5], "subject": subject, "question": row[0], "choices": row[1:5]},
                    ))
                    line = reader.line_num + 1
            except csv.Error as err:
                raise DataError(f"{path}:{line}: malformed CSV ({err})") from None
    return items


def load_triviaqa(utility_dir: Path) -> list[UtilityItem]:
    path = Path(utility_dir) / "triviaqa.jsonl"
    items = []
    rows = read_jsonl(path, required=("question", "answer", "aliases"),
                      types={"question": str, "answer": str, "aliases": list[str]})
    for line, row in enumerate(rows, start=1):
        items.append(UtilityItem(f"triviaqa/{line - 1}", TRIVIAQA_PROMPT.format(question=row["question"]),
                                 {"answer": row["answer"], "aliases": row["aliases"]}))
    return items


def load_gsm8k(utility_dir: Path) -> list[UtilityItem]:
    path = Path(utility_dir) / "gsm8k.jsonl"
    items = []
    for line, row in enumerate(read_jsonl(path, required=("question", "answer"),
                                          types={"question": str, "answer": str}), start=1):
        try:
            valid = "#### " in row["answer"] and gsm8k_gold(row["answer"]) is not None  # the parser alone takes "42"
        except ValueError:
            valid = False
        if not valid:
            raise DataError(f"{path}:{line}: 'answer' does not end in '#### <number>'")
        items.append(UtilityItem(f"gsm8k/{line - 1}", GSM8K_PROMPT.format(question=row["question"]),
                                 {"answer": row["answer"]}))
    return items


def load_humaneval(utility_dir: Path) -> list[UtilityItem]:
    path = Path(utility_dir) / "human_eval.jsonl"
    rows = read_jsonl(path, required=("task_id", "prompt", "test", "entry_point"),
                      types={"task_id": str, "prompt": str, "test": str, "entry_point": str}, unique=("task_id",))
    return [UtilityItem(row["task_id"], HUMANEVAL_PROMPT.format(prompt=row["prompt"]),
                        {"prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]})
            for row in rows]


LOADERS: dict[str, Callable[[Path], list[UtilityItem]]] = {
    "mmlu": load_mmlu, "triviaqa": load_triviaqa, "gsm8k": load_gsm8k, "humaneval": load_humaneval,
}
assert tuple(LOADERS) == UTILITY_BENCHMARKS  # the names eval.utility.benchmarks accepts


def subsample(items: Sequence[T], fraction: float, seed: int) -> list[T]:
    """Seeded subsample (docs/metrics.md, "ut: general ability"): shuffle the full list with
    random.Random(seed), keep the first int(f·N)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"utility fraction {fraction} is not in [0, 1]")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled[: int(fraction * len(shuffled))]


def load_utility(utility_dir: Path, benchmarks: Sequence[str], fractions: Mapping[str, float],
                 seed: int) -> dict[str, list[UtilityItem]]:
    """Every requested set, read and checked, subsampled with `fractions[bench]` and `seed`."""
    unknown = sorted(set(benchmarks) - set(LOADERS))
    if unknown:
        raise ValueError(f"unknown utility benchmark(s) {unknown} ({' | '.join(LOADERS)})")
    return {bench: subsample(LOADERS[bench](Path(utility_dir)), fractions[bench], seed) for bench in benchmarks}
