"""The edit state: everything a sequential run persists between requests and rounds.

The cumulative weight change Delta W_l, the keys of every edited request (which later edits must leave
alone), the protected keys, the context templates and the token ids. On a freshly loaded Stage A model,
`restore` rebuilds the edited weights as base + Delta W.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from unierase.edit.projector import projector_hash
from unierase.io import atomic_dir, atomic_write_json
from unierase.models import ModelConfig, module_by_name


@dataclass
class EditState:
    """The edit so far; `save` / `load` round-trip it, `restore` re-applies it to a fresh Stage A model."""
    layers: list[int]
    projector_hash: str
    config: dict[str, Any]
    context_templates: list[str] | None = None
    token_ids: dict[str, int] = field(default_factory=dict)  # target token string -> id
    done: list[str] = field(default_factory=list)  # request uids already edited
    delta: dict[int, Tensor] = field(default_factory=dict)  # cumulative Delta W_l, d x m, fp32
    past_keys: dict[int, Tensor] = field(default_factory=dict)  # K'_l, m x n_total, fp32
    protect_keys: dict[int, Tensor] = field(default_factory=dict)  # retain / token keys, m x n_protected
    values: dict[str, Tensor] = field(default_factory=dict)  # request uid -> z* (d), for inspection
    history: list[dict[str, Any]] = field(default_factory=list)  # per request: loss, steps, norms
    # In memory only: C_l = sum K'K'^T (+ weighted protected keys) and the fp32 base weights. They live on
    # the state, never at module level, so two runs in one process never share them.
    _C: dict[int, Tensor] = field(default_factory=dict, repr=False)
    _base: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def check(self, layers: list[int], p_hash: str, tokenizer: Any) -> None:
        """Resuming with other layers, another P or a re-numbered token would silently corrupt the edit."""
        if list(layers) != self.layers:
            raise ValueError(f"edit state was made for layers {self.layers}, not {list(layers)}")
        if p_hash != self.projector_hash:
            raise ValueError(f"edit state was made with projector {self.projector_hash}, not {p_hash}")
        for token, token_id in self.token_ids.items():
            if tokenizer.convert_ids_to_tokens(token_id) != token:
                raise ValueError(f"edit state maps {token!r} to id {token_id}, the tokenizer does not")

    def past_C(self, layer: int) -> Tensor:
        """C_l = K' K'^T (+ protect_weight * protected keys' K K^T): what later updates must not disturb."""
        if layer not in self._C:
            keys = self.past_keys[layer]
            C = keys @ keys.T
            if layer in self.protect_keys:
                protected = self.protect_keys[layer].to(C)
                C = C + self.config["protect_weight"] * (protected @ protected.T)
            self._C[layer] = C
        return self._C[layer]

    def add_keys(self, keys: dict[int, Tensor]) -> None:
        """Record a chunk's keys (m x n per layer) as past keys. C_l is rebuilt from all of them when next needed,
        not updated in place: a sum in another order rounds differently, and C_l must be the same whether the run
        got here in one process or resumed from disk (a few seconds per round at CPU scale)."""
        for layer, K in keys.items():
            self.past_keys[layer] = torch.cat([self.past_keys[layer], K.to(self.past_keys[layer])], dim=1)
            self._C.pop(layer, None)

    def save(self, directory: Path) -> None:
        """Tensors to state.safetensors, the rest to manifest.json, written atomically."""
        tensors = {f"{name}.{key}": tensor.detach().cpu().contiguous()
                   for name in ("delta", "past_keys", "protect_keys", "values")
                   for key, tensor in getattr(self, name).items()}
        with atomic_dir(Path(directory)) as tmp:
            save_file(tensors, tmp / "state.safetensors")
            atomic_write_json(tmp / "manifest.json", {
                "layers": self.layers, "projector_hash": self.projector_hash, "config": self.config,
                "context_templates": self.context_templates, "token_ids": self.token_ids,
                "done": self.done, "history": self.history,
            })

    @classmethod
    def load(cls, directory: Path) -> EditState:
        """A saved state; call `restore` before editing further or reading the weights."""
        directory = Path(directory)
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        tensors = load_file(directory / "state.safetensors")
        state = cls(layers=manifest["layers"], projector_hash=manifest["projector_hash"],
                    config=manifest["config"], context_templates=manifest["context_templates"],
                    token_ids=manifest["token_ids"], done=manifest["done"], history=manifest["history"])
        for name, tensor in tensors.items():
            kind, key = name.split(".", 1)
            getattr(state, kind)[key if kind == "values" else int(key)] = tensor
        return state

    def restore(self, model: torch.nn.Module, tokenizer: Any, projectors: dict[int, Tensor],
                model_cfg: ModelConfig) -> None:
        """On a freshly loaded base (token-trained) model: weights = base + sum Delta W."""
        missing = [layer for layer in self.layers if layer not in projectors]
        if missing:
            raise ValueError(f"no null-space projector for edited layer(s) {missing}")
        self.check(self.layers, projector_hash({layer: projectors[layer] for layer in self.layers}), tokenizer)
        template = self.config.get("module_template") or model_cfg.down_proj_template
        for layer in self.layers:
            weight = module_by_name(model, template.format(layer)).weight
            if weight.shape != self.delta[layer].shape:
                raise ValueError(f"edit state delta for layer {layer} has shape {tuple(self.delta[layer].shape)},"
                                 f" the model's down_proj {tuple(weight.shape)}")
            self._base[layer] = weight.detach().float().clone()
            self.delta[layer] = self.delta[layer].to(weight.device)
            self.write_weight(layer, weight)

    def attach(self, modules: dict[int, torch.nn.Module]) -> None:
        """Bind to the down_proj modules being edited; a fresh state takes their weights as the base."""
        for layer, module in modules.items():
            weight = module.weight
            if layer not in self._base:
                if self.done:
                    raise ValueError("a loaded edit state must be restored first: state.restore(model, ...)")
                self._base[layer] = weight.detach().float().clone()
            self.delta[layer] = self.delta.get(layer, torch.zeros_like(self._base[layer])).to(weight.device)
            keys = self.past_keys.get(layer, torch.zeros(module.in_features, 0))
            self.past_keys[layer] = keys.to(weight.device)

    def write_weight(self, layer: int, weight: Tensor) -> None:
        """weight = base + cumulative Delta, computed in fp32 and cast once: rounding never accumulates."""
        with torch.no_grad():
            weight.copy_(self._base[layer] + self.delta[layer])
