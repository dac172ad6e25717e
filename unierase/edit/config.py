"""The edit's settings (EditConfig) and one thing to edit (EditRequest)."""
from __future__ import annotations

from dataclasses import dataclass, field

from unierase.config import ConfigError, check

PROTECTED_KEYS = ("retain_keys", "retain_answer_keys", "token_keys")


@dataclass
class EditConfig:
    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    module_template: str | None = None  # None: the model config's down_proj_template
    key_position: str = "subject_last"  # subject_last | last
    # The reference drivers use 10 steps, EasyEdit's yaml 25; early stopping makes extra steps free
    # once converged, and small models need them.
    v_steps: int = 25
    v_lr: float = 0.1
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    nullspace_threshold: float = 2e-2
    nullspace_mode: str = "absolute"  # absolute | relative (threshold * largest eigenvalue) | none (P = I)
    L2: float = 10.0
    batch_size: int = 1
    context_templates: list[str] | None = None  # T_1..T_n, each containing "{}"; None: generate
    context_layout: str = "in_user_turn"  # in_user_turn | reference
    # The corpus folder itself; conf/method/unierase.yaml sets ${paths.data_dir}/corpus. The statistics
    # cache key hashes the files' names and contents, never this path.
    mom2_corpus: str = "corpus"
    mom2_n_samples: int | None = None  # None: every chunk
    mom2_chunk_tokens: int = 1024
    mom2_batch_size: int = 4
    # Keys every update must leave alone besides the past requests' (C), any of: retain_keys, the keys of the
    # benchmark's retain questions that no evaluation split scores (at the edit's key position);
    # retain_answer_keys, the keys at every answer token of those same questions (the positions an answer is
    # generated through, which retain_keys never reads; issue #24); token_keys, the keys at the unlearning token
    # and its refusal in Stage A's own training texts, so the edit does not undo the token's "U -> refusal"
    # behaviour (docs/algorithm.md, "Departures from the paper"). Empty: the paper.
    protect: list[str] = field(default_factory=list)
    protect_weight: float = 1.0
    # Project option: covariance_weight * C0 joins C as well, MEMIT's penalty on changing W k for the corpus keys,
    # weighted by how much each direction is used. It works where P cannot shield (a flat C0 spectrum) and grows
    # no weaker as rounds accumulate. 0 = the paper.
    covariance_weight: float = 0.0
    forward_batch_size: int = 16  # sequences per forward pass when measuring keys
    value_autocast: str | None = None  # e.g. "bfloat16": z* optimisation forwards under autocast (CPU speed)
    # token: z* is supervised on the target token alone, as in the paper. token_continuation: also on the
    # request's continuation (the refusal and the closing token), ROME-style multi-token targets
    # (docs/algorithm.md, "Departures from the paper").
    value_target: str = "token"
    # Project option against token suppression (issue #21): with token_continuation, also train z* so that with
    # the target token banned the next choice is the continuation's first token (the refusal's), weighted so.
    # 0 = the paper's objective.
    suppressed_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.protect, str):
            raise ConfigError("protect", f"must be a list (e.g. [token_keys]), got {self.protect!r}")
        self.protect = list(self.protect)
        # Layer indices below the model's depth: unierase/validate.py (it needs the model's config).
        check(self, at_least={"layers": 0, "v_steps": 1, "v_weight_decay": 0, "kl_factor": 0, "early_stop_loss": 0,
                              "nullspace_threshold": 0, "L2": 0, "batch_size": 1, "mom2_n_samples": 1,
                              "mom2_chunk_tokens": 2, "mom2_batch_size": 1, "protect_weight": 0, "covariance_weight": 0,
                              "forward_batch_size": 1, "suppressed_weight": 0},
              positive=("v_lr", "clamp_norm_factor"), seeds=("seed",),
              choices={"key_position": ("subject_last", "last"), "context_layout": ("in_user_turn", "reference"),
                       "nullspace_mode": ("absolute", "relative", "none"), "protect": PROTECTED_KEYS,
                       "value_target": ("token", "token_continuation"),
                       "value_autocast": ("bfloat16", "float16", "float32")})
        if self.suppressed_weight and self.value_target != "token_continuation":
            raise ConfigError("suppressed_weight", "needs value_target=token_continuation (the refusal to fall back "
                              "on when the target token is banned)")
        if len(set(self.protect)) != len(self.protect):
            raise ConfigError("protect", f"lists a kind of key twice: {self.protect}")
        self.layers = sorted({int(layer) for layer in self.layers})
        if not self.layers:
            raise ConfigError("layers", "must list at least one layer")
        if self.context_templates is not None:
            self.context_templates = list(self.context_templates)
        for i, template in enumerate(self.context_templates or []):
            if template.count("{}") != 1:
                raise ConfigError(f"context_templates[{i}]", f"must contain '{{}}' exactly once, got {template!r}")
        if self.module_template is not None and self.module_template.count("{}") != 1:
            raise ConfigError("module_template", f"must contain '{{}}' (the layer index) once, got "
                              f"{self.module_template!r}")


@dataclass(frozen=True)
class EditRequest:
    """One question whose first answer token should become `target_id` (the unlearning token)."""
    question: str
    subject: str | None
    target_id: int
    uid: str
    continuation: tuple[int, ...] = ()  # tokens after the target, supervised under value_target=token_continuation

    def target_sequence(self, cfg: EditConfig) -> list[int]:
        """The tokens z* is optimised to produce: the target, then under token_continuation its continuation."""
        if cfg.value_target == "token_continuation":
            return [self.target_id, *self.continuation]
        return [self.target_id]
