"""The one interface settings see. A method never knows which setting runs it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from unierase.context import RunContext
from unierase.models import load_saved, save_model
from unierase.records import QA, Benchmark


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

    def save_state(self, directory: Path, model: PreTrainedModel, tokenizer: Any) -> None:
        """Persist the model and whatever the next request needs (default: the full weights)."""
        save_model(model, tokenizer, directory / "model")

    def load_state(self, directory: Path, model: PreTrainedModel, tokenizer: Any) -> PreTrainedModel:
        """Given the prepared starting model, return the model as it was when `save_state` ran."""
        return load_saved(directory / "model", like=model)

    def metrics(self, model: PreTrainedModel) -> dict[str, float]:
        """Method-specific figures for the run's metrics (e.g. UniErase's edited fraction)."""
        return {}
