"""Where an edit moved the down_proj outputs: per edited layer, the relative change ||ΔW K||_F / ||W K||_F that
an edited model's weights make on the target's keys K (down_proj inputs): at the requests' own keys (rounds 1
and 8, where the edit aims), at the same position of the scored retain questions, over the scored retain answers
(what the evaluation reads), held-out retain answers (what a method may protect), the forget answers and
WikiText, which C0 summarises (issue #24: why retain erodes).

    python -m scripts.edit_drift --target <target dir> <run dir> [<run dir> ...]

A run dir is a finished `unierase` run with `model/` and `config_resolved.yaml` (its benchmark and
`method.edit.layers`; a baseline's run is read at the first run's layers). Keys are read on the target, so
every model is measured against the same K. Answer keys sit at the positions that predict each answer token
(the prompt's last one and the answer's own), prompt keys at every prompt position, request keys at the
edit's key position on the plain question (its subject's last token under key_position=subject_last).
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from benchmarks import BENCHMARKS
from unierase.chat import answer_ids, chat_prompt, pad_rows
from unierase.config import typed
from unierase.edit.capture import StopForward, hooks
from unierase.edit.corpus import corpus_chunks
from unierase.edit.prompts import encode, subject_span
from unierase.models import ModelConfig, load_saved, load_tokenizer, module_by_name
from unierase.records import QA

WIKITEXT_CHUNKS, WIKITEXT_TOKENS = 32, 256


def sequences(tokenizer, rows: list[QA], model_cfg: ModelConfig) -> list[tuple[list[int], int]]:
    """Each QA as chat prompt + answer + turn end, with the prompt's length."""
    out = []
    for qa in rows:
        prompt = tokenizer(chat_prompt(tokenizer, qa.question, model_cfg), add_special_tokens=False).input_ids
        out.append((prompt + answer_ids(tokenizer, qa.answer), len(prompt)))
    return out


def keys_at(model, template: str, layers: list[int], items: list[tuple[list[int], slice]],
            batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Keys (m x N per layer) at each item's positions."""
    modules = {layer: module_by_name(model, template.format(layer)) for layer in layers}
    current: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def capture(module, args) -> None:
            current[layer] = args[0].float()
            if layer == max(layers):
                raise StopForward
        return capture

    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with hooks([(modules[layer], "pre", hook(layer)) for layer in layers]), torch.no_grad():
        for first in range(0, len(items), batch_size):
            batch = items[first:first + batch_size]
            ids, mask = pad_rows([ids for ids, _ in batch], 0)
            with contextlib.suppress(StopForward):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            for layer in layers:
                collected[layer] += [current[layer][i, positions] for i, (_, positions) in enumerate(batch)]
    return {layer: torch.cat(parts).T for layer, parts in collected.items()}


def down_proj_weights(model_dir: Path, template: str, layers: list[int]) -> dict[int, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        return {layer: handle.get_tensor(f"{template.format(layer)}.weight").float() for layer in layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = OmegaConf.load(args.runs[0] / "config_resolved.yaml")
    schema, loader = BENCHMARKS[cfg.benchmark.name]
    benchmark = loader(typed(cfg.benchmark, schema))
    model_cfg = typed(cfg.model, ModelConfig)
    layers = list(cfg.method.edit.layers)
    template = model_cfg.down_proj_template
    target, tokenizer = load_saved(args.target), load_tokenizer(args.target)
    target.eval()

    def answers(rows: list[QA]) -> list[tuple[list[int], slice]]:
        return [(ids, slice(start - 1, len(ids) - 1)) for ids, start in sequences(tokenizer, rows, model_cfg)]

    def prompts(rows: list[QA]) -> list[tuple[list[int], slice]]:
        return [(ids[:start], slice(0, start)) for ids, start in sequences(tokenizer, rows, model_cfg)]

    def key_positions(rows: list[QA]) -> list[tuple[list[int], slice]]:
        """The edit's own key on the plain question T_0: the subject's last token, else the prompt's last."""
        texts = [chat_prompt(tokenizer, qa.question, model_cfg) for qa in rows]
        by_subject = cfg.method.edit.get("key_position", "last") == "subject_last"
        enc = encode(tokenizer, [(text, subject_span(text, qa.question, qa.subject) if by_subject else None, False)
                                 for text, qa in zip(texts, rows)])
        return [(enc.input_ids[i, : int(enc.last[i]) + 1].tolist(), slice(int(enc.lookup[i]), int(enc.lookup[i]) + 1))
                for i in range(len(rows))]

    chunks = corpus_chunks(tokenizer, Path(cfg.method.edit.mom2_corpus), WIKITEXT_TOKENS, WIKITEXT_CHUNKS)
    key_sets = {
        "round 1 request keys": key_positions(benchmark.rounds[0]),
        "round 8 request keys": key_positions(benchmark.rounds[7]),
        "scored retain question keys": key_positions(benchmark.eval_splits["retain"]),
        "scored retain answers": answers(benchmark.eval_splits["retain"]),
        "scored retain prompts": prompts(benchmark.eval_splits["retain"]),
        "held-out retain answers": answers(benchmark.unscored_retain()),
        "round 1 forget answers": answers(benchmark.rounds[0]),
        "round 8 forget answers": answers(benchmark.rounds[7]),
        "WikiText": [(chunk, slice(0, len(chunk))) for chunk in chunks],
    }
    keys = {name: keys_at(target, template, layers, items) for name, items in key_sets.items()}
    base = down_proj_weights(args.target, template, layers)
    print("| run | layer | " + " | ".join(keys) + " |")
    print("|---|--:|" + "--:|" * len(keys))
    for run in args.runs:
        edited = down_proj_weights(run / "model", template, layers)
        for layer in layers:
            delta, weight = edited[layer] - base[layer], base[layer]
            ratios = [(delta @ K).norm() / (weight @ K).norm() for K in (keys[name][layer] for name in keys)]
            print(f"| {run.name} | {layer} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    print(f"\nKeys per set: {', '.join(f'{name} {keys[name][layers[0]].shape[1]}' for name in keys)}")


if __name__ == "__main__":
    main()
