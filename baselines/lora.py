"""LoRA for the fine-tuning baselines (`recipe.lora`): peft adapters are trained on the model being unlearned,
then merged, so the method returns an ordinary transformers model with ordinary weights."""
from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from unierase.config import ConfigError, check

# Every linear projection of a Llama-style decoder block: attention and MLP.
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Where the model-dependent check reports: the config path of `target_modules` in a job.
TARGETS_FIELD = "recipe.lora.target_modules"


@dataclass
class LoRAConfig:
    """`recipe.lora`: rank-`rank` adapters, scaled by alpha/rank, on the modules whose names end in a
    `target_modules` entry (peft's rule). A flag rather than `lora: null`, so `recipe.lora.rank=16` is an
    ordinary override and every run's config records the same keys."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DECODER_PROJECTIONS))

    def __post_init__(self) -> None:
        check(self, at_least={"rank": 1}, positive=("alpha",), finite=("dropout",))
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("target_modules", "must name at least one module, got []")


def adaptable_modules(model: nn.Module) -> list[str]:
    """The distinct last name components of the modules LoRA can adapt (linear, embedding, GPT-2 Conv1D)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and isinstance(module, (nn.Linear, nn.Embedding, Conv1D))})


def check_target_modules(model: nn.Module, cfg: LoRAConfig) -> None:
    """Every `target_modules` entry names a module of `model`. peft itself fails only when no entry matches,
    and skips a missing one silently when another matches."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in cfg.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ConfigError(TARGETS_FIELD, f"names {', '.join(missing)}, which model {type(model).__name__} "
                          f"lacks (its adaptable modules: {', '.join(adaptable_modules(model))})")


def add_adapters(model: PreTrainedModel, cfg: LoRAConfig) -> PeftModel:
    """`model` wrapped with fresh adapters, the only trainable parameters. The wrapper shares (and freezes)
    `model`'s own weights: a copy made from `model` beforehand never sees the adapters."""
    check_target_modules(model, cfg)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def merge_adapters(model: PeftModel) -> PreTrainedModel:
    """The wrapped model with the adapters folded into its weights and every peft module gone."""
    merged = model.merge_and_unload()
    # peft froze the base weights for training; an ordinary model trains as a whole (e.g. the audit's relearning).
    return merged.requires_grad_(True)


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters / all parameters (adapters included while they exist, as peft counts them)."""
    params = list(model.parameters())  # shared (tied) tensors appear once
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)
