"""The driver: edit a model for a list of requests, chunk by chunk, and keep the edit state.

For each chunk of `edit.batch_size` requests: the values z* on the unchanged model (values.py), then
the closed-form update of each edited layer (update.py) with the keys read on the model as updated so
far (keys.py); finally the chunk's keys join the past keys every later update must leave alone
(state.py). The edit changes only the down_proj weights of `edit.layers`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from unierase.edit.config import EditConfig, EditRequest
from unierase.edit.keys import EditRun, continuation_keys, edited_modules, request_keys
from unierase.edit.projector import projector_hash
from unierase.edit.prompts import generate_context_templates, uses_subject
from unierase.edit.state import EditState
from unierase.edit.update import update_layers
from unierase.edit.values import optimise_values, value_inputs
from unierase.models import ModelConfig, module_by_name
from unierase.progress import Progress

log = logging.getLogger(__name__)


def edit_chunk(run: EditRun, chunk: list[EditRequest], state: EditState) -> None:
    """One closed-form update for a chunk: all z* on the unchanged model, then the layers in order."""
    pairs = [(r.question, r.subject) for r in chunk]
    enc, owner, is_kl, uses = value_inputs(run.tokenizer, chunk, run.templates, run.cfg, run.model_cfg)
    Z, infos = optimise_values(run.model, enc, owner, is_kl, [r.target_sequence(run.cfg) for r in chunk],
                               run.h_module, run.cfg)  # d x n
    for r, (request, use, info) in enumerate(zip(chunk, uses, infos)):
        state.values[request.uid] = Z[:, r].cpu()
        state.history.append({"uid": request.uid, "subject_key": use, **info})

    def write(layer: int, delta: Tensor) -> None:
        state.delta[layer] += delta.to(state.delta[layer])
        state.write_weight(layer, run.key_modules[layer].weight)

    def protected(layer: int) -> Tensor:
        C = state.past_C(layer)
        return C + run.penalties[layer] if run.penalties else C

    update_layers(run, pairs, Z, protected, write)
    new_keys, _ = request_keys(run, pairs, state.layers)
    state.add_keys(new_keys)
    state.done += [r.uid for r in chunk]


def check_target(request: EditRequest, vocab_size: int) -> None:
    """A target must be one token id of the vocabulary (a string would be silently wrong)."""
    if isinstance(request.target_id, bool) or not isinstance(request.target_id, int):
        raise ValueError(f"request {request.uid}: target must be a single token id, got {request.target_id!r}")
    if not 0 <= request.target_id < vocab_size:
        raise ValueError(f"request {request.uid}: target id {request.target_id} outside the vocabulary "
                         f"({vocab_size})")


def protected_keys(run: EditRun, kinds: Sequence[str], retain: Sequence[tuple[str, str | None]] | None,
                   retain_answers: Sequence[tuple[str, Sequence[int]]] | None,
                   token_texts: Sequence[tuple[str, Sequence[int]]] | None) -> dict[int, Tensor]:
    """The keys of every kind in `kinds`, side by side (m x n_protected per layer)."""
    readers = {
        "retain_keys": lambda: request_keys(run, list(retain), run.cfg.layers)[0],
        "retain_answer_keys": lambda: continuation_keys(run, list(retain_answers), run.cfg.layers),
        "token_keys": lambda: continuation_keys(run, list(token_texts), run.cfg.layers),
    }
    parts = [readers[kind]() for kind in kinds]
    return {layer: torch.cat([part[layer] for part in parts], dim=1) for layer in run.cfg.layers}


def apply_edits(
    model: torch.nn.Module, tokenizer: Any, requests: Sequence[EditRequest], cfg: EditConfig,
    model_cfg: ModelConfig, projectors: dict[int, Tensor], state: EditState | None = None,
    retain: Sequence[tuple[str, str | None]] | None = None,
    token_texts: Sequence[tuple[str, Sequence[int]]] | None = None,
    covariances: dict[int, Tensor] | None = None,
    retain_answers: Sequence[tuple[str, Sequence[int]]] | None = None,
) -> EditState:
    """Edit `model` in place for every request not yet in `state.done`; returns the (updated) state.

    `retain` (question, subject) pairs, retain questions no evaluation scores, feed edit.protect=[retain_keys];
    `retain_answers` (question, answer + turn-end ids) of the same questions feed edit.protect=[retain_answer_keys];
    `token_texts` (question, token + refusal + token ids) pairs, Stage A's training texts, feed
    edit.protect=[token_keys]. `covariances` (C0 per layer, the statistics P is built from) feed
    edit.covariance_weight.
    """
    key_modules, _ = edited_modules(model, cfg, model_cfg)
    missing = [layer for layer in cfg.layers if layer not in projectors]
    if missing:
        raise ValueError(f"no null-space projector for layer(s) {missing}")
    vocab_size = model.get_output_embeddings().weight.shape[0]
    for request in requests:
        check_target(request, vocab_size)
    needs = {"retain_keys": ("retain questions", retain), "retain_answer_keys": ("retain answers", retain_answers),
             "token_keys": ("the token's training texts", token_texts)}
    if cfg.covariance_weight and not all(layer in (covariances or {}) for layer in cfg.layers):
        raise ValueError(f"edit.covariance_weight={cfg.covariance_weight} needs C0 of every edited layer {cfg.layers}")
    for kind in cfg.protect:
        if not needs[kind][1] and (state is None or not state.protect_keys):
            raise ValueError(f"edit.protect lists {kind}, which needs {needs[kind][0]}")

    p_hash = projector_hash({layer: projectors[layer] for layer in cfg.layers})
    if state is None:
        state = EditState(layers=list(cfg.layers), projector_hash=p_hash, config=asdict(cfg))
    state.check(cfg.layers, p_hash, tokenizer)
    state.attach(key_modules)

    was_training = model.training
    model.eval()
    try:
        if state.context_templates is None:  # once per (model, seed), then persisted with the state
            state.context_templates = (cfg.context_templates if cfg.context_templates is not None
                                       else generate_context_templates(model, tokenizer, cfg.seed))
        run = EditRun.create(model, tokenizer, cfg, model_cfg, projectors, state.context_templates, covariances)
        if cfg.protect and not state.protect_keys:  # read once, on the model before any edit
            state.protect_keys = protected_keys(run, cfg.protect, retain, retain_answers, token_texts)
            state._C.clear()
        done = set(state.done)
        pending = [r for r in requests if r.uid not in done]
        fallbacks = sum(not uses_subject(tokenizer, r, cfg, model_cfg) for r in pending)
        if cfg.key_position == "subject_last" and fallbacks:
            log.warning("subject not found for %d of %d requests: keyed on the last prompt token",
                        fallbacks, len(pending))
        for request in pending:
            state.token_ids[tokenizer.convert_ids_to_tokens(request.target_id)] = request.target_id
        bar = Progress(len(pending), "edit", "request")
        for start in range(0, len(pending), cfg.batch_size):
            chunk = pending[start:start + cfg.batch_size]
            edit_chunk(run, chunk, state)
            bar.step(len(chunk))
        bar.close()
    finally:
        model.train(was_training)
    for layer in cfg.layers:
        ratio = float(state.delta[layer].norm() / state._base[layer].norm())
        log.info("layer %d: |Delta W| / |W| = %.4g", layer, ratio)
    return state


def edited_fraction(model: torch.nn.Module, layers: list[int],
                    down_proj_template: str = "model.layers.{}.mlp.down_proj") -> float:
    """Share of all parameters the edit may change (3.66 % for Llama-3.1-8B, layers 4..8)."""
    edited = sum(module_by_name(model, down_proj_template.format(layer)).weight.numel() for layer in layers)
    return edited / sum(p.numel() for p in model.parameters())
