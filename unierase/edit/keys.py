"""Computing the keys: the down_proj inputs k at a request's key position, the columns of the update's K.

A request's key at layer l is 1/2 (k on T_0 + mean of k on T_1..T_n), read at the subject's last token
(or the last prompt token). The protected keys of edit.protect=token_keys are read at every position of
Stage A's training continuations instead (docs/algorithm.md, "Stage B: the unlearning edit").
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unierase.chat import chat_prompt, pad_rows
from unierase.edit.capture import StopForward, capture, hooks
from unierase.edit.config import EditConfig, EditRequest
from unierase.edit.prompts import encode, rewriting_texts, uses_subject
from unierase.models import ModelConfig, module_by_name


@dataclass
class EditRun:
    """What one edit reads keys and values on and updates: the model, its edited modules (down_proj per
    layer; the last edited layer, whose output h_L the values target), the null-space projectors on the
    model's device and the context templates. Built by `create`."""
    model: torch.nn.Module
    tokenizer: Any
    cfg: EditConfig
    model_cfg: ModelConfig
    key_modules: dict[int, torch.nn.Module]
    h_module: torch.nn.Module
    projectors: dict[int, Tensor]
    templates: list[str]
    penalties: dict[int, Tensor]  # covariance_weight * C0 per layer (empty when the weight is 0)

    @classmethod
    def create(cls, model: torch.nn.Module, tokenizer: Any, cfg: EditConfig, model_cfg: ModelConfig,
               projectors: dict[int, Tensor], templates: list[str],
               covariances: dict[int, Tensor] | None = None) -> EditRun:
        """Resolve the edited modules by name; projectors and penalties of cfg.layers go to the device, in float32."""
        key_modules, h_module = edited_modules(model, cfg, model_cfg)
        run_device = next(model.parameters()).device

        def on_device(tensors: dict[int, Tensor], scale: float = 1.0) -> dict[int, Tensor]:
            return {layer: scale * tensor.to(run_device, torch.float32)
                    for layer, tensor in tensors.items() if layer in cfg.layers}

        penalties = on_device(covariances or {}, cfg.covariance_weight) if cfg.covariance_weight else {}
        return cls(model, tokenizer, cfg, model_cfg, key_modules, h_module, on_device(projectors), templates,
                   penalties)


def edited_modules(model: torch.nn.Module, cfg: EditConfig,
                   model_cfg: ModelConfig) -> tuple[dict[int, torch.nn.Module], torch.nn.Module]:
    """down_proj of every edited layer, and the last edited layer (its output is h_L)."""
    template = cfg.module_template or model_cfg.down_proj_template
    key_modules = {layer: module_by_name(model, template.format(layer)) for layer in cfg.layers}
    return key_modules, module_by_name(model, model_cfg.layer_template.format(cfg.layers[-1]))


def group_mean(rows: Tensor, n_requests: int) -> Tensor:
    """(n * G) x dim rows, G inputs per request -> dim x n keys: 1/2 (T_0 + mean of T_1..T_n)."""
    grouped = rows.view(n_requests, -1, rows.shape[-1])
    keys = grouped[:, 0] if grouped.shape[1] == 1 else 0.5 * (grouped[:, 0] + grouped[:, 1:].mean(1))
    return keys.T.contiguous()



def request_keys(run: EditRun, requests: Sequence[tuple[str, str | None]], layers: list[int],
                 with_values: bool = False) -> tuple[dict[int, Tensor], Tensor | None]:
    """Keys (m x n per layer) of (question, subject) pairs and, optionally, h_L on T_0 (d x n)."""
    items, use = [], []
    for question, subject in requests:
        request = EditRequest(question, subject, -1, "")
        use.append(uses_subject(run.tokenizer, request, run.cfg, run.model_cfg))
        items += rewriting_texts(run.tokenizer, request, run.templates, run.cfg, run.model_cfg, use[-1])
    enc = encode(run.tokenizer, items)
    rows, h = capture(run.model, enc, {layer: run.key_modules[layer] for layer in layers},
                      run.h_module if with_values else None, run.cfg.forward_batch_size)
    keys = {layer: group_mean(r, len(requests)) for layer, r in rows.items()}
    if h is None:
        return keys, None
    return keys, h.view(len(requests), -1, h.shape[-1])[:, 0].T.contiguous()  # h_L on T_0 only


def continuation_keys(run: EditRun, items: Sequence[tuple[str, Sequence[int]]],
                      layers: list[int]) -> dict[int, Tensor]:
    """Keys (m x n per layer) at every continuation position of `chat prompt + continuation`."""
    sequences, starts = [], []
    for question, continuation in items:
        prompt = run.tokenizer(chat_prompt(run.tokenizer, question, run.model_cfg), add_special_tokens=False).input_ids
        sequences.append(prompt + list(continuation))
        starts.append(len(prompt))
    keys: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    current: dict[int, Tensor] = {}

    def key_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            current[layer] = args[0].float()
            if layer == max(layers):
                raise StopForward
        return hook

    run_device = next(run.model.parameters()).device
    with hooks([(run.key_modules[layer], "pre", key_hook(layer)) for layer in layers]), torch.no_grad():
        for first in range(0, len(sequences), run.cfg.forward_batch_size):
            batch = sequences[first:first + run.cfg.forward_batch_size]
            ids, mask = pad_rows(batch, 0, device=run_device)
            with contextlib.suppress(StopForward):
                run.model(input_ids=ids, attention_mask=mask, use_cache=False)
            for layer in layers:
                keys[layer] += [current[layer][i, starts[first + i]:len(row)] for i, row in enumerate(batch)]
    return {layer: torch.cat(parts).T.contiguous() for layer, parts in keys.items()}

