"""The models a run unlearns from and compares with, built by fine-tuning the base and cached by a hash
of base + data + recipe:

- the *target* knows the forget set (the benchmark's `target_train`);
- the *retain reference* saw the same data without the forget split (for `ou.forget_quality`).

A missing model can be built in a spawned child process, so fine-tuning's memory is returned before the
method runs (`target.build_in_subprocess`).
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from unierase.finetune import FinetuneConfig, finetune
from unierase.io import atomic_dir, atomic_write_json, stable_hash
from unierase.models import ModelConfig, load_model, load_saved, save_model
from unierase.progress import quiet_third_party
from unierase.records import QA, Benchmark
from unierase.run_dir import current_rss_gb, peak_rss_gb
from unierase.training import TrainerConfig

log = logging.getLogger(__name__)
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"  # the format of Hydra's job logging


@dataclass
class TargetConfig(FinetuneConfig):
    """The config's `target` node: the fine-tuning recipe plus which models to build, and where."""
    build_retain_reference: bool = True
    build_in_subprocess: bool = True
    gradient_checkpointing: bool = True  # recompute activations in the backward: the same model, less memory

    def recipe(self) -> FinetuneConfig:
        return FinetuneConfig(**{name: getattr(self, name) for name in FinetuneConfig.__dataclass_fields__})


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
                     gradient_checkpointing: bool, log_files: list[str]) -> float:
    """The child process of `build_in_child`: load the base, fine-tune it, save; returns the child's peak RSS.
    It logs to the console and appends to the parent's log files (`run.log`), which the waiting parent leaves be."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    quiet_third_party()
    for path in log_files:
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
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
    log_files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child_peak = pool.submit(_build_from_base, model_cfg, base_cache, seed, base_id, data, recipe,
                                 trainer_cfg, directory, kind, gradient_checkpointing, log_files).result()
    if not is_built(directory):
        raise RuntimeError(f"the child process that built {kind} left nothing at {directory}")
    return held + child_peak


@dataclass
class Targets:
    """Builds or loads the target and retain-reference models of one run (the `target` config group)."""

    cfg: TargetConfig
    model_cfg: ModelConfig
    trainer_cfg: TrainerConfig
    cache_dir: Path  # the run's cache root; fine-tuned models go to <cache_dir>/targets
    base_id: str
    seed: int
    build_peak_rss_gb: float = 0.0  # this process + a child building a model (0: none built)

    def _directory(self, data: list[QA], kind: str) -> Path:
        return finetuned_dir(self.cache_dir / "targets", kind, self.base_id, data, self.cfg.recipe(), self.model_cfg)

    def _builds(self, benchmark: Benchmark, with_reference: bool) -> list[tuple[list[QA], str]]:
        if benchmark.target_train is None:
            return []
        builds = [(benchmark.target_train, "target")]
        if with_reference and self.cfg.build_retain_reference:
            builds.append((benchmark.retain_train, "retain_reference"))
        return builds

    def build_missing_in_children(self, benchmark: Benchmark, with_reference: bool) -> None:
        """With `target.build_in_subprocess`, build each missing model in its own process; `target()` and
        `retain_reference()` then load them."""
        if not self.cfg.build_in_subprocess:
            return
        for data, kind in self._builds(benchmark, with_reference):
            directory = self._directory(data, kind)
            if not is_built(directory):
                held = build_in_child(self.model_cfg, self.cache_dir, self.seed, self.base_id, data,
                                      self.cfg.recipe(), self.trainer_cfg, directory, kind,
                                      self.cfg.gradient_checkpointing)
                self.build_peak_rss_gb = max(self.build_peak_rss_gb, held)

    def _finetuned(self, base: PreTrainedModel, tokenizer: Any, data: list[QA],
                   kind: str) -> tuple[PreTrainedModel, Path]:
        return cached_finetune(base, tokenizer, self.base_id, data, self.cfg.recipe(), self.model_cfg,
                               self.trainer_cfg, self.cache_dir / "targets", kind, self.cfg.gradient_checkpointing)

    def target(self, base: PreTrainedModel, tokenizer: Any, benchmark: Benchmark) -> tuple[PreTrainedModel, str]:
        """The model that knows the forget set, and its identity for later cache keys."""
        if benchmark.target_train is None:
            return base, self.base_id
        model, path = self._finetuned(base, tokenizer, benchmark.target_train, "target")
        return model, path.name

    def target_dir(self, benchmark: Benchmark) -> Path | None:
        """Where `target()` caches the model that knows the forget set; None where the base is the target."""
        return None if benchmark.target_train is None else self._directory(benchmark.target_train, "target")

    def retain_reference(self, base: PreTrainedModel, tokenizer: Any,
                         benchmark: Benchmark) -> tuple[PreTrainedModel, Path] | None:
        """The same recipe without the forget split; None where the benchmark has no target to build."""
        if benchmark.target_train is None or not self.cfg.build_retain_reference:
            return None
        return self._finetuned(base, tokenizer, benchmark.retain_train, "retain_reference")
