"""Everything one run shares: typed configs, the base model, the target model, loggers, paths."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from unierase.records import Benchmark
from benchmarks.real_world import RealWorldConfig, load_real_world
from benchmarks.tofu import TofuConfig, load_tofu
from unierase.finetune import TargetConfig, build_in_child, cached_finetune, finetuned_dir, is_built
from unierase.io import stable_hash
from unierase.models import ModelConfig, load_model
from unierase.training import TrainerConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

BENCHMARKS = {"tofu": (TofuConfig, load_tofu), "real_world": (RealWorldConfig, load_real_world)}


def typed(node: DictConfig, schema: type[T]) -> T:
    """Validate a config node against a dataclass: unknown keys and wrong types fail here, early."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))


def load_benchmark(node: DictConfig) -> Benchmark:
    if node.name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark '{node.name}' ({' | '.join(BENCHMARKS)})")
    schema, loader = BENCHMARKS[node.name]
    return loader(typed(node, schema))


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    cache_dir: Path
    model_cfg: ModelConfig
    trainer_cfg: TrainerConfig
    loggers: list[Logger] = field(default_factory=list)
    model_id: str = ""  # identity of the model being unlearned (the target), for cache keys
    build_peak_rss_gb: float = 0.0  # this process + a child building a fine-tuned model (0: none built)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def base_id(self) -> str:
        """Identity of the base weights, for cache keys."""
        identity: dict[str, Any] = {k: v for k, v in asdict(self.model_cfg).items()
                                    if k in ("name", "source", "path", "package", "gguf_file", "tiny")}
        if self.model_cfg.source == "tiny_random":
            identity["seed"] = self.seed
        return f"{self.model_cfg.name}-{stable_hash(identity, 12)}"

    def load_base(self) -> tuple[PreTrainedModel, Any]:
        return load_model(self.model_cfg, self.cache_dir, seed=self.seed)

    @property
    def target_cfg(self) -> TargetConfig:
        return typed(self.cfg.target, TargetConfig)

    def finetuned(self, base: PreTrainedModel, tokenizer: Any, data: list, kind: str) -> tuple[PreTrainedModel, Path]:
        target_cfg = self.target_cfg
        return cached_finetune(base, tokenizer, self.base_id, data, target_cfg.recipe(), self.model_cfg,
                               self.trainer_cfg, self.cache_dir / "targets", kind, target_cfg.gradient_checkpointing)

    def build_in_children(self, benchmark: Benchmark, with_reference: bool) -> None:
        """Build a missing target (and retain reference) each in its own process (target.build_in_subprocess),
        so that fine-tuning's memory is returned before the method runs; `target()` then loads them."""
        target_cfg = self.target_cfg
        if benchmark.target_train is None or not target_cfg.build_in_subprocess:
            return
        builds = [(benchmark.target_train, "target")]
        if with_reference and target_cfg.build_retain_reference:
            builds.append((benchmark.retain_train, "retain_reference"))
        recipe = target_cfg.recipe()
        for data, kind in builds:
            directory = finetuned_dir(self.cache_dir / "targets", kind, self.base_id, data, recipe, self.model_cfg)
            if not is_built(directory):
                held = build_in_child(self.model_cfg, self.cache_dir, self.seed, self.base_id, data, recipe,
                                      self.trainer_cfg, directory, kind, target_cfg.gradient_checkpointing)
                self.build_peak_rss_gb = max(self.build_peak_rss_gb, held)

    def target(self, base: PreTrainedModel, tokenizer: Any, benchmark: Benchmark) -> tuple[PreTrainedModel, str]:
        """The model that knows the forget set, and its identity for later cache keys."""
        if benchmark.target_train is None:
            return base, self.base_id
        model, path = self.finetuned(base, tokenizer, benchmark.target_train, "target")
        return model, path.name

    def retain_reference(self, base: PreTrainedModel, tokenizer: Any,
                         benchmark: Benchmark) -> tuple[PreTrainedModel, Path] | None:
        """The same recipe without the forget split (for forget quality); None where not applicable."""
        if benchmark.target_train is None or not self.target_cfg.build_retain_reference:
            return None
        return self.finetuned(base, tokenizer, benchmark.retain_train, "retain_reference")
