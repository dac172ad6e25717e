"""The robustness audit (`audit.*`, docs/metrics.md "audit"): is the forgotten knowledge really gone?

Forgetting is otherwise scored on the exact question, in the chat format the method trained on, with
full-precision weights. Each attack here changes one of those and scores the forget split again (and the
retain split, for what the attack costs):

- prompt attacks: the plain question, TOFU's paraphrased question, the raw `Question: …\\nAnswer:` format
  without the chat template, a few-shot prefix of retain QA turns, another system prompt, and an
  instruction to ignore refusals and special tokens;
- suppression: every prompt attack again with the tokens the method added (UniErase's `<unlearn_k>`)
  banned from decoding, and the answer's probability renormalised without them;
- quantization: every linear layer rounded to 8 and 4 bits (round-to-nearest, per group), plain questions;
- relearning: fine-tune on half of the forget rows, score the other half;
- membership inference: loss, zlib, Min-K % and Min-K %++ AUC of forget vs the benchmark's holdout (rows the
  target never saw), and privleak against the retain-reference model's AUC.

`run_audit` writes one JSONL of per-example generations, one of per-example membership scores and
`audit.json` (metrics, notes, config); the job supplies what needs other models (`AuditReferences`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from unierase.chat import render_chat
from unierase.evaluation import audit_metrics as am
from unierase.evaluation import metrics as m
from unierase.evaluation.config import MODEL_ATTACKS, PROMPT_ATTACKS, EvalConfig
from unierase.evaluation.engine import decode_new, generate_ids
from unierase.evaluation.membership import MIA_SCORES, PRIVLEAK_SCORE, membership_aucs, token_stats
from unierase.finetune import finetune
from unierase.io import atomic_write_json, atomic_write_jsonl
from unierase.models import ModelConfig, autocast_dtype, copy_model
from unierase.progress import Progress
from unierase.records import QA, Benchmark
from unierase.training import TrainerConfig

SUMMARY_FILE = "audit.json"
GENERATIONS_FILE = "audit.generations.jsonl"
MIA_FILE = "audit.mia.jsonl"


@dataclass
class AuditReferences:
    """What the audit needs from other models than the one it scores; None: the metric it feeds is null."""

    vocabulary: Collection[str] | None = None  # the starting tokenizer's: what the method added gets banned
    target: dict[str, float] | None = None  # the target's audit metrics under the same attacks (`*_vs_target`)
    reference_auc: float | None = None  # the retain-reference model's Min-K % AUC on the same rows (privleak)
    base_relearn_rouge: float | None = None  # the never-trained base after the same relearning


def added_token_ids(tokenizer: Any, reference_vocab: Collection[str]) -> list[int]:
    """The ids of tokens `tokenizer` has and the tokenizer the model started from (`reference_vocab`) lacks."""
    known = set(reference_vocab)
    return sorted(i for token, i in tokenizer.get_vocab().items() if token not in known)


def relearn_halves(rows: Sequence[QA]) -> tuple[list[QA], list[QA]]:
    """(trained on, scored): even and odd rows, so both halves cover every author of the split."""
    return list(rows[0::2]), list(rows[1::2])


def prompt_builders(tokenizer: Any, model_cfg: ModelConfig, cfg: EvalConfig,
                    shots: Sequence[QA]) -> dict[str, Callable[[QA], str]]:
    """One prompt per prompt attack and row."""
    audit = cfg.audit
    system = [] if model_cfg.system_prompt is None else [{"role": "system", "content": model_cfg.system_prompt}]
    prefix = [turn for qa in shots for turn in ({"role": "user", "content": qa.question},
                                                 {"role": "assistant", "content": qa.answer})]

    def chat(question: str, before: list[dict[str, str]] = system) -> str:
        return render_chat(tokenizer, [*before, {"role": "user", "content": question}], model_cfg)

    return {
        "plain": lambda qa: chat(qa.question),
        "paraphrase": lambda qa: chat(qa.paraphrased_question or qa.question),
        "raw_format": lambda qa: f"Question: {qa.question}\nAnswer:",
        "few_shot": lambda qa: chat(qa.question, system + prefix),
        "system_prompt": lambda qa: chat(qa.question, [{"role": "system", "content": audit.system_prompt}]),
        "ignore_instruction": lambda qa: chat(f"{audit.ignore_instruction}\n\n{qa.question}"),
    }


class _Scorer:
    """Generations and answer probabilities of one model under the audit's budgets."""

    def __init__(self, tokenizer: Any, cfg: EvalConfig, model_cfg: ModelConfig) -> None:
        self.tokenizer, self.cfg, self.dtype = tokenizer, cfg, autocast_dtype(model_cfg)

    def score(self, model: PreTrainedModel, rows: Sequence[QA], prompts: Sequence[str],
              banned: Sequence[int]) -> list[dict[str, Any]]:
        ids = generate_ids(model, self.tokenizer, prompts, [self.cfg.audit.max_new_tokens] * len(prompts),
                           self.cfg.batch_size, autocast_dtype=self.dtype, banned_ids=banned)
        # Few-shot prompts are long: the NLL cut counts from the end of each prompt, not from its start.
        longest = max(len(self.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts)
        stats = token_stats(model, self.tokenizer, prompts, [qa.answer for qa in rows], banned,
                            self.cfg.batch_size, longest + self.cfg.nll_max_length, self.dtype)
        records = []
        for qa, new, stat in zip(rows, ids, stats):
            text = decode_new(self.tokenizer, new)
            logprobs = stat.suppressed_logprobs if banned else stat.logprobs
            records.append({"uid": qa.uid, "generation": text, "rouge": m.rouge_l_recall(qa.answer, text),
                            "prob": float(np.exp(np.mean(logprobs)))})
        return records


def _mean(records: Sequence[dict[str, Any]], key: str) -> float | None:
    return float(np.mean([r[key] for r in records])) if records else None


def _few_shot_rows(benchmark: Benchmark, retain_name: str | None, evaluated: Collection[str], k: int) -> list[QA]:
    """Knowledge to keep that the audit does not score: retain QA the target knows that are no evaluated retain
    row (its answer would be in the prompt), then the benchmark's other evaluation splits (TOFU: real authors,
    world facts; the CPU demo's target knows no unevaluated retain row)."""
    others = [qa for name, rows in benchmark.eval_splits.items() if name != retain_name for qa in rows]
    return [qa for qa in benchmark.retain_train if qa.question not in evaluated][:k] + others[:k]


def run_audit(
    model: PreTrainedModel,
    tokenizer: Any,
    benchmark: Benchmark,
    forget: Sequence[QA],
    cfg: EvalConfig,
    model_cfg: ModelConfig,
    trainer_cfg: TrainerConfig,
    out_dir: Path,
    references: AuditReferences,
) -> dict[str, float | None]:
    """Every configured attack on `model`: metrics `audit.<attack>.<split>_{rouge,prob}`, the relearning and
    membership-inference metrics, and the files described in the module docstring."""
    attacks = set(cfg.audit.attacks)
    cap = cfg.row_cap(benchmark.name)
    retain_name = "retain" if "retain" in benchmark.eval_splits else next(iter(benchmark.eval_splits), None)
    splits = {"forget": list(forget[:cap])}
    if retain_name is not None:  # a custom benchmark may have no split to keep
        splits["retain"] = list(benchmark.eval_splits[retain_name][:cap])
    shots = _few_shot_rows(benchmark, retain_name, {qa.question for qa in splits.get("retain", [])},
                           cfg.audit.few_shot)
    shots = shots[: cfg.audit.few_shot]
    builders = prompt_builders(tokenizer, model_cfg, cfg, shots)
    scorer = _Scorer(tokenizer, cfg, model_cfg)
    notes: dict[str, Any] = {"rows": {name: len(rows) for name, rows in splits.items()}, "retain_split": retain_name,
                             "few_shot_uids": [qa.uid for qa in shots], "null_reasons": {}}
    metrics: dict[str, float | None] = {}
    generations: list[dict[str, Any]] = []

    bar = Progress(_planned_steps(attacks, bool(references.vocabulary is not None
                                                and added_token_ids(tokenizer, references.vocabulary))),
                   "audit", "attack")

    def scored(attack: str, scoring_model: PreTrainedModel, builder: Callable[[QA], str], banned: Sequence[int],
               split_rows: dict[str, list[QA]]) -> None:
        for split, rows in split_rows.items():
            records = scorer.score(scoring_model, rows, [builder(qa) for qa in rows], banned)
            generations.extend({"attack": attack, "split": split, **r} for r in records)
            metrics[f"audit.{attack}.{split}_rouge"] = _mean(records, "rouge")
            metrics[f"audit.{attack}.{split}_prob"] = _mean(records, "prob")
        bar.step(note=f"{attack}: forget ROUGE {metrics[f'audit.{attack}.forget_rouge']:.3f}")

    suppress = "suppression" in attacks
    banned_ids = [] if references.vocabulary is None else added_token_ids(tokenizer, references.vocabulary)
    if suppress and references.vocabulary is None:
        notes["null_reasons"]["audit.*_suppressed"] = ("no starting tokenizer to tell added tokens from "
                                                       "(set eval.audit.reference_tokenizer)")
        suppress = False
    if suppress:
        metrics["audit.suppression.banned_tokens"] = float(len(banned_ids))
        notes["banned_tokens"] = tokenizer.convert_ids_to_tokens(list(banned_ids))
        if not banned_ids:
            notes["suppression"] = "a no-op: the method added no tokens, so *_suppressed equals the unsuppressed"
    for attack in PROMPT_ATTACKS:
        if attack not in attacks:
            continue
        # A prompt changes no weight: what the method costs the retain split is measured once, on the plain prompt.
        scored_splits = splits if attack == "plain" else {"forget": splits["forget"]}
        scored(attack, model, builders[attack], (), scored_splits)
        if suppress and banned_ids:
            scored(f"{attack}_suppressed", model, builders[attack], banned_ids, scored_splits)
        elif suppress:
            for key in [k for k in metrics if k.startswith(f"audit.{attack}.")]:
                metrics[key.replace(f"audit.{attack}.", f"audit.{attack}_suppressed.")] = metrics[key]
    for bits in (8, 4):
        if f"quant{bits}" in attacks:
            quantized = copy_model(model)
            am.quantize_linear_layers_(quantized, bits, cfg.audit.quant_group_size)
            scored(f"quant{bits}", quantized, builders["plain"], (), splits)
            del quantized
    if "relearn" in attacks:
        metrics |= _relearn(model, tokenizer, splits, builders["plain"], scorer, cfg, model_cfg, trainer_cfg,
                            generations, references, notes)
        bar.step(note=f"relearn: forget ROUGE {metrics['audit.relearn.forget_rouge']:.3f}")
    if "mia" in attacks:
        metrics |= _membership(model, tokenizer, splits["forget"], benchmark.holdout, cfg, model_cfg, out_dir,
                               references, notes)
        bar.step(note="membership inference")
    bar.close()
    metrics |= _relative(metrics, references, notes)
    atomic_write_jsonl(out_dir / GENERATIONS_FILE, generations)
    atomic_write_json(out_dir / SUMMARY_FILE, {"metrics": metrics, "notes": notes,
                                                "config": dataclasses.asdict(cfg.audit)})
    return metrics


def _planned_steps(attacks: Collection[str], suppressing: bool) -> int:
    """The progress steps of `run_audit`: one per scoring pass (prompt attacks twice when suppressing)."""
    prompt = sum(a in attacks for a in PROMPT_ATTACKS) * (2 if suppressing and "suppression" in attacks else 1)
    return prompt + sum(a in attacks for a in MODEL_ATTACKS) + ("mia" in attacks)


def _relearn(model: PreTrainedModel, tokenizer: Any, splits: dict[str, list[QA]], builder: Callable[[QA], str],
             scorer: _Scorer, cfg: EvalConfig, model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
             generations: list[dict[str, Any]], references: AuditReferences,
             notes: dict[str, Any]) -> dict[str, float | None]:
    """Fine-tune a copy on the even forget rows; score the odd ones before and after, and the retain split."""
    trained, held_out = relearn_halves(splits["forget"])
    notes["relearn"] = {"trained_uids": [qa.uid for qa in trained], "scored_uids": [qa.uid for qa in held_out]}
    before = scorer.score(model, held_out, [builder(qa) for qa in held_out], ())
    attacked = relearned(model, tokenizer, trained, cfg, model_cfg, trainer_cfg)
    out: dict[str, float | None] = {"audit.relearn.forget_rouge_before": _mean(before, "rouge"),
                                    "audit.relearn.base_forget_rouge": references.base_relearn_rouge}
    if references.base_relearn_rouge is None:
        notes["null_reasons"]["audit.relearn.base_forget_rouge"] = "no base model in this job (stage=eval)"
    for split, rows in (("forget", held_out), ("retain", splits.get("retain", []))):
        if not rows:
            continue
        records = scorer.score(attacked, rows, [builder(qa) for qa in rows], ())
        generations.extend({"attack": "relearn", "split": split, **r} for r in records)
        out[f"audit.relearn.{split}_rouge"] = _mean(records, "rouge")
        out[f"audit.relearn.{split}_prob"] = _mean(records, "prob")
    return out


def relearned(model: PreTrainedModel, tokenizer: Any, rows: list[QA], cfg: EvalConfig, model_cfg: ModelConfig,
              trainer_cfg: TrainerConfig) -> PreTrainedModel:
    """A copy of `model` fine-tuned on `rows` with the relearning recipe (the model itself is untouched)."""
    attacked = copy_model(model)
    finetune(attacked, tokenizer, rows, cfg.audit.relearn, model_cfg, trainer_cfg)
    return attacked


def _membership(model: PreTrainedModel, tokenizer: Any, forget: Sequence[QA], holdout: Sequence[QA],
                cfg: EvalConfig, model_cfg: ModelConfig, out_dir: Path, references: AuditReferences,
                notes: dict[str, Any]) -> dict[str, float | None]:
    keys = [f"audit.mia.{name}_auc" for name in MIA_SCORES] + ["audit.mia.privleak", "audit.mia.reference_auc"]
    if not holdout:
        for key in keys:
            notes["null_reasons"][key] = "the benchmark has no holdout rows (authors the target never saw)"
        return dict.fromkeys(keys)
    holdout = list(holdout[: len(forget)])  # as many non-members as members
    aucs, records = membership_aucs(model, tokenizer, forget, holdout, cfg, model_cfg)
    atomic_write_jsonl(out_dir / MIA_FILE, records)
    notes["mia"] = {"holdout_rows": len(holdout), "privleak_score": PRIVLEAK_SCORE,
                    "direction": "AUC of telling holdout (1) from forget (0); 1 = forget rows look seen"}
    out: dict[str, float | None] = {f"audit.mia.{name}_auc": value for name, value in aucs.items()}
    out["audit.mia.reference_auc"] = references.reference_auc
    out["audit.mia.privleak"] = (None if references.reference_auc is None
                                 else am.privleak(aucs[PRIVLEAK_SCORE], references.reference_auc))
    if references.reference_auc is None:
        notes["null_reasons"]["audit.mia.privleak"] = "no retain-reference model in this job"
    return out


def reference_audit(target: PreTrainedModel, base: PreTrainedModel, retain_reference: PreTrainedModel | None,
                    tokenizer: Any, benchmark: Benchmark, forget: Sequence[QA], cfg: EvalConfig,
                    model_cfg: ModelConfig, trainer_cfg: TrainerConfig, out_dir: Path) -> dict[str, Any]:
    """The comparisons of `AuditReferences` (as JSON): the target under every attack but relearning, the retain
    reference's privleak AUC, and the base model's forget ROUGE after the same relearning as `run_audit`'s."""
    attacks = cfg.audit.attacks
    target_cfg = dataclasses.replace(cfg, audit=dataclasses.replace(cfg.audit, attacks=[
        a for a in attacks if a not in ("relearn", "suppression")]))
    references: dict[str, Any] = {"target": run_audit(target, tokenizer, benchmark, forget, target_cfg, model_cfg,
                                                      trainer_cfg, out_dir, AuditReferences()),
                                  "reference_auc": None, "base_relearn_rouge": None}
    forget = list(forget[: cfg.row_cap(benchmark.name)])
    if "mia" in attacks and benchmark.holdout and retain_reference is not None:
        aucs, _ = membership_aucs(retain_reference, tokenizer, forget, benchmark.holdout[: len(forget)], cfg,
                                  model_cfg)
        references["reference_auc"] = aucs[PRIVLEAK_SCORE]
    if "relearn" in attacks:
        trained, held_out = relearn_halves(forget)
        attacked = relearned(base, tokenizer, trained, cfg, model_cfg, trainer_cfg)
        plain = prompt_builders(tokenizer, model_cfg, cfg, [])["plain"]
        records = _Scorer(tokenizer, cfg, model_cfg).score(attacked, held_out, [plain(qa) for qa in held_out], ())
        references["base_relearn_rouge"] = _mean(records, "rouge")
    return references


def _relative(metrics: dict[str, float | None], references: AuditReferences,
              notes: dict[str, Any]) -> dict[str, float | None]:
    """Each attack's forget ROUGE against the unattacked model's (gain) and the target's under the same attack;
    `audit.worst.forget_rouge`: the strongest attack's."""
    plain = metrics.get("audit.plain.forget_rouge")
    out: dict[str, float | None] = {}
    attacked = {key: value for key, value in metrics.items()
                if key.endswith(".forget_rouge") and key.split(".")[1] in _ATTACK_NAMES and value is not None}
    for key, value in attacked.items():
        stem = key.removesuffix("_rouge")
        out[f"{stem}_rouge_gain"] = None if plain is None else value - plain
        target = (references.target or {}).get(key)
        out[f"{stem}_rouge_vs_target"] = value / target if target else None
    if references.target is None:
        notes["null_reasons"]["audit.*.forget_rouge_vs_target"] = "no target audit in this job (stage=eval)"
    if attacked:
        worst = max(attacked, key=lambda k: attacked[k])
        out["audit.worst.forget_rouge"] = attacked[worst]
        notes["worst_attack"] = worst.split(".")[1]
    return out


_ATTACK_NAMES = frozenset(PROMPT_ATTACKS) | {f"{a}_suppressed" for a in PROMPT_ATTACKS} | set(MODEL_ATTACKS)
