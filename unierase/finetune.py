"""Supervised QA fine-tuning with the loss on answer tokens only: what builds the target and
retain-reference models (unierase/target.py)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from unierase.chat import IGNORE_INDEX, encode_qa
from unierase.config import check
from unierase.models import ModelConfig, decoder_body, output_logits
from unierase.records import QA
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

    def __post_init__(self) -> None:
        check(self, at_least={"epochs": 1, "batch_size": 1, "max_length": 2, "weight_decay": 0}, positive=("lr",),
              seeds=("seed",))


def answer_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`model(**batch).loss` (mean next-token NLL over the labelled tokens), with the vocabulary projected
    only at labelled positions: whole-sequence logits and their float32 copies are most of the memory a
    fine-tuning step adds to the model and optimiser state. `output_logits` applies what the model's forward
    does after its lm_head (Gemma 2's soft-capping)."""
    body = decoder_body(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    labelled = labels != IGNORE_INDEX
    logits = output_logits(model, hidden[:, :-1][labelled])
    return F.cross_entropy(logits.float(), labels[labelled])


class AnswerLossFineTuner(L.LightningModule):
    """Full fine-tuning with the causal-LM loss on answer tokens only, AdamW."""

    def __init__(self, model: PreTrainedModel, lr: float, weight_decay: float):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = answer_loss(self.model, batch)
        self.losses.append(loss.item())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def finetune(
    model: PreTrainedModel, tokenizer: Any, data: list[QA], recipe: FinetuneConfig,
    model_cfg: ModelConfig, trainer_cfg: TrainerConfig, gradient_checkpointing: bool = False,
) -> list[float]:
    """Fine-tune `model` in place on `data`; returns the per-step loss curve."""
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    items = [encode_qa(tokenizer, qa.question, qa.training_answer, model_cfg, recipe.max_length, pad=False)
             for qa in data]
    module = AnswerLossFineTuner(model, recipe.lr, recipe.weight_decay)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        fit(make_trainer(trainer_cfg, desc="fine-tuning", max_epochs=recipe.epochs), module,
            loader(items, recipe.batch_size, shuffle=True, seed=recipe.seed))
    finally:
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()  # later training stages choose for themselves
        model.eval()
    return module.losses
