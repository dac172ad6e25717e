"""Supervised QA fine-tuning: builds the target model (knows the forget set) and the
retain-reference model (never saw it), cached by a hash of model + data + recipe."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedModel

from benchmarks.base import QA
from unierase.io import atomic_dir, atomic_write_json, stable_hash
from unierase.models import ModelConfig, encode_qa, load_saved, save_model
from unierase.training import TrainerConfig, fit, loader, make_trainer

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    epochs: int = 8
    lr: float = 5e-5
    batch_size: int = 8
    weight_decay: float = 0.01
    max_length: int = 160
    seed: int = 0


class AnswerLossFineTuner(L.LightningModule):
    """Full fine-tuning with the causal-LM loss on answer tokens only, AdamW."""

    def __init__(self, model: PreTrainedModel, lr: float, weight_decay: float):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def finetune(
    model: PreTrainedModel, tokenizer: Any, data: list[QA], recipe: FinetuneConfig,
    model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
) -> list[float]:
    """Fine-tune `model` in place on `data`; returns the per-step loss curve."""
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    items = [encode_qa(tokenizer, qa.question, qa.training_answer, model_cfg, recipe.max_length, pad=False)
             for qa in data]
    module = AnswerLossFineTuner(model, recipe.lr, recipe.weight_decay)
    model.train()
    fit(make_trainer(trainer_cfg, max_epochs=recipe.epochs), module,
        loader(items, recipe.batch_size, shuffle=True, seed=recipe.seed))
    model.eval()
    return module.losses


def cached_finetune(
    base: PreTrainedModel, tokenizer: Any, base_id: str, data: list[QA], recipe: FinetuneConfig,
    model_cfg: ModelConfig, trainer_cfg: TrainerConfig, cache_dir: Path, kind: str,
) -> tuple[PreTrainedModel, Path]:
    """Return the fine-tuned model, from `cache_dir/<kind>-<hash>` when it exists.

    The key covers the base model, every training QA (text, not just ids) and the recipe.
    `base` is left untouched: training runs on a copy loaded from the base directory.
    """
    key = stable_hash({"base": base_id, "data": [(q.question, q.training_answer) for q in data],
                       "recipe": asdict(recipe), "format": [model_cfg.system_prompt, model_cfg.date_string]})
    target = cache_dir / f"{kind}-{key}"
    if (target / "config.json").is_file():
        log.info("reusing cached %s model %s", kind, target)
        return load_saved(target, like=base), target
    log.info("building %s model on %d QA (%s)", kind, len(data), target)
    model = type(base)(base.config).to(base.device)
    model.load_state_dict(base.state_dict())
    start = time.perf_counter()
    losses = finetune(model, tokenizer, data, recipe, model_cfg, trainer_cfg)
    seconds = time.perf_counter() - start
    with atomic_dir(target) as tmp:
        save_model(model, tokenizer, tmp)
        atomic_write_json(tmp / "build.json", {
            "kind": kind, "base": base_id, "n_qa": len(data), "recipe": asdict(recipe),
            "seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
        })
    return model, target
