"""Preserved-knowledge statistics for AlphaEdit (SPEC-unierase.md 3.7, 3.8; DATA.md 4).

C0_l = (1/N_tok) sum_t k_t k_t^T over the down_proj inputs k_t of a generic corpus, and the null-space
projector P_l built from its small-eigenvalue directions. Both are cached on disk, keyed by what
produced them, because they cost the most of the whole edit and never change for a given model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from unierase.io import DataError, atomic_dir, atomic_write_json, file_digest, stable_hash
from unierase.models import device, module_by_name

log = logging.getLogger(__name__)

_TOP_HEADING = re.compile(r"^= [^=].* =$")  # " = Title = " (stripped); " = = Section = = " is a sub-heading
_ANY_HEADING = re.compile(r"^=( =)* .* =( =)*$")
_WIKITEXT_SPACING = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


class StopForward(Exception):
    """Raised by a hook once everything needed is captured: the deeper layers would be wasted work."""


# ----------------------------------------------------------------------------- corpus

def corpus_files(corpus_dir: Path) -> list[Path]:
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise DataError(f"no *.txt corpus files in {corpus_dir} (see DATA.md section 4)")
    return files


def read_documents(path: Path) -> Iterator[str]:
    """WikiText articles: split at top-level headings, headings and <unk> dropped, spacing undone."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as handle:  # text mode turns CRLF into LF
        for raw in handle:
            line = raw.strip()
            if _TOP_HEADING.match(line) and lines:
                yield "\n".join(lines)
                lines = []
            if not line or _ANY_HEADING.match(line):
                continue
            line = re.sub(r"\s*<unk>", "", line)
            for spaced, plain in _WIKITEXT_SPACING:
                line = line.replace(spaced, plain)
            if line.strip():
                lines.append(line.strip())
    if lines:
        yield "\n".join(lines)


def corpus_chunks(tokenizer: Any, corpus_dir: Path, chunk_tokens: int, n_samples: int | None) -> list[list[int]]:
    """Token chunks of at most `chunk_tokens` tokens (BOS included), per document, capped at `n_samples`."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = chunk_tokens - len(bos)
    if body < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} leaves no room after BOS")
    chunks: list[list[int]] = []
    for path in corpus_files(corpus_dir):
        for document in read_documents(path):
            ids = tokenizer(document, add_special_tokens=False).input_ids
            for start in range(0, len(ids), body):
                chunks.append(bos + ids[start:start + body])
                if n_samples is not None and len(chunks) >= n_samples:
                    return chunks
    return chunks


# ----------------------------------------------------------------------------- second moments

@dataclass
class Moments:
    C0: dict[int, Tensor]  # layer -> m x m, float32, on CPU
    n_tokens: int
    key: str  # cache key; the projector cache extends it
    cache_hit: bool


def moments_key(model_id: str, layers: list[int], corpus_dir: Path, n_samples: int | None,
                chunk_tokens: int, down_proj_template: str, autocast: torch.dtype | None) -> str:
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
        bar = tqdm(total=len(chunks), desc="second moments", unit="chunk", disable=bool(os.environ.get("CI")))
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start:start + batch_size]
            width = max(len(chunk) for chunk in batch)
            ids = torch.tensor([chunk + [pad] * (width - len(chunk)) for chunk in batch], device=run_device)
            attention = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in batch], device=run_device)
            mask = attention.bool()
            n_tokens += int(mask.sum())
            autocast_ctx = (torch.autocast(run_device.type, dtype=autocast) if autocast is not None
                            else contextlib.nullcontext())
            with torch.no_grad(), autocast_ctx, contextlib.suppress(StopForward):
                model(input_ids=ids, attention_mask=attention, use_cache=False)
            bar.update(len(batch))
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


# ----------------------------------------------------------------------------- null-space projector

def null_space_projector(C0: Tensor, threshold: float = 2e-2, mode: str = "absolute",
                         name: str = "C0") -> Tensor:
    """P = U_hat U_hat^T over the eigenvectors of C0 whose eigenvalue is below the threshold (float32)."""
    if mode not in ("absolute", "relative"):
        raise ValueError(f"nullspace_mode must be absolute or relative, got '{mode}'")
    m = C0.shape[0]
    # float64 is exact enough for small m; above 8192 it costs too much memory and time.
    C = C0.to(torch.float64 if m <= 8192 else torch.float32)
    eigenvalues, U = torch.linalg.eigh((C + C.T) / 2)
    cutoff = threshold if mode == "absolute" else threshold * float(eigenvalues.max())
    U_hat = U[:, eigenvalues < cutoff]
    rank = U_hat.shape[1]
    log.info("null space of %s: rank %d of %d (threshold %g, %s)", name, rank, m, threshold, mode)
    if rank == 0:
        log.warning("null space of %s is empty: every update will be zero (try nullspace_mode=relative)", name)
    elif rank == m:
        log.warning("null space of %s is everything: no knowledge is protected (try nullspace_mode=relative)",
                    name)
    return (U_hat @ U_hat.T).float()


def projector_hash(projectors: dict[int, Tensor]) -> str:
    """Content hash of a projector set: an edit state refers to P by this, never by a file name."""
    digest = hashlib.sha256()
    for layer in sorted(projectors):
        P = projectors[layer].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{layer}:{tuple(P.shape)};".encode())
        digest.update(memoryview(P.numpy()).cast("B"))
    return digest.hexdigest()[:16]


def nullspace_projectors(moments: Moments, threshold: float, mode: str, cache_dir: Path) -> dict[int, Tensor]:
    """P_l for every layer of `moments`, cached per (statistics key, threshold, mode)."""
    key = stable_hash({"moments": moments.key, "threshold": threshold, "mode": mode})
    target = Path(cache_dir) / f"nullspace-{key}"
    if (target / "manifest.json").is_file():
        manifest = json.loads((target / "manifest.json").read_text())
        tensors = load_file(target / "P.safetensors")
        projectors = {layer: tensors[f"layer.{layer}"] for layer in sorted(moments.C0)}
        if projector_hash(projectors) != manifest["hash"]:
            raise DataError(f"projector cache {target} does not match its recorded hash; delete it")
        log.info("null-space projectors: cache hit %s (ranks %s)", target, manifest["ranks"])
        return projectors
    projectors = {
        layer: null_space_projector(C.to(device()), threshold, mode, name=f"C0 layer {layer}").cpu()
        for layer, C in sorted(moments.C0.items())
    }
    ranks = {layer: round(float(P.trace())) for layer, P in projectors.items()}
    with atomic_dir(target) as tmp:
        save_file({f"layer.{layer}": P for layer, P in projectors.items()}, tmp / "P.safetensors")
        atomic_write_json(tmp / "manifest.json", {
            "key": key, "moments_key": moments.key, "threshold": threshold, "mode": mode,
            "ranks": ranks, "hash": projector_hash(projectors),
        })
    return projectors
