"""The floor of the audit's forget ROUGE: how much of the forget answers a model that never learned them gets,
under the audit's plain prompt and budget (e.g. the retain-reference model), so an attacked model's forget
ROUGE can be read against "never knew" as well as against the target.

    python -m scripts.forget_floor <model dir> [--split forget01] [--rows 50]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from benchmarks.tofu import TofuConfig, load_tofu
from unierase.evaluation.audit import _Scorer, prompt_builders
from unierase.evaluation.config import EvalConfig
from unierase.models import ModelConfig, load_saved, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--split", default="forget01")
    parser.add_argument("--rows", type=int, default=50)
    args = parser.parse_args()
    benchmark = load_tofu(TofuConfig(data_dir=os.environ.get("UNIERASE_DATA", "../shared/data"), split=args.split,
                                     known_forget=args.split))
    model, tokenizer, model_cfg, cfg = load_saved(args.model), load_tokenizer(args.model), ModelConfig(), EvalConfig()
    rows = benchmark.forget[: args.rows]
    plain = prompt_builders(tokenizer, model_cfg, cfg, [])["plain"]
    records = _Scorer(tokenizer, cfg, model_cfg).score(model, rows, [plain(qa) for qa in rows], ())
    print(f"{args.model}: forget ROUGE-L recall {np.mean([r['rouge'] for r in records]):.3f}, "
          f"prob {np.mean([r['prob'] for r in records]):.3f} ({len(rows)} rows, plain prompt, "
          f"{cfg.audit.max_new_tokens} new tokens)")


if __name__ == "__main__":
    main()
