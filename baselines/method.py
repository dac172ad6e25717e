"""Fine-tuning baselines as an `Unlearner`: one forget term + one regulariser, trained by Lightning."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from baselines.data import PairedUnlearningDataset, collate_paired
from baselines.lora import LoRAConfig, add_adapters, check_target_modules, merge_adapters, trainable_fraction
from baselines.losses import FORGET_TERMS, REGULARISERS
from baselines.module import UnlearningModule, needs_reference, required_parts
from unierase.chat import encode_qa
from unierase.config import check
from unierase.context import RunContext
from unierase.io import atomic_write_json
from unierase.method import Unlearner
from unierase.models import copy_model
from unierase.records import QA, Benchmark
from unierase.training import fit, make_trainer

log = logging.getLogger(__name__)


@dataclass
class RecipeConfig:
    """The `recipe` config group: how the baselines optimise (docs/algorithm.md, "The baselines")."""

    lr: float = 1e-5
    epochs: int = 5
    batch_size: int = 32
    grad_accum: int = 4
    weight_decay: float = 0.01
    max_length: int = 128
    seed: int = 1001
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # off: every weight trains

    def __post_init__(self) -> None:
        check(self, at_least={"epochs": 1, "batch_size": 1, "grad_accum": 1, "max_length": 2, "weight_decay": 0},
              positive=("lr",), seeds=("seed",))


@dataclass
class BaselineConfig:
    name: str
    forget_loss: str  # a key of baselines.losses.FORGET_TERMS
    regulariser: str | None = None  # a key of baselines.losses.REGULARISERS
    forget_coeff: float = 1.0
    regularization_coeff: float = 1.0
    beta: float = 0.1
    simnpo_beta: float = 2.5
    simnpo_delta: float = 0.0
    idk_assignment: str = "reference"  # reference | stable_hash
    fix_ref_model: bool = False  # True: the reference stays the original target in every round
    kind: str = "finetune"
    recipe: RecipeConfig = field(default_factory=RecipeConfig)

    def __post_init__(self) -> None:
        check(self, choices={"forget_loss": FORGET_TERMS, "regulariser": REGULARISERS,
                             "idk_assignment": ("reference", "stable_hash"), "kind": ("finetune",)},
              at_least={"forget_coeff": 0, "regularization_coeff": 0}, positive=("beta", "simnpo_beta"),
              finite=("simnpo_delta",))


def schedule(n_forget: int, cfg: RecipeConfig, devices: int) -> tuple[int, int]:
    """(max_steps, warm-up steps) as the reference's baseline runner computes them."""
    effective = cfg.batch_size * cfg.grad_accum * devices
    steps_per_epoch = n_forget // effective
    max_steps = cfg.epochs * n_forget // effective
    if max_steps < cfg.epochs:
        log.warning("only %d optimiser steps for %d epochs (%d items, effective batch %d); "
                    "lower batch_size/grad_accum for a meaningful run", max_steps, cfg.epochs, n_forget, effective)
    return max(max_steps, 1), steps_per_epoch if steps_per_epoch > 1 else 0


class FinetuneUnlearner(Unlearner):
    def __init__(self, cfg: BaselineConfig):
        self.cfg = cfg
        self.forgotten: set[tuple[str, str]] = set()
        self.fixed_reference: PreTrainedModel | None = None
        self.trainable_fraction: float | None = None  # of the last request's training

    @property
    def uses_reference(self) -> bool:
        return needs_reference(self.cfg.forget_loss, self.cfg.regulariser)

    def prepare(self, model: PreTrainedModel, tokenizer: Any, questions: list[QA], benchmark: Benchmark,
                ctx: RunContext) -> PreTrainedModel:
        if self.cfg.recipe.lora.enabled:  # a wrong module name fails here, before any training
            check_target_modules(model, self.cfg.recipe.lora)
        if self.cfg.fix_ref_model and self.uses_reference:
            self.fixed_reference = copy_model(model)
        return model

    def retain_set(self, benchmark: Benchmark, request: list[QA]) -> list[QA]:
        """What the target knows minus everything forgotten so far (and this request)."""
        gone = self.forgotten | {(qa.question, qa.answer) for qa in request}
        return [qa for qa in benchmark.retain_train if (qa.question, qa.answer) not in gone]

    def unlearn(self, model: PreTrainedModel, tokenizer: Any, request: list[QA], benchmark: Benchmark,
                ctx: RunContext) -> PreTrainedModel:
        lora = self.cfg.recipe.lora
        L.seed_everything(self.cfg.recipe.seed, workers=True, verbose=False)  # before the adapters' random init
        reference = None
        if self.uses_reference:  # frozen copy of the model at the start of this request, made before any adapter
            reference = self.fixed_reference or copy_model(model)
        trainable = add_adapters(model, lora) if lora.enabled else model
        self.train(trainable, reference, tokenizer, request, benchmark, ctx)
        self.forgotten |= {(qa.question, qa.answer) for qa in request}
        return (merge_adapters(trainable) if lora.enabled else trainable).eval()

    def train(self, model: nn.Module, reference: PreTrainedModel | None, tokenizer: Any, request: list[QA],
              benchmark: Benchmark, ctx: RunContext) -> None:
        """Train `model`'s trainable parameters (all, or only its adapters) on `request`, in place."""
        cfg, recipe = self.cfg, self.cfg.recipe
        retain = self.retain_set(benchmark, request)

        def encode(question: str, answer: str) -> dict:
            return encode_qa(tokenizer, question, answer, ctx.model_cfg, recipe.max_length)

        dataset = PairedUnlearningDataset(
            [(qa.question, qa.training_answer) for qa in request],
            [(qa.question, qa.training_answer) for qa in retain], benchmark.refusals, encode,
            idk_assignment=cfg.idk_assignment, parts=required_parts(cfg.forget_loss, cfg.regulariser),
        )
        requested = ctx.trainer_cfg.devices
        devices = requested if isinstance(requested, int) and requested > 0 else 1
        max_steps, warmup = schedule(len(request), recipe, devices)
        module = UnlearningModule(
            model, reference, forget=cfg.forget_loss, regulariser=cfg.regulariser,
            forget_coeff=cfg.forget_coeff, regularization_coeff=cfg.regularization_coeff, beta=cfg.beta,
            simnpo_beta=cfg.simnpo_beta, simnpo_delta=cfg.simnpo_delta, lr=recipe.lr,
            weight_decay=recipe.weight_decay, warmup_steps=warmup, max_steps=max_steps,
        )
        # max_steps ends training (epochs = max_steps worth of forget passes), as in the reference runner.
        trainer = make_trainer(ctx.trainer_cfg, ctx.loggers or False, f"{self.cfg.name} unlearning",
                               max_steps=max_steps, max_epochs=-1, accumulate_grad_batches=recipe.grad_accum)
        batches = DataLoader(dataset, batch_size=recipe.batch_size, shuffle=False, collate_fn=collate_paired)
        self.trainable_fraction = trainable_fraction(model)
        fit(trainer, module, batches)

    def metrics(self, model: PreTrainedModel) -> dict[str, float]:
        return {} if self.trainable_fraction is None else {"baseline.trainable_fraction": self.trainable_fraction}

    def save_state(self, directory: Path, model: PreTrainedModel, tokenizer: Any) -> None:
        super().save_state(directory, model, tokenizer)
        atomic_write_json(directory / "forgotten.json", sorted(self.forgotten))

    def load_state(self, directory: Path, model: PreTrainedModel, tokenizer: Any) -> PreTrainedModel:
        self.forgotten = {tuple(pair) for pair in json.loads((directory / "forgotten.json").read_text())}
        return super().load_state(directory, model, tokenizer)
