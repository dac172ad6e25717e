"""The null-space projector P_l: the directions preserved-knowledge keys (almost) never use.

P_l = U_hat U_hat^T over the eigenvectors of the second moment C0_l whose eigenvalue is below a threshold;
an update W + Delta P_l leaves W k unchanged for every key k in C0_l's span (docs/algorithm.md, "Stage B:
the unlearning edit"). Cached on disk per (second-moment key, threshold, mode).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from unierase.edit.statistics import Moments
from unierase.io import DataError, atomic_dir, atomic_write_json, stable_hash
from unierase.models import device

log = logging.getLogger(__name__)


def null_space_projector(C0: Tensor, threshold: float = 2e-2, mode: str = "absolute",
                         name: str = "C0") -> Tensor:
    """P = U_hat U_hat^T over the eigenvectors of C0 whose eigenvalue is below the threshold (float32); mode none:
    the identity (no projection: what shields preserved keys is then covariance_weight * C0 in the update)."""
    if mode not in ("absolute", "relative", "none"):
        raise ValueError(f"nullspace_mode must be absolute, relative or none, got '{mode}'")
    m = C0.shape[0]
    if mode == "none":
        return torch.eye(m)
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
