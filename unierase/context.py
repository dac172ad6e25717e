"""What every stage of one run shares: typed configs, where to write, where to cache, the loggers."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import Logger

from unierase.models import ModelConfig
from unierase.training import TrainerConfig


@dataclass
class RunContext:
    run_dir: Path
    cache_dir: Path
    model_cfg: ModelConfig
    trainer_cfg: TrainerConfig
    seed: int
    # Hash of what determines the results (config, data, code version): a resumable setting keys its state by it.
    results_key: str
    # results_key without the evaluation config: what determines the unlearned model (`setting.reuse_unlearned`).
    unlearned_key: str = ""
    # results_key without setting.rounds: the sequential state, which a later job asking for more rounds extends.
    sequential_key: str = ""
    loggers: list[Logger] = field(default_factory=list)
    model_id: str = ""  # identity of the model being unlearned (the target), for cache keys
