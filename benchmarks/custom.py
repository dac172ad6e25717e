"""Any forget set: question/answer pairs from a JSON Lines, JSON, CSV or Parquet file, a local dataset folder or a
hub id (`benchmarks.hub.load_rows`), with the protocol of TOFU: the target model is fine-tuned on the forget file
plus the optional retain file, then unlearns the forget file.

Fields: `question`, `answer` (required); `subject` (a substring of the question: UniErase's edit key),
`paraphrased_answer`, `perturbed_answer` (a list; a JSON list in a CSV cell), `paraphrased_question` (optional).
A metric needing a field the rows lack is null, with the reason in `knowledge.json`.

Splits: forget (the request); retain (what the target also learns and unlearning must keep: the regularisers'
set and the evaluated "retain" split); neighbour (knowledge to keep that the target was not trained on: the
evaluated "neighbour" split).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.hub import check_rows, load_rows
from benchmarks.tofu import REFUSAL_POOLS, refusal_pool
from unierase.config import ConfigError, check
from unierase.io import DataError, read_lines
from unierase.records import QA, Benchmark

TYPES = {"question": str, "answer": str, "subject": str, "paraphrased_answer": str, "perturbed_answer": list[str],
         "paraphrased_question": str}
SAME_QA = ("question", "answer")
FILES = ("forget_file", "retain_file", "neighbour_file")


@dataclass
class CustomConfig:
    forget_file: str  # required: the pairs to unlearn
    name: str = "custom"
    retain_file: str | None = None  # pairs the target also learns and unlearning must keep
    neighbour_file: str | None = None  # pairs to keep that the target never trained on (evaluation only)
    data_dir: str = "../shared/data"  # TOFU's refusal list, tofu/idontknow.txt, when neither below is set
    refusal_pool: str = "idontknow_100"  # the variant of TOFU's list (reference_99: the UniErase reference's)
    refusal_file: str | None = None  # one refusal per line
    refusals: list[str] | None = None  # the refusals themselves

    def __post_init__(self) -> None:
        check(self, choices={"refusal_pool": REFUSAL_POOLS})
        for key in (*FILES, "refusal_file"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ConfigError(key, "must be a file, folder or dataset id (or null)")
        if self.refusals is not None:
            if self.refusal_file is not None:
                raise ConfigError("refusals", "and refusal_file are alternatives: set one (null: TOFU's list)")
            if not self.refusals or not all(line.strip() for line in self.refusals):
                raise ConfigError("refusals", f"must be non-empty lines, got {self.refusals!r}")


def _rows(source: str, split: str) -> list[QA]:
    rows = check_rows(source, load_rows(source, list_fields=("perturbed_answer",)), SAME_QA, TYPES, SAME_QA)
    qas = []
    for number, row in enumerate(rows, start=1):
        subject = row.get("subject")
        if subject is not None and subject not in row["question"]:
            raise DataError(f"{source}: row {number}: subject {subject!r} does not occur in the question")
        qas.append(QA(uid=f"custom/{split}/{number - 1}", question=row["question"], answer=row["answer"],
                      group=f"custom/{split}", subject=subject, paraphrased_answer=row.get("paraphrased_answer"),
                      perturbed_answers=tuple(row.get("perturbed_answer") or ()),
                      paraphrased_question=row.get("paraphrased_question")))
    return qas


def _disjoint(rows: list[QA], source: str, other: list[QA], other_source: str, why: str) -> None:
    """A pair cannot be in two roles: forgotten and kept, or learned and held out."""
    other_rows = {(qa.question, qa.answer): i for i, qa in enumerate(other, start=1)}
    for number, qa in enumerate(rows, start=1):
        if (qa.question, qa.answer) in other_rows:
            raise DataError(f"{source}: row {number}: the same question and answer as row "
                            f"{other_rows[qa.question, qa.answer]} of {other_source} ({why})")


def _refusals(cfg: CustomConfig) -> list[str]:
    if cfg.refusals is not None:
        return [line.strip() for line in cfg.refusals]
    if cfg.refusal_file is not None:
        lines = read_lines(Path(cfg.refusal_file))
        if not lines:
            raise DataError(f"{cfg.refusal_file}: no refusal lines")
        return lines
    if (Path(cfg.data_dir) / "tofu" / "idontknow.txt").is_file():
        return refusal_pool(Path(cfg.data_dir), cfg.refusal_pool)
    raise DataError(f"no refusal pool: {Path(cfg.data_dir) / 'tofu' / 'idontknow.txt'} does not exist; set "
                    "benchmark.refusal_file (one refusal per line) or benchmark.refusals")


def load_custom(cfg: CustomConfig) -> Benchmark:
    """Every file read and checked (fields, types, repeated pairs, pairs in two roles) before anything runs."""
    forget = _rows(cfg.forget_file, "forget")
    retain = _rows(cfg.retain_file, "retain") if cfg.retain_file else []
    neighbour = _rows(cfg.neighbour_file, "neighbour") if cfg.neighbour_file else []
    _disjoint(retain, cfg.retain_file, forget, cfg.forget_file, "a pair cannot be both forgotten and kept")
    _disjoint(neighbour, cfg.neighbour_file, forget, cfg.forget_file, "a pair cannot be both forgotten and kept")
    _disjoint(neighbour, cfg.neighbour_file, retain, cfg.retain_file,
              "neighbours are pairs the target was not trained on")
    eval_splits = {name: rows for name, rows in (("retain", retain), ("neighbour", neighbour)) if rows}
    return Benchmark(
        name="custom", forget=forget, retain_train=retain, eval_splits=eval_splits, target_train=forget + retain,
        refusals=_refusals(cfg), generic_questions=[qa.question for qa in retain + neighbour],
    )
