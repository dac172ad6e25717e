"""Stage A's settings: the three training phases, the phase-3 weight noise, and every other knob.

`artifact_key` hashes `asdict(TokenConfig)`, so adding, removing or renaming a field changes the
cache key of every stored token.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from unierase.config import check

PERTURB_MODES = ("relative_std", "reference", "absolute", "none")
SCHEDULES = ("per_layer", "all_layers")
REFUSAL_POOLS = ("idontknow_100", "reference_99")  # = benchmarks.tofu.refusal_pool's variants


@dataclass
class PhaseConfig:
    epochs: int  # 0 skips the phase
    lr: float

    def __post_init__(self) -> None:
        check(self, at_least={"epochs": 0}, positive=("lr",))


@dataclass
class PerturbConfig:
    """Phase-3 weight perturbation of `down_proj` (see perturbation.py)."""

    mode: str = "relative_std"  # relative_std | reference | absolute | none
    alpha: float = 0.05  # relative_std: sigma = alpha * std(W); a guess, worth tuning in 0.01-0.1
    clip: float = 1.0  # noise clipped to [-clip*sigma, clip*sigma] (relative_std, absolute)
    sigma_abs: float = 1e-3  # absolute mode sigma (ablation only; no reference value)
    layers: list[int] | None = None  # None = the edit layers passed by the caller
    schedule: str = "per_layer"  # per_layer | all_layers

    def __post_init__(self) -> None:
        check(self, choices={"mode": PERTURB_MODES, "schedule": SCHEDULES},
              at_least={"alpha": 0, "sigma_abs": 0, "layers": 0}, positive=("clip",))


@dataclass
class TokenConfig:
    """Every Stage A knob (docs/algorithm.md, "Stage A: the unlearning token"); the defaults are the
    method's standard setup. The fields marked "project addition" are ours, not the paper's
    (docs/algorithm.md, "Departures from the paper")."""

    samples_per_token: int = 400
    init_std: float | None = None  # None = the model's initializer_range
    share: bool = True  # untied models: the lm_head row is a frozen copy of the initial input row
    # Project addition. Tied models only: give the model its own lm_head first. A tied row is both the
    # input that steers the model and an output logit, so on small models its growth makes U appear
    # inside ordinary answers; untied, it behaves as on an untied model (with `share` as above).
    untie_output: bool = False
    # Project addition. Ordinary QA pairs (the retain set) added to every phase with their own answers
    # as labels. Only an output row that trains (tied, or untied with share=false) learns from them: it
    # is pushed down wherever U is not the answer, so U does not leak into ordinary answers. 0 = the
    # reference.
    output_anchors: int = 0
    # idontknow_100 | reference_99. A record only (it enters the cache key): the lines come from the benchmark,
    # whose refusal_pool the Hydra config interpolates here.
    refusal_pool: str = "idontknow_100"
    refusal_salt: str = ""
    # Project addition. Use only the first n lines of the pool (null = all). One row of a small model
    # cannot encode a 100-way pseudo-random choice; the refusal style is what must be learned.
    refusal_lines: int | None = None
    max_length: int = 128
    batch_size: int = 16
    phase1: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=5, lr=1e-3))
    phase2: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=3, lr=1e-4))
    phase3: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=2, lr=1e-4))  # epochs per layer
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    shuffle: bool = False  # True: shuffle within token groups with the run seed
    on_truncation: str = "error"  # error | skip (fewer than two U survive truncation)
    train_on: str = "forget"  # forget | generic (one universal token, whatever the item count)
    sanity_questions: int = 5  # forced-U greedy generations logged after phases 2 and 3
    sanity_max_new_tokens: int = 48
    save_full_model: bool = False  # TokenArtifact.save(..., model=) also writes the enlarged model
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TokenConfig:
        """Every range and choice (the nested phases and perturbation check their own on construction)."""
        check(self, at_least={"samples_per_token": 1, "refusal_lines": 1, "output_anchors": 0, "max_length": 2,
                              "batch_size": 1, "sanity_questions": 0, "sanity_max_new_tokens": 1},
              positive=("init_std",), seeds=("seed",),
              choices={"refusal_pool": REFUSAL_POOLS, "on_truncation": ("error", "skip"),
                       "train_on": ("forget", "generic")})
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenConfig:
        """Build from a plain (e.g. Hydra `to_container`) dict; unknown keys are an error."""
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown token config key(s) {sorted(unknown)}")
        for name in ("phase1", "phase2", "phase3"):
            if isinstance(data.get(name), dict):
                data[name] = PhaseConfig(**data[name])
        if isinstance(data.get("perturb"), dict):
            data["perturb"] = PerturbConfig(**data["perturb"])
        return cls(**data).validate()
