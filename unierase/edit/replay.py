"""The forward pass each value-optimisation step (values.py) runs: only what delta can change."""
from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import Tensor

from unierase.edit.capture import StopForward, hidden_states
from unierase.edit.prompts import Encoded
from unierase.models import decoder_body, kv_cache_name


class SuffixReplay:
    """The model from layer L's output on, rerun per step only where delta can reach.

    delta enters the residual stream at layer L and at each row's lookup position, so every layer at
    earlier positions, and layers <= L at all positions, compute the same thing at every step. They run
    once: the positions before each lookup (the prefix) fill a KV cache, and the rest (the suffix) runs
    to layer L. A step then runs layers L+1.. on the suffixes only, against that cache. The rows are laid
    out with their lookups in one column (prefixes left-padded, suffixes right-padded), so delta lands in
    suffix column 0 of every row. The replay reuses the arguments the decoder passed each of its layers after L
    (mask, rotary embeddings, cache), recorded layer by layer because they can differ between layers (Gemma's
    sliding-window and global layers: other masks, Gemma 3 also other rotary embeddings), so it holds for any
    decoder whose body has `layers` and `norm`.
    """

    def __init__(self, model: torch.nn.Module, enc: Encoded, h_module: torch.nn.Module) -> None:
        body = decoder_body(model)
        if not hasattr(body, "layers") or not hasattr(body, "norm"):
            raise ValueError(f"{type(body).__name__} has no `layers` and `norm`: the value optimisation "
                             "replays the decoder layers after layer L")
        is_last = [layer is h_module for layer in body.layers]
        if not any(is_last):
            raise ValueError("the edit's last layer is not one of the decoder's `layers`")
        self.upper = list(body.layers)[is_last.index(True) + 1:]
        self.norm = body.norm
        run_device = enc.input_ids.device
        lookup, last = enc.lookup, enc.last
        width, length = int(lookup.max()), int((last - lookup).max()) + 1
        if width == 0:
            raise ValueError("every row's lookup is its first token: there is no prefix to cache")
        rows = len(last)
        prefix = torch.zeros(rows, width, dtype=torch.long, device=run_device)
        suffix = torch.zeros(rows, length, dtype=torch.long, device=run_device)
        prefix_mask, suffix_mask = torch.zeros_like(prefix), torch.zeros_like(suffix)
        for i, (start, end) in enumerate(zip(lookup.tolist(), last.tolist())):
            prefix[i, width - start:] = enc.input_ids[i, :start]
            prefix_mask[i, width - start:] = 1
            suffix[i, : end - start + 1] = enc.input_ids[i, start:end + 1]
            suffix_mask[i, : end - start + 1] = 1
        columns = torch.arange(width, device=run_device)
        prefix_positions = (columns - (width - lookup)[:, None]).clamp_min(0)
        suffix_positions = lookup[:, None] + torch.arange(length, device=run_device)
        cache_name = kv_cache_name(model)
        with torch.no_grad():
            self.prefix_cache = body(input_ids=prefix, attention_mask=prefix_mask, position_ids=prefix_positions,
                                     use_cache=True)[cache_name]
            cache = copy.deepcopy(self.prefix_cache)
            captured: dict[str, Any] = {}
            self.layer_kwargs: list[dict[str, Any]] = []

            def keep_h(module: torch.nn.Module, args: tuple, output: Any) -> None:
                captured["h"] = hidden_states(output)
                if not self.upper:
                    raise StopForward

            def keep_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                self.layer_kwargs.append(kwargs)
                if len(self.layer_kwargs) == len(self.upper):  # the last layer's arguments: nothing else to run
                    raise StopForward

            handles = [h_module.register_forward_hook(keep_h)]
            handles += [layer.register_forward_pre_hook(keep_arguments, with_kwargs=True) for layer in self.upper]
            try:
                with contextlib.suppress(StopForward):
                    body(input_ids=suffix, attention_mask=torch.cat([prefix_mask, suffix_mask], dim=1),
                         position_ids=suffix_positions, use_cache=True, **{cache_name: cache})
            finally:
                for handle in handles:
                    handle.remove()
        self.h = captured["h"]  # h_L on the suffixes: column 0 is each row's lookup
        self.cache = cache

    def hidden(self, delta_rows: Tensor) -> Tensor:
        """Final hidden states of the suffixes with `delta_rows` (rows x d) added to h_L at the lookups."""
        hidden = torch.cat([self.h[:, :1] + delta_rows.unsqueeze(1).to(self.h.dtype), self.h[:, 1:]], dim=1)
        fresh = copy.deepcopy(self.prefix_cache)  # the layers append the suffix to the cache they are given
        for layer, recorded in zip(self.upper, self.layer_kwargs):
            kwargs = {name: fresh if value is self.cache else value for name, value in recorded.items()}
            hidden = hidden_states(layer(hidden, **kwargs))
        return self.norm(hidden)
