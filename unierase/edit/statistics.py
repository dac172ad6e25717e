"""Second moments of preserved knowledge: C0_l = (1/N_tok) sum_t k_t k_t^T over the down_proj inputs k_t of
a generic corpus, per edited layer l.

C0 is what the null-space projector (projector.py) is built from. It costs the most of the whole edit
and never changes for a given model, so it is cached on disk, keyed by what produced it: the model id,
layers, sample count and the corpus files' names and contents (never the corpus path).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from unierase.chat import pad_rows
from unierase.edit.capture import StopForward
from unierase.edit.corpus import corpus_chunks, corpus_files
from unierase.io import DataError, atomic_dir, atomic_write_json, file_digest, stable_hash
from unierase.models import module_by_name
from unierase.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class Moments:
    """C0 per layer, with the token count it averages over and the cache key it is stored under."""
    C0: dict[int, Tensor]  # layer -> m x m, float32, on CPU
    n_tokens: int
    key: str  # cache key; the projector cache extends it
    cache_hit: bool


def moments_key(model_id: str, layers: list[int], corpus_dir: Path, n_samples: int | None,
                chunk_tokens: int, down_proj_template: str, autocast: torch.dtype | None) -> str:
    """Everything C0 depends on; the corpus enters by file names and contents, so moving it keeps the key."""
    return stable_hash({
        "model_id": model_id, "layers": sorted(layers), "n_samples": n_samples, "chunk_tokens": chunk_tokens,
        "corpus": {path.name: file_digest(path) for path in corpus_files(corpus_dir)},
        "down_proj_template": down_proj_template, "autocast": str(autocast),
    })


def second_moments(
    model: torch.nn.Module, tokenizer: Any, layers: list[int], corpus_dir: Path, n_samples: int | None,
    chunk_tokens: int, batch_size: int, cache_dir: Path, model_id: str,
    down_proj_template: str = "model.layers.{}.mlp.down_proj", autocast: torch.dtype | None = None,
) -> Moments:
    """C0_l for every layer, loaded from `cache_dir` when the same key was computed before.

    `autocast` (e.g. torch.bfloat16) runs the forward under autocast; accumulation is always float32.
    """
    layers = sorted(layers)
    modules = {layer: module_by_name(model, down_proj_template.format(layer)) for layer in layers}
    key = moments_key(model_id, layers, corpus_dir, n_samples, chunk_tokens, down_proj_template, autocast)
    target = Path(cache_dir) / f"mom2-{key}"
    if (target / "manifest.json").is_file():
        manifest = json.loads((target / "manifest.json").read_text())
        tensors = load_file(target / "C0.safetensors")
        log.info("second moments: cache hit %s (%d tokens)", target, manifest["n_tokens"])
        return Moments({layer: tensors[f"layer.{layer}"] for layer in layers}, manifest["n_tokens"], key, True)

    chunks = corpus_chunks(tokenizer, corpus_dir, chunk_tokens, n_samples)
    run_device = next(model.parameters()).device
    sums = {layer: torch.zeros(m.in_features, m.in_features, device=run_device) for layer, m in modules.items()}
    n_tokens = 0
    mask: Tensor | None = None

    def accumulate(layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            keys = args[0][mask].float()  # non-padding tokens only
            sums[layer].addmm_(keys.T, keys)
            if layer == layers[-1]:
                raise StopForward
        return hook

    handles = [modules[layer].register_forward_pre_hook(accumulate(layer)) for layer in layers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        bar = Progress(len(chunks), "second moments", "chunk")
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start:start + batch_size]
            ids, attention = pad_rows(batch, pad, device=run_device)
            mask = attention.bool()
            n_tokens += int(mask.sum())
            autocast_ctx = (torch.autocast(run_device.type, dtype=autocast) if autocast is not None
                            else contextlib.nullcontext())
            with torch.no_grad(), autocast_ctx, contextlib.suppress(StopForward):
                model(input_ids=ids, attention_mask=attention, use_cache=False)
            bar.step(len(batch))
        bar.close()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if n_tokens == 0:
        raise DataError(f"corpus {corpus_dir} produced no tokens")

    C0 = {layer: (total / n_tokens).cpu() for layer, total in sums.items()}
    with atomic_dir(target) as tmp:
        save_file({f"layer.{layer}": C for layer, C in C0.items()}, tmp / "C0.safetensors")
        atomic_write_json(tmp / "manifest.json", {
            "key": key, "model_id": model_id, "layers": layers, "n_samples": n_samples,
            "n_chunks": len(chunks), "chunk_tokens": chunk_tokens, "n_tokens": n_tokens,
            "corpus": {path.name: file_digest(path) for path in corpus_files(corpus_dir)},
            "down_proj_template": down_proj_template, "autocast": str(autocast), "dtype": "float32",
        })
    log.info("second moments: %d chunks, %d tokens, written to %s", len(chunks), n_tokens, target)
    return Moments(C0, n_tokens, key, False)
