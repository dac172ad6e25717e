"""UniErase as an `Unlearner`: Stage A (unlearning token) once, Stage B (AlphaEdit) per request.

Expensive artifacts are cached on disk and keyed by what produced them: the token (per model, token
config and training questions; a universal token is trained once per model on generic questions) and
the second-moment statistics / null-space projectors (per model, layers, corpus, sample count). A
request with a cached universal token and cached statistics therefore runs the edit only.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from unierase.chat import answer_ids, chat_prompt, turn_end_id
from unierase.config import ConfigError, check
from unierase.context import RunContext
from unierase.edit import (
    EditConfig,
    EditRequest,
    EditState,
    apply_edits,
    edited_fraction,
    nullspace_projectors,
    second_moments,
)
from unierase.evaluation.engine import generate_ids
from unierase.method import Unlearner
from unierase.models import ModelConfig, autocast_dtype
from unierase.records import QA, Benchmark
from unierase.token import TokenArtifact, TokenConfig, artifact_key, refusal_for, train_unlearning_token

log = logging.getLogger(__name__)


@dataclass
class UniEraseConfig:
    name: str = "unierase"
    kind: str = "unierase"
    token: TokenConfig = field(default_factory=TokenConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    generic_questions: int = 400  # token.train_on=generic: how many generic questions train it
    # false: the reviewers' ablation (conf/method/alphaedit_refusal.yaml): no unlearning token; the same edit makes
    # each question's first answer token the first token of its refusal (value_target=token_continuation: the
    # whole refusal, then the turn end).
    learned_token: bool = True

    def __post_init__(self) -> None:
        check(self, choices={"kind": ("unierase",)}, at_least={"generic_questions": 1})
        if not self.learned_token and "token_keys" in self.edit.protect:
            raise ConfigError("edit.protect", "lists token_keys, which protects the unlearning token's training "
                              "texts: with learned_token=false there is no token (use [] or [retain_keys])")


def first_token_rate(model: PreTrainedModel, tokenizer: Any, edits: list[EditRequest], model_cfg: ModelConfig) -> float:
    """Fraction of the edited questions whose greedy first answer token is their target (Stage B's goal)."""
    prompts = [chat_prompt(tokenizer, edit.question, model_cfg) for edit in edits]
    dtype = autocast_dtype(model_cfg) if model.device.type == "cpu" else None
    firsts = generate_ids(model, tokenizer, prompts, [1] * len(prompts), 16, autocast_dtype=dtype)
    return sum(ids == [edit.target_id] for ids, edit in zip(firsts, edits)) / len(edits)


class UniErase(Unlearner):
    def __init__(self, cfg: UniEraseConfig):
        self.cfg = cfg
        self.artifact: TokenArtifact | None = None
        self.projectors: dict = {}
        self.covariances: dict = {}  # C0 per layer, kept only for edit.covariance_weight
        self.state: EditState | None = None
        self.model_cfg: ModelConfig | None = None
        self.timings: dict[str, float] = {}
        self.cache_hits: dict[str, bool] = {}
        self.first_token_rate: float | None = None  # of the latest request
        self.pool: list[str] = []  # the refusal lines questions are paired with

    def _token(self, model: PreTrainedModel, tokenizer: Any, questions: list[str], benchmark: Benchmark,
               ctx: RunContext) -> TokenArtifact:
        cfg = self.cfg.token
        anchors = [(qa.question, qa.training_answer) for qa in benchmark.retain_train]
        key = artifact_key(ctx.model_id, cfg, questions, benchmark.refusals, ctx.model_cfg, self.cfg.edit.layers,
                           anchors)
        directory = ctx.cache_dir / "tokens" / f"{cfg.train_on}-{key}"
        self.cache_hits["token"] = (directory / "token.json").is_file()
        if self.cache_hits["token"]:
            log.info("reusing cached unlearning token %s", directory)
            artifact = TokenArtifact.load(directory)
            artifact.apply(model, tokenizer)
            return artifact
        artifact = train_unlearning_token(model, tokenizer, questions, benchmark.refusals, cfg, ctx.model_cfg,
                                          ctx.trainer_cfg, self.cfg.edit.layers, anchors)
        artifact.save(directory, model)
        return artifact

    def prepare(self, model: PreTrainedModel, tokenizer: Any, questions: list[QA], benchmark: Benchmark,
                ctx: RunContext) -> PreTrainedModel:
        start = time.perf_counter()
        self.model_cfg = ctx.model_cfg
        if not self.cfg.learned_token:
            self.pool = list(benchmark.refusals)[: self.cfg.token.refusal_lines]
        else:
            if self.cfg.token.train_on == "generic":
                texts = benchmark.generic_questions[: self.cfg.generic_questions]
            else:
                texts = [qa.question for qa in questions]
            self.artifact = self._token(model, tokenizer, texts, benchmark, ctx)
            self.pool = self.artifact.pool
        self.timings["time.token_s"] = time.perf_counter() - start

        start = time.perf_counter()
        edit = self.cfg.edit
        template = edit.module_template or ctx.model_cfg.down_proj_template
        # The corpus never contains the new token, so statistics of the token model equal the target's.
        moments = second_moments(
            model, tokenizer, edit.layers, Path(edit.mom2_corpus), edit.mom2_n_samples,
            edit.mom2_chunk_tokens, edit.mom2_batch_size, ctx.cache_dir / "statistics", ctx.model_id,
            template, autocast_dtype(ctx.model_cfg) if model.device.type == "cpu" else None,
        )
        self.cache_hits["statistics"] = moments.cache_hit
        self.covariances = moments.C0 if edit.covariance_weight else {}
        self.projectors = nullspace_projectors(moments, edit.nullspace_threshold, edit.nullspace_mode,
                                               ctx.cache_dir / "statistics")
        self.timings["time.statistics_s"] = time.perf_counter() - start
        return model

    def continuation(self, tokenizer: Any, question: str, token: str) -> tuple[int, ...]:
        """The refusal Stage A pairs with `question`, then the closing token (2.3, 2.5)."""
        refusal = refusal_for(question, self.pool, self.cfg.token.refusal_salt)
        ids = tuple(tokenizer(token + refusal + token, add_special_tokens=False).input_ids)
        if ids[0] != tokenizer.convert_tokens_to_ids(token):
            raise ValueError(f"{token!r} does not tokenise as one token at the start of {token + refusal!r}")
        return ids

    def refusal_ids(self, tokenizer: Any, question: str) -> tuple[int, ...]:
        """learned_token=false: the question's refusal, then the turn end (the answer the edit writes directly)."""
        refusal = refusal_for(question, self.pool, self.cfg.token.refusal_salt)
        return (*tokenizer(refusal, add_special_tokens=False).input_ids, turn_end_id(tokenizer))

    def token_texts(self, tokenizer: Any) -> list[tuple[str, tuple[int, ...]]]:
        """Stage A's training texts as (question, U + refusal + U ids), for edit.protect=token_keys."""
        if self.artifact is None:
            return []
        return [(question, self.continuation(tokenizer, question, token))
                for question, token in self.artifact.token_of.items()]

    def requests(self, tokenizer: Any, request: list[QA]) -> list[EditRequest]:
        """One request per QA; under edit.value_target=token_continuation its continuation is the
        question's refusal and the closing token, as Stage A trained them."""
        edits = []
        for qa in request:
            if self.artifact is None:
                token_id, *continuation = self.refusal_ids(tokenizer, qa.question)
            else:  # a universal token serves every question
                token = self.artifact.token_of.get(qa.question, self.artifact.tokens[0])
                token_id, *continuation = self.continuation(tokenizer, qa.question, token)
            edits.append(EditRequest(qa.question, qa.subject, token_id, qa.uid, tuple(continuation)))
        return edits

    def unlearn(self, model: PreTrainedModel, tokenizer: Any, request: list[QA], benchmark: Benchmark,
                ctx: RunContext) -> PreTrainedModel:
        start = time.perf_counter()
        unscored = benchmark.unscored_retain()
        retain = [(qa.question, qa.subject) for qa in unscored]
        retain_answers = [(qa.question, answer_ids(tokenizer, qa.answer)) for qa in unscored]
        edits = self.requests(tokenizer, request)
        self.state = apply_edits(model, tokenizer, edits, self.cfg.edit, ctx.model_cfg,
                                 self.projectors, self.state, retain=retain, token_texts=self.token_texts(tokenizer),
                                 covariances=self.covariances, retain_answers=retain_answers)
        self.timings["time.edit_s"] = self.timings.get("time.edit_s", 0.0) + time.perf_counter() - start
        self.first_token_rate = first_token_rate(model, tokenizer, edits, ctx.model_cfg)
        return model

    def save_state(self, directory: Path, model: PreTrainedModel, tokenizer: Any) -> None:
        """Only the edit state (weight deltas, past keys): the token model plus it rebuilds the weights."""
        self.state.save(directory / "edit")

    def load_state(self, directory: Path, model: PreTrainedModel, tokenizer: Any) -> PreTrainedModel:
        self.state = EditState.load(directory / "edit")
        self.state.restore(model, tokenizer, self.projectors, self.model_cfg)
        return model

    def metrics(self, model: PreTrainedModel) -> dict[str, float]:
        template = self.cfg.edit.module_template or self.model_cfg.down_proj_template
        return {
            "unierase.edited_fraction": edited_fraction(model, self.cfg.edit.layers, template),
            "unierase.token_cached": float(self.cache_hits.get("token", False)),
            "unierase.statistics_cached": float(self.cache_hits.get("statistics", False)),
            "unierase.first_token_rate": self.first_token_rate,
            **self.timings,
        }
