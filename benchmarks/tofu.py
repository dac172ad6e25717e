"""TOFU (fictitious authors), read from the offline data folder (`paths.data_dir`) or the hub.

Standard splits are the `task_id == "1"` rows of the continual files; every 20-row block is one
author. The CPU protocol keeps the paper's shape at small scale: the target learns the forget
authors plus `retain_authors` retain authors (authors 0..n-1).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.hub import download_tofu
from unierase.io import DataError, read_jsonl, read_lines
from unierase.records import QA, Benchmark

SPLIT_SIZES = {"forget01": 40, "forget05": 200, "forget10": 400}
AUTHOR_ROWS = 20
PERTURBED_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")


@dataclass
class TofuConfig:
    name: str = "tofu"
    data_dir: str = "../shared/data"
    source: str = "local"  # local | hub (locuslab/TOFU, needs network)
    split: str = "forget01"
    known_forget: str = "forget01"  # the forget authors the target model learns (>= split)
    retain_authors: int | None = 4  # retain authors 0..n-1 the target learns; None = all 180
    subject_table: str = "forget10_subject"  # or forget01_subject (they differ on 16 rows)
    refusal_pool: str = "idontknow_100"  # or reference_99
    sequential_preset: str = "tofu_seq_10x40"


def _check_split(name: str, value: str) -> None:
    if value not in SPLIT_SIZES:
        raise ValueError(f"benchmark.{name}='{value}' is not one of {sorted(SPLIT_SIZES)}")


def refusal_pool(data_dir: Path, variant: str) -> list[str]:
    lines = read_lines(data_dir / "tofu" / "idontknow.txt")
    if variant == "idontknow_100":
        return lines
    if variant == "reference_99":
        return [line.replace("'", "\u2019") for i, line in enumerate(lines) if i != 50]
    raise ValueError(f"unknown refusal pool '{variant}' (idontknow_100 | reference_99)")


def _subjects(tofu_dir: Path, table: str) -> dict[tuple[str, str], str]:
    rows = read_jsonl(tofu_dir / f"{table}.jsonl", required=("question", "answer", "subject"))
    return {(row["question"], row["answer"]): row["subject"] for row in rows}


def _qa(row: dict, uid: str, group: str, subject: str | None = None) -> QA:
    return QA(
        uid=uid, question=row["question"], answer=row["answer"], group=group, subject=subject,
        paraphrased_answer=row.get("paraphrased_answer"),
        perturbed_answers=tuple(row.get("perturbed_answer", ())),
        paraphrased_question=row.get("paraphrased_question"),
        cosine_reference=row.get("original_answer", row["answer"]),
    )


def _task_rows(path: Path, task: str) -> list[tuple[int, dict]]:
    rows = read_jsonl(path, required=("task_id",) + PERTURBED_FIELDS)
    return [(i, row) for i, row in enumerate(rows) if str(row["task_id"]) == task]


def forget_rows(tofu_dir: Path, split: str, subjects: dict, task: str = "1") -> list[QA]:
    """Rows of one continual task of `split` (task "1" = the standard split)."""
    selected = _task_rows(tofu_dir / f"{split}_perturbed.jsonl", task)
    first = selected[0][0] if selected else 0
    return [
        _qa(row, f"tofu/{split}/{i}", f"{split}/task{task}/author{(i - first) // AUTHOR_ROWS}",
            subjects.get((row["question"], row["answer"])))
        for i, row in selected
    ]


def _retain_rows(tofu_dir: Path, file: str, authors: int | None) -> list[QA]:
    rows = read_jsonl(tofu_dir / file, required=("question", "answer"))
    if authors is not None:
        rows = rows[: authors * AUTHOR_ROWS]
    return [_qa(row, f"tofu/{file}/{i}", f"retain/author{i // AUTHOR_ROWS}") for i, row in enumerate(rows)]


def _plain_rows(tofu_dir: Path, file: str, split: str) -> list[QA]:
    rows = read_jsonl(tofu_dir / file, required=("question", "answer", "perturbed_answer"))
    return [_qa(row, f"tofu/{split}/{i}", f"{split}/{i}") for i, row in enumerate(rows)]


def load_tofu(cfg: TofuConfig) -> Benchmark:
    _check_split("split", cfg.split)
    _check_split("known_forget", cfg.known_forget)
    if SPLIT_SIZES[cfg.known_forget] < SPLIT_SIZES[cfg.split]:
        raise ValueError(f"benchmark.known_forget={cfg.known_forget} must contain split={cfg.split}")
    if cfg.source == "hub":
        data_dir = download_tofu()
    elif cfg.source == "local":
        data_dir = Path(cfg.data_dir)
    else:
        raise ValueError(f"unknown benchmark.source '{cfg.source}' (local | hub)")
    tofu_dir = data_dir / "tofu"
    if not tofu_dir.is_dir():
        raise DataError(f"TOFU folder not found: {tofu_dir} (set UNIERASE_DATA or paths.data_dir)")
    subjects = _subjects(tofu_dir, cfg.subject_table) if (tofu_dir / f"{cfg.subject_table}.jsonl").exists() else {}
    forget = forget_rows(tofu_dir, cfg.split, subjects)
    known = forget_rows(tofu_dir, cfg.known_forget, subjects)
    retain_file = "retain90.jsonl"
    retain_known = _retain_rows(tofu_dir, retain_file, cfg.retain_authors)
    forget_keys = {(qa.question, qa.answer) for qa in forget}
    target_train = known + retain_known
    retain_eval_authors = None if cfg.retain_authors is None else min(cfg.retain_authors, 20)
    rounds = []
    if cfg.sequential_preset == "tofu_seq_10x40":
        rounds = [forget_rows(tofu_dir, "forget01", subjects, str(t)) for t in range(1, 11)]
    elif cfg.sequential_preset == "tofu_seq_9x400":
        rounds = [forget_rows(tofu_dir, "forget10", subjects, str(t)) for t in range(1, 10)]
    else:
        raise ValueError(f"unknown sequential preset '{cfg.sequential_preset}'")
    return Benchmark(
        name="tofu",
        forget=forget,
        retain_train=[qa for qa in target_train if (qa.question, qa.answer) not in forget_keys],
        eval_splits={
            "retain": _retain_rows(tofu_dir, "retain_perturbed.jsonl", retain_eval_authors),
            "real_authors": _plain_rows(tofu_dir, "real_authors_perturbed.jsonl", "real_authors"),
            "world_facts": _plain_rows(tofu_dir, "world_facts_perturbed.jsonl", "world_facts"),
        },
        target_train=target_train,
        rounds=rounds,
        refusals=refusal_pool(data_dir, cfg.refusal_pool),
        generic_questions=[qa.question for qa in _retain_rows(tofu_dir, "retain90.jsonl", None)[-400:]],
    )
