"""Train a shortened demo unlearning token (phases 3/2/0 epochs) and print its losses and a hash of its rows,
so two processes (or two versions of the code) can be compared: on CPU under bf16 autocast Stage A is not
reproducible across processes (RESULTS.md, "The refactor (issue #18) changes no result").

    python -m scripts.stage_a_determinism outputs/cache/targets/<target> LABEL   # run it twice, compare
"""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.tofu import TofuConfig, load_tofu
from unierase.models import ModelConfig, load_saved
from unierase.token import TokenConfig, train_unlearning_token
from unierase.training import TrainerConfig

# conf/method/unierase_cpu.yaml's token, with fewer epochs and no phase 3
SHORT_CPU_TOKEN = {
    "untie_output": True, "share": False, "init_std": 0.13, "refusal_lines": 1, "output_anchors": 40,
    "phase1": {"epochs": 3, "lr": 2e-2}, "phase2": {"epochs": 2, "lr": 1e-2}, "phase3": {"epochs": 0, "lr": 1e-3},
    "sanity_questions": 0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path, help="the demo target model directory")
    parser.add_argument("label", help="printed with the result")
    parser.add_argument("--data", default=os.environ.get("UNIERASE_DATA", "../shared/data"))
    args = parser.parse_args()
    model, tokenizer = load_saved(args.target), AutoTokenizer.from_pretrained(args.target)
    bench = load_tofu(TofuConfig(split="forget01", known_forget="forget01", retain_authors=2, data_dir=args.data))
    artifact = train_unlearning_token(
        model, tokenizer, [qa.question for qa in bench.forget], bench.refusals, TokenConfig.from_dict(SHORT_CPU_TOKEN),
        ModelConfig(), TrainerConfig(enable_progress_bar=False), [4, 5, 6, 7, 8],
        [(qa.question, qa.training_answer) for qa in bench.retain_train])
    losses = {phase: [round(x, 7) for x in curve[:3] + curve[-1:]] for phase, curve in artifact.losses.items()}
    rows = hashlib.sha256(artifact.input_rows.numpy().tobytes()).hexdigest()[:12]
    print(args.label, losses, "rows", rows)


if __name__ == "__main__":
    main()
