"""Reading the model: hooks that capture down_proj inputs (keys) and layer outputs (h_L) at chosen positions.

Every reader stops the forward pass (StopForward) once it has what it needs: the deeper layers would be
wasted work.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from unierase.edit.prompts import Encoded


class StopForward(Exception):
    """Raised by a hook once everything needed is captured: the deeper layers would be wasted work."""


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients while optimising delta: less memory, no weight-gradient work."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def hooks(pairs: Sequence[tuple[torch.nn.Module, str, Any]]) -> Iterator[None]:
    """Register (module, "pre" | "post", fn) hooks for the duration of the block."""
    handles = [module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn)
               for module, kind, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden_states(output: Any) -> Tensor:
    """A decoder layer's hidden states, whether it returns a tuple or a tensor."""
    return output[0] if isinstance(output, tuple) else output


def capture(model: torch.nn.Module, enc: Encoded, key_modules: dict[int, torch.nn.Module],
            h_module: torch.nn.Module | None, batch_size: int) -> tuple[dict[int, Tensor], Tensor | None]:
    """down_proj inputs (rows x m per layer) and h_L (rows x d) at each row's lookup position, fp32."""
    keys: dict[int, list[Tensor]] = {layer: [] for layer in key_modules}
    values: list[Tensor] = []
    deepest = max(key_modules, default=None)

    def key_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            keys[layer].append(args[0][rows, lookup].float())
            if h_module is None and layer == deepest:
                raise StopForward
        return hook

    def h_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        values.append(hidden_states(output)[rows, lookup].float())
        raise StopForward  # L is the deepest edited layer: nothing after it is needed

    pairs = [(module, "pre", key_hook(layer)) for layer, module in key_modules.items()]
    if h_module is not None:
        pairs.append((h_module, "post", h_hook))
    run_device = next(model.parameters()).device
    with hooks(pairs), torch.no_grad():
        for start in range(0, len(enc.last), batch_size):
            chunk = enc.rows(start, start + batch_size)
            width = int(chunk.lookup.max()) + 1  # causal: nothing after the deepest lookup is needed
            rows, lookup = torch.arange(len(chunk.last), device=run_device), chunk.lookup.to(run_device)
            with contextlib.suppress(StopForward):
                model(input_ids=chunk.input_ids[:, :width].to(run_device),
                      attention_mask=chunk.attention_mask[:, :width].to(run_device), use_cache=False)
    return {layer: torch.cat(parts) for layer, parts in keys.items()}, (torch.cat(values) if values else None)
