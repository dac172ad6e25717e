"""The one interface settings see. A method never knows which setting runs it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from benchmarks.base import QA, Benchmark
from unierase.context import RunContext


class Unlearner(ABC):
    """Unlearns forget requests from a model.

    `prepare` runs once before the first request and sees every question the setting will ask
    to forget (UniErase trains its token there); `unlearn` handles one request and may keep
    state across requests, which `save_state` / `load_state` persist for resumable settings.
    """

    def prepare(self, model: PreTrainedModel, tokenizer: Any, questions: list[QA], benchmark: Benchmark,
                ctx: RunContext) -> PreTrainedModel:
        return model

    @abstractmethod
    def unlearn(self, model: PreTrainedModel, tokenizer: Any, request: list[QA], benchmark: Benchmark,
                ctx: RunContext) -> PreTrainedModel:
        """Return the model with `request` unlearned (may be the same object, edited in place)."""

    def save_state(self, directory: Path) -> None:
        """Persist what the next request needs beyond the weights (nothing by default)."""

    def load_state(self, directory: Path, model: PreTrainedModel, tokenizer: Any) -> None:
        """Restore what `save_state` wrote."""

    def metrics(self, model: PreTrainedModel) -> dict[str, float]:
        """Method-specific figures for the run's metrics (e.g. UniErase's edited fraction)."""
        return {}
