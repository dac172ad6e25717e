"""A model directory with a real model's architecture and tokenizer but random weights.

For timing only, where the weights cannot travel (a device machine takes at most 64 MiB of files; the
SmolLM2 GGUF is 98 MB): speed depends on shapes, not values. Metrics of such a model mean nothing.

    python -m scripts.random_weights SOURCE_DIR OUT_DIR   # SOURCE_DIR: config.json + tokenizer files
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from unierase.io import atomic_dir
from unierase.models import save_model


def random_weights(source: Path, out: Path, seed: int = 0) -> None:
    config = AutoConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with atomic_dir(out) as tmp:
        save_model(model, tokenizer, tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a directory with config.json and the tokenizer files")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random_weights(args.source, args.out, args.seed)


if __name__ == "__main__":
    main()
