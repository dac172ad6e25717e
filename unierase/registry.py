"""What the config names, mapped to code: `method.kind` -> (config schema, Unlearner class), and the stages."""
from __future__ import annotations

from baselines.method import BaselineConfig, FinetuneUnlearner
from unierase.unierase import UniErase, UniEraseConfig

METHODS = {"unierase": (UniEraseConfig, UniErase), "finetune": (BaselineConfig, FinetuneUnlearner)}
# finetune: build the target only; unlearn: target -> setting(method) -> evaluation; eval: evaluate model.path
STAGES = ("finetune", "unlearn", "eval")
