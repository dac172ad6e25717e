"""TOFU (fictitious authors), read from the offline data folder (`paths.data_dir`) or a dataset in the hub layout
(`hub_path`: `locuslab/TOFU` or a local folder laid out like it; `benchmarks.tofu_data.TofuFiles`).

Standard splits are the `task_id == "1"` rows of the continual files; every 20-row block is one
author. The CPU protocol keeps the paper's shape at small scale: the target learns the forget
authors plus `retain_authors` retain authors (authors f..f+n-1, f = `first_retain_author`). `forget_authors`
replaces the split
by any authors, named or numbered (DATA.md 1.4).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.tofu_data import AUTHORS, HUB_REFUSALS, TofuFiles, forget_author_indices
from unierase.config import ConfigError, check
from unierase.io import DataError, read_lines
from unierase.records import QA, Benchmark

SPLIT_SIZES = {"forget01": 40, "forget05": 200, "forget10": 400}
AUTHOR_ROWS = 20
RETAIN_AUTHORS = 180  # retain90.jsonl: authors 0..179
RETAIN_EVAL_AUTHORS = 20  # retain_perturbed.jsonl: authors 0..19
GENERIC_FIRST_AUTHOR = 160  # the last 400 retain90 rows (authors 160..179) give the generic questions
# forget10_perturbed.jsonl task "1" holds authors 180..199 in this block order (DATA.md 1.3, "Block order")
FORGET10_TASK1_AUTHORS = (198, 199, *range(190, 198), *range(180, 190))
REFUSAL_LINES = 100  # idontknow.txt
REFUSAL_POOLS = ("idontknow_100", "reference_99")
# preset -> (the continual file whose tasks are the rounds, number of rounds)
SEQUENTIAL_PRESETS = {"tofu_seq_10x40": ("forget01", 10), "tofu_seq_9x400": ("forget10", 9)}
PERTURBED_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
# Every field a loader reads, with its JSON type (unierase.io.read_jsonl); a field absent from `required` is optional.
QA_TYPES = {"question": str, "answer": str}
FORGET_TYPES = QA_TYPES | {"task_id": (str, int), "paraphrased_answer": str, "perturbed_answer": list[str],
                           "paraphrased_question": str}
PLAIN_TYPES = QA_TYPES | {"perturbed_answer": list[str], "original_answer": str}
SUBJECT_TYPES = QA_TYPES | {"subject": str}
SAME_QA = ("question", "answer")


@dataclass
class TofuConfig:
    name: str = "tofu"
    data_dir: str = "../shared/data"
    source: str = "local"  # local | hub (`hub_path`, through the `datasets` library)
    hub_path: str = "locuslab/TOFU"  # source=hub: a hub id (needs network) or a local folder in its layout
    split: str = "forget01"
    known_forget: str = "forget01"  # the forget authors the target model learns (>= split)
    retain_authors: int | None = 4  # retain authors f..f+n-1 the target learns; None = all 180 (f must be 0)
    # The first learned retain author f: a validation protocol learns and scores other authors than the test's.
    first_retain_author: int = 0
    # The retain split scores the first n learned authors (those below 20 have evaluation fields); None: every learned
    # one. The learned authors after them are known but never scored: what a method may protect (retain_keys).
    scored_retain_authors: int | None = None
    subject_table: str = "forget10_subject"  # or forget01_subject (they differ on 16 rows)
    refusal_pool: str = "idontknow_100"  # or reference_99
    sequential_preset: str = "tofu_seq_10x40"
    # Membership-inference non-members (audit): retain90 authors the target never learns, outside the evaluated
    # retain authors (0..19) and the generic-question block (160..179). Empty when the target learns them.
    holdout_authors: int = 2
    holdout_first_author: int = 100
    # Forget these authors instead of `split` (indices 0-199, or names from tofu/author_index.tsv): the forget split
    # is their 20 QA each, the target learns them with the retain authors, the retain sets, generic questions and
    # holdout leave them out, and the sequential rounds are one author each. None: `split` (known_forget, preset).
    forget_authors: list[str] | None = None

    def __post_init__(self) -> None:
        check(self, choices={"source": ("local", "hub"), "split": SPLIT_SIZES, "known_forget": SPLIT_SIZES,
                             "subject_table": ("forget10_subject", "forget01_subject"),
                             "refusal_pool": REFUSAL_POOLS, "sequential_preset": SEQUENTIAL_PRESETS},
              between={"retain_authors": (1, RETAIN_AUTHORS), "holdout_authors": (0, 40),
                       "scored_retain_authors": (1, RETAIN_EVAL_AUTHORS)})
        learned = RETAIN_AUTHORS if self.retain_authors is None else self.retain_authors
        if self.scored_retain_authors is not None and self.scored_retain_authors > learned:
            raise ConfigError("scored_retain_authors", f"must be <= retain_authors ({learned}): only learned authors "
                              f"are scored, got {self.scored_retain_authors}")
        scored = min(learned, self.scored_retain_authors or learned, RETAIN_EVAL_AUTHORS)
        last = min(RETAIN_AUTHORS - learned, RETAIN_EVAL_AUTHORS - scored)
        if not 0 <= self.first_retain_author <= last:
            raise ConfigError("first_retain_author", f"must lie in [0, {last}]: the {learned} learned retain authors "
                              f"end at author {RETAIN_AUTHORS - 1} and the {scored} scored ones need evaluation fields "
                              f"(authors 0-{RETAIN_EVAL_AUTHORS - 1}), got {self.first_retain_author}")
        if SPLIT_SIZES[self.known_forget] < SPLIT_SIZES[self.split]:
            raise ConfigError("known_forget", f"must contain the split (split={self.split}, "
                              f"known_forget={self.known_forget}; forget01 < forget05 < forget10)")
        first, end = self.holdout_first_author, self.holdout_first_author + self.holdout_authors
        if first < RETAIN_EVAL_AUTHORS or end > GENERIC_FIRST_AUTHOR:
            raise ConfigError("holdout_first_author", f"holdout authors {first}..{end - 1} must lie within "
                              f"{RETAIN_EVAL_AUTHORS}..{GENERIC_FIRST_AUTHOR - 1} (outside the evaluated retain "
                              "authors and the generic questions)")
        if self.forget_authors is not None:
            if self.source != "local":
                raise ConfigError("forget_authors", "needs source=local (the hub has neither the author index nor "
                                  "the evaluation fields of authors 20-179)")
            if not self.forget_authors:
                raise ConfigError("forget_authors", "must name at least one author (null: the split)")
            for i, entry in enumerate(self.forget_authors):
                if not entry.strip() or (entry.strip().isdigit() and int(entry) >= AUTHORS):
                    raise ConfigError(f"forget_authors[{i}]", f"must be an author index in [0, {AUTHORS - 1}] or a "
                                      f"name, got {entry!r}")

    def holdout_range(self) -> range:
        """The holdout's retain90 author indices; empty when the target learns any of them."""
        learned = RETAIN_AUTHORS if self.retain_authors is None else self.retain_authors
        if self.first_retain_author + learned > self.holdout_first_author:
            return range(0)
        return range(self.holdout_first_author, self.holdout_first_author + self.holdout_authors)


def refusal_pool(data_dir: Path, variant: str) -> list[str]:
    """The refusal lines of `data_dir`/tofu/idontknow.txt (100 of them), as `variant` takes them."""
    path = data_dir / "tofu" / "idontknow.txt"
    lines = read_lines(path)
    if len(lines) != REFUSAL_LINES:
        raise DataError(f"{path}: {len(lines)} non-blank lines, expected {REFUSAL_LINES} refusals")
    return refusal_variant(lines, variant)


def refusal_variant(lines: list[str], variant: str) -> list[str]:
    """idontknow_100: the lines as they are; reference_99: as the UniErase reference took them (DATA.md 1.6)."""
    if variant == "idontknow_100":
        return lines
    if variant == "reference_99":
        return [line.replace("'", "\u2019") for i, line in enumerate(lines) if i != 50]
    raise ValueError(f"unknown refusal pool '{variant}' ({' | '.join(REFUSAL_POOLS)})")


def _subjects(files: TofuFiles, table: str) -> dict[tuple[str, str], str]:
    rows = files.read(table, ("question", "answer", "subject"), SUBJECT_TYPES, SAME_QA)
    return {(row["question"], row["answer"]): row["subject"] for row in rows}


def _qa(row: dict, uid: str, group: str, subject: str | None = None) -> QA:
    return QA(
        uid=uid, question=row["question"], answer=row["answer"], group=group, subject=subject,
        paraphrased_answer=row.get("paraphrased_answer"),
        perturbed_answers=tuple(row.get("perturbed_answer", ())),
        paraphrased_question=row.get("paraphrased_question"),
        cosine_reference=row.get("original_answer", row["answer"]),
    )


def _check_blocks(path: str, rows: int, what: str, expected: int | None = None) -> None:
    """A file (or one task of it) must hold whole 20-QA author blocks: one missing, extra or duplicated row
    would shift every later author's block."""
    if expected is not None and rows != expected:
        raise DataError(f"{path}: {what} has {rows} rows, expected {expected} ({expected // AUTHOR_ROWS} authors "
                        f"x {AUTHOR_ROWS} QA): a row is missing or extra")
    if rows == 0 or rows % AUTHOR_ROWS:
        raise DataError(f"{path}: {what} has {rows} rows, not whole authors of {AUTHOR_ROWS} QA each: "
                        "a row is missing or extra")


def continual_tasks(files: TofuFiles, split: str) -> dict[str, list[tuple[int, dict]]]:
    """The rows of `{split}_perturbed` by task id, each (file row index, row), checked: every task is one
    run of consecutive rows with exactly the split's size (whole 20-QA authors), and no QA pair repeats."""
    path = files.where(f"{split}_perturbed")
    rows = files.read(f"{split}_perturbed", ("task_id",) + PERTURBED_FIELDS, FORGET_TYPES, SAME_QA)
    tasks: dict[str, list[tuple[int, dict]]] = {}
    for i, row in enumerate(rows):
        task = str(row["task_id"])
        if task in tasks and tasks[task][-1][0] != i - 1:
            raise DataError(f"{path}:{i + 1}: task_id '{task}' resumes after other tasks (a task's rows must be "
                            "consecutive)")
        tasks.setdefault(task, []).append((i, row))
    for task, selected in tasks.items():
        _check_blocks(path, len(selected), f"task_id '{task}'", SPLIT_SIZES[split])
    return tasks


def forget_rows(files: TofuFiles, split: str, subjects: dict, task: str = "1",
                tasks: dict[str, list[tuple[int, dict]]] | None = None) -> list[QA]:
    """Rows of one continual task of `split` (task "1" = the standard split); `tasks`: the file already read."""
    tasks = continual_tasks(files, split) if tasks is None else tasks
    if task not in tasks:
        raise DataError(f"{files.where(f'{split}_perturbed')}: no rows with task_id '{task}' "
                        f"(task ids: {', '.join(tasks) or 'none'})")
    selected = tasks[task]
    first = selected[0][0]
    return [
        _qa(row, f"tofu/{split}/{i}", f"{split}/task{task}/author{(i - first) // AUTHOR_ROWS}",
            subjects.get((row["question"], row["answer"])))
        for i, row in selected
    ]


def _retain_rows(files: TofuFiles, name: str, expected_authors: int, types: dict = QA_TYPES,
                 required: tuple[str, ...] = SAME_QA) -> list[QA]:
    rows = files.read(name, required, types, SAME_QA)
    _check_blocks(files.where(name), len(rows), "the file", expected_authors * AUTHOR_ROWS)
    return [_qa(row, f"tofu/{name}.jsonl/{i}", f"retain/author{i // AUTHOR_ROWS}") for i, row in enumerate(rows)]


def _plain_rows(files: TofuFiles, split: str) -> list[QA]:
    rows = files.read(f"{split}_perturbed", ("question", "answer", "perturbed_answer"), PLAIN_TYPES, SAME_QA)
    return [_qa(row, f"tofu/{split}/{i}", f"{split}/{i}") for i, row in enumerate(rows)]


def author_blocks(files: TofuFiles, subjects: dict, all_retain: list[QA], retain_eval: list[QA]) -> dict[int, list[QA]]:
    """Every author's 20 QA with the evaluation fields (DATA.md 1.3): authors 0-19 in retain_perturbed.jsonl, the
    others in forget10_perturbed.jsonl, task "1" holding authors 180-199 (FORGET10_TASK1_AUTHORS) and tasks 2-9
    authors 20-179, each block found by its rows in retain90.jsonl."""
    blocks = {a: [replace(qa, group=f"forget/author{a}") for qa in retain_eval[a * AUTHOR_ROWS: (a + 1) * AUTHOR_ROWS]]
              for a in range(RETAIN_EVAL_AUTHORS)}
    retain_author = {(qa.question, qa.answer): i // AUTHOR_ROWS for i, qa in enumerate(all_retain)}
    path = files.where("forget10_perturbed")
    for task, selected in continual_tasks(files, "forget10").items():
        for start in range(0, len(selected), AUTHOR_ROWS):
            block = selected[start: start + AUTHOR_ROWS]
            found = {retain_author.get((row["question"], row["answer"])) for _, row in block}
            author = FORGET10_TASK1_AUTHORS[start // AUTHOR_ROWS] if task == "1" else found.pop()
            if (task != "1" and (found or author is None)) or author in blocks:
                raise DataError(f"{path}:{block[0][0] + 1}: the {AUTHOR_ROWS} rows from here (task_id '{task}') are "
                                "not one author's block, or repeat one")
            blocks[author] = [_qa(row, f"tofu/forget10/{i}", f"forget/author{author}",
                                  subjects.get((row["question"], row["answer"]))) for i, row in block]
    return blocks


def load_tofu(cfg: TofuConfig) -> Benchmark:
    """Every file the job reads, read and checked (types, duplicates, split sizes, author blocks)."""
    data_dir = Path(cfg.data_dir)
    tofu_dir = data_dir / "tofu"
    if cfg.source == "local" and not tofu_dir.is_dir():
        raise DataError(f"TOFU folder not found: {tofu_dir} (set UNIERASE_DATA or paths.data_dir)")
    files = TofuFiles(tofu_dir, cfg.hub_path if cfg.source == "hub" else None)
    subjects = _subjects(files, cfg.subject_table) if files.exists(cfg.subject_table) else {}
    all_retain = _retain_rows(files, "retain90", RETAIN_AUTHORS)
    retain_eval = _retain_rows(files, "retain_perturbed", RETAIN_EVAL_AUTHORS, FORGET_TYPES, PERTURBED_FIELDS)
    if cfg.forget_authors is None:
        tasks = {split: continual_tasks(files, split) for split in {cfg.split, cfg.known_forget}}
        forget = forget_rows(files, cfg.split, subjects, tasks=tasks[cfg.split])
        known = forget_rows(files, cfg.known_forget, subjects, tasks=tasks[cfg.known_forget])
        round_split, n_rounds = SEQUENTIAL_PRESETS[cfg.sequential_preset]
        round_tasks = tasks.get(round_split) or continual_tasks(files, round_split)
        rounds = []  # hub data has task "1" only: no sequential rounds (a sequential job is refused up front)
        if set(round_tasks) != {"1"}:
            rounds = [forget_rows(files, round_split, subjects, str(t), round_tasks) for t in range(1, n_rounds + 1)]
        gone: set[int] = set()
    else:
        authors = forget_author_indices(tofu_dir, cfg.forget_authors)
        blocks = author_blocks(files, subjects, all_retain, retain_eval)
        rounds = [blocks[a] for a in authors]  # one request per author, in the order given
        forget = known = [qa for round_ in rounds for qa in round_]
        gone = set(authors)

    def kept(rows: list[QA], authors: range) -> list[QA]:
        """The blocks of `authors` in `rows` (20 rows per author), the forgotten authors left out."""
        return [qa for a in authors if a not in gone for qa in rows[a * AUTHOR_ROWS: (a + 1) * AUTHOR_ROWS]]

    first, learned = cfg.first_retain_author, RETAIN_AUTHORS if cfg.retain_authors is None else cfg.retain_authors
    scored = min(learned, cfg.scored_retain_authors or learned, RETAIN_EVAL_AUTHORS)
    retain_known = kept(all_retain, range(first, first + learned))
    evaluated = kept(retain_eval, range(first, first + scored))
    if not retain_known or not evaluated:
        raise ConfigError("benchmark.forget_authors", f"leaves no retain author to learn or to score (the target "
                          f"learns retain authors {first}..{first + learned - 1} and scores {first}.."
                          f"{first + scored - 1}): raise benchmark.retain_authors")
    forget_keys = {(qa.question, qa.answer) for qa in forget}
    target_train = known + retain_known
    return Benchmark(
        name="tofu",
        forget=forget,
        retain_train=[qa for qa in target_train if (qa.question, qa.answer) not in forget_keys],
        eval_splits={
            "retain": evaluated,
            "real_authors": _plain_rows(files, "real_authors"),
            "world_facts": _plain_rows(files, "world_facts"),
        },
        target_train=target_train,
        rounds=rounds,
        refusals=(refusal_variant(HUB_REFUSALS, cfg.refusal_pool) if cfg.source == "hub"
                  else refusal_pool(data_dir, cfg.refusal_pool)),
        generic_questions=[qa.question for qa in kept(all_retain, range(GENERIC_FIRST_AUTHOR, RETAIN_AUTHORS))],
        holdout=kept(all_retain, cfg.holdout_range()),
    )
