"""The records the benchmarks yield, whatever their source, and what one experiment needs of them."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


@dataclass(frozen=True)
class QA:
    """One question-answer pair with the evaluation fields a benchmark provides.

    `uid` is stable across runs (file + row), `group` is the author/person the row belongs to
    (precise unlearning's siblings), `train_answer` is what fine-tuning sees (real-world trains
    on the long answer but scores against the short golden one).
    """

    uid: str
    question: str
    answer: str
    group: str
    subject: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    paraphrased_question: str | None = None
    cosine_reference: str | None = None
    train_answer: str | None = None

    @property
    def training_answer(self) -> str:
        return self.train_answer or self.answer


class SplitRole(str, Enum):
    """How the knowledge aggregates treat an evaluated split (docs/metrics.md, "Split roles"). Declared
    where the split is made: the benchmark's `eval_splits` are utility, a setting declares its own."""

    FORGET = "forget"  # forget-like: the truth ratio's forget form, CL-6's forget direction; no utility aggregate
    UTILITY = "utility"  # knowledge to keep: the non-forget forms; the inputs of cl.model_utility
    OTHER = "other"  # non-forget forms, reported in no aggregate


@dataclass(frozen=True)
class EvalSplit:
    """One split to evaluate: its rows and its role."""

    role: SplitRole
    rows: list[QA]


@dataclass
class Benchmark:
    """What one experiment needs from a benchmark.

    target_train: the QA the target model is fine-tuned on (None: the base model already knows);
    forget: the split being unlearned; retain_train: what regularisers and the retain-reference
    model see (everything the target knows minus the forget split); eval_splits: the non-forget
    evaluation splits, all of them knowledge to keep (role utility, `utility_splits`); rounds: the
    sequential setting's requests, in order; holdout: QA of the benchmark's kind the target never saw,
    the non-members of membership inference (empty when the benchmark has none).
    """

    name: str
    forget: list[QA]
    retain_train: list[QA]
    eval_splits: dict[str, list[QA]]
    target_train: list[QA] | None
    rounds: list[list[QA]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    generic_questions: list[str] = field(default_factory=list)
    holdout: list[QA] = field(default_factory=list)  # authors the target never learns (membership-inference)

    def unscored_retain(self) -> list[QA]:
        """`retain_train` rows no evaluation split asks about: what a method may protect without seeing what is
        scored (UniErase's edit.protect=[retain_keys])."""
        scored = {qa.question for rows in self.eval_splits.values() for qa in rows}
        return [qa for qa in self.retain_train if qa.question not in scored]

    def utility_splits(self) -> dict[str, EvalSplit]:
        """`eval_splits` with their role: what the target knows and unlearning must keep."""
        return {name: EvalSplit(SplitRole.UTILITY, rows) for name, rows in self.eval_splits.items()}


@dataclass(frozen=True)
class UtilityItem:
    """One general-ability item (MMLU, TriviaQA, GSM8K, HumanEval): the user turn and what scoring needs."""

    uid: str
    message: str
    gold: dict[str, Any]
