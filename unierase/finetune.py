"""Supervised QA fine-tuning: builds the target model (knows the forget set) and the
retain-reference model (never saw it), cached by a hash of model + data + recipe."""
from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from unierase.records import QA
from unierase.io import atomic_dir, atomic_write_json, stable_hash
from unierase.models import IGNORE_INDEX, ModelConfig, decoder_body, encode_qa, load_model, load_saved, save_model
from unierase.run_dir import current_rss_gb, peak_rss_gb
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


@dataclass
class TargetConfig(FinetuneConfig):
    """The config's `target` node: the fine-tuning recipe plus which models to build, and where."""
    build_retain_reference: bool = True
    build_in_subprocess: bool = True
    gradient_checkpointing: bool = True  # recompute activations in the backward: the same model, less memory

    def recipe(self) -> FinetuneConfig:
        return FinetuneConfig(**{name: getattr(self, name) for name in FinetuneConfig.__dataclass_fields__})


def answer_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`model(**batch).loss` (mean next-token NLL over the labelled tokens), with the vocabulary projected
    only at labelled positions: whole-sequence logits and their float32 copies are most of the memory a
    fine-tuning step adds to the model and optimiser state."""
    body = decoder_body(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    labelled = labels != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][labelled])
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
        fit(make_trainer(trainer_cfg, max_epochs=recipe.epochs), module,
            loader(items, recipe.batch_size, shuffle=True, seed=recipe.seed))
    finally:
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()  # later training stages choose for themselves
        model.eval()
    return module.losses


def finetuned_dir(cache_dir: Path, kind: str, base_id: str, data: list[QA], recipe: FinetuneConfig,
                  model_cfg: ModelConfig) -> Path:
    """Where the model fine-tuned from `base_id` on `data` with `recipe` is cached.

    The key covers the base model, every training QA (text, not just ids) and the recipe.
    """
    key = stable_hash({"base": base_id, "data": [(q.question, q.training_answer) for q in data],
                       "recipe": asdict(recipe), "format": [model_cfg.system_prompt, model_cfg.date_string]})
    return cache_dir / f"{kind}-{key}"


def is_built(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def build_finetuned(
    model: PreTrainedModel, tokenizer: Any, base_id: str, data: list[QA], recipe: FinetuneConfig,
    model_cfg: ModelConfig, trainer_cfg: TrainerConfig, directory: Path, kind: str,
    gradient_checkpointing: bool = False,
) -> None:
    """Fine-tune `model` in place and save it (with its loss curve) to `directory`, atomically."""
    log.info("building %s model on %d QA (%s)", kind, len(data), directory)
    start = time.perf_counter()
    losses = finetune(model, tokenizer, data, recipe, model_cfg, trainer_cfg, gradient_checkpointing)
    seconds = time.perf_counter() - start
    with atomic_dir(directory) as tmp:
        save_model(model, tokenizer, tmp)
        atomic_write_json(tmp / "build.json", {
            "kind": kind, "base": base_id, "n_qa": len(data), "recipe": asdict(recipe),
            "seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
        })


def cached_finetune(
    base: PreTrainedModel, tokenizer: Any, base_id: str, data: list[QA], recipe: FinetuneConfig,
    model_cfg: ModelConfig, trainer_cfg: TrainerConfig, cache_dir: Path, kind: str,
    gradient_checkpointing: bool = False,
) -> tuple[PreTrainedModel, Path]:
    """Return the fine-tuned model, from `cache_dir/<kind>-<hash>` when it exists.

    `base` is left untouched: training runs on a copy of it.
    """
    directory = finetuned_dir(cache_dir, kind, base_id, data, recipe, model_cfg)
    if is_built(directory):
        log.info("reusing cached %s model %s", kind, directory)
        return load_saved(directory, like=base), directory
    model = type(base)(base.config).to(base.device)
    model.load_state_dict(base.state_dict())
    build_finetuned(model, tokenizer, base_id, data, recipe, model_cfg, trainer_cfg, directory, kind,
                    gradient_checkpointing)
    return model, directory


def _build_from_base(model_cfg: ModelConfig, base_cache: Path, seed: int, base_id: str, data: list[QA],
                     recipe: FinetuneConfig, trainer_cfg: TrainerConfig, directory: Path, kind: str,
                     gradient_checkpointing: bool) -> float:
    """The child process of `build_in_child`: load the base, fine-tune it, save; returns the child's peak RSS."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s", force=True)
    base, tokenizer = load_model(model_cfg, base_cache, seed=seed)
    build_finetuned(base, tokenizer, base_id, data, recipe, model_cfg, trainer_cfg, directory, kind,
                    gradient_checkpointing)
    return peak_rss_gb()


def build_in_child(model_cfg: ModelConfig, base_cache: Path, seed: int, base_id: str, data: list[QA],
                   recipe: FinetuneConfig, trainer_cfg: TrainerConfig, directory: Path, kind: str,
                   gradient_checkpointing: bool = False) -> float:
    """Build a fine-tuned model into `directory` in a fresh (spawned) process.

    The training memory (optimiser state, activations, pages the allocator keeps after freeing them)
    then goes back to the OS before the caller goes on. Returns the caller's resident memory now plus
    the child's peak: the caller waits meanwhile, so this bounds what the two held together (from above:
    shared library pages count twice).
    """
    held = current_rss_gb()
    log.info("building %s in a child process", kind)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child_peak = pool.submit(_build_from_base, model_cfg, base_cache, seed, base_id, data, recipe,
                                 trainer_cfg, directory, kind, gradient_checkpointing).result()
    if not is_built(directory):
        raise RuntimeError(f"the child process that built {kind} left nothing at {directory}")
    return held + child_peak
