"""Knowledge metrics (docs/metrics.md): the closer-look family (`cl.*`) on every split and the
open-unlearning family (`ou.*`) on TOFU.

The model is run once (`evaluate_knowledge`): per-example generations, NLLs, embeddings scores and
NLI labels go to one JSONL file per split. Every aggregate is then computed from those records by
`aggregate_from_records`, the same function a later re-analysis calls on the files.

Project decisions recorded in each run's `knowledge.json`:
- prompt presets are unified: every prompt is the model's chat template (`chat_prompt`), so cl and ou
  share ONE greedy generation per row. Greedy decoding makes a shorter budget a prefix of a longer
  one, so the cl text (cl_max_length total tokens) and the ou text (ou_max_new_tokens new tokens)
  are both cut from that single generation;
- `eval.max_rows` caps every split, ou's included (of the benchmarks `eval.max_rows_benchmarks` names, or all).

Every split comes with its role (`SplitRole`: forget-like, utility, other), declared where the split is
made; the aggregates read the roles, which `knowledge.json` records (`notes.roles`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from unierase.chat import chat_prompt
from unierase.evaluation import metrics as m
from unierase.evaluation.aggregate import (
    FORGET_TR_FILE,
    RECORD_FILE,
    SUMMARY_FILE,
    aggregate_from_records,
    check_roles,
    describe_aggregates,
    forget_truth_ratios,
    is_tofu,
    read_knowledge_records,
)
from unierase.evaluation.config import EvalConfig
from unierase.evaluation.engine import (
    RefusalDetector,
    answer_nll,
    decode_new,
    generate_ids,
    load_encoder,
    load_nli,
    prompt_ids,
    token_budget,
)
from unierase.io import atomic_write_json, atomic_write_jsonl
from unierase.models import ModelConfig, autocast_dtype
from unierase.records import QA, Benchmark, EvalSplit, SplitRole

# ------------------------------------------------------------------------------ evaluation


@dataclass
class _Row:
    split: str
    role: SplitRole
    qa: QA
    prompt: str
    record: dict[str, Any]


def _correct_answer(qa: QA) -> tuple[str, str]:
    """The truth ratio's "correct" answer: the paraphrase where the split has one (forget, retain,
    real-world), else the answer itself (real authors, world facts)."""
    return ("paraphrased_answer", qa.paraphrased_answer) if qa.paraphrased_answer else ("answer", qa.answer)


def _nli_pair(row: _Row, generation: str, tofu: bool) -> tuple[str, str]:
    """(premise, hypothesis) as docs/metrics.md, CL-6 defines it: generation → answer on TOFU forget-like
    splits and on both real-world splits; reference → generation on the other TOFU splits."""
    if row.role is SplitRole.FORGET or not tofu:
        return generation, row.qa.answer
    return row.qa.cosine_reference or row.qa.answer, generation


def _add_nlls(model: PreTrainedModel, tokenizer: Any, rows: list[_Row], cfg: EvalConfig, dtype: Any) -> None:
    # One batched pass over the distinct (prompt, text) pairs: on RA/WF the "correct" answer is the
    # answer itself, and real-world paraphrases often equal the golden answer.
    keys = list(dict.fromkeys(
        (row.prompt, text)
        for row in rows for text in (row.qa.answer, _correct_answer(row.qa)[1], *row.qa.perturbed_answers)
    ))
    results = dict(zip(keys, answer_nll(model, tokenizer, [p for p, _ in keys], [t for _, t in keys],
                                        cfg.batch_size, cfg.nll_max_length, autocast_dtype=dtype,
                                        desc=f"knowledge NLL ({len(keys)} answers)")))
    for row in rows:
        answer = results[(row.prompt, row.qa.answer)]
        field_name, correct = _correct_answer(row.qa)
        row.record.update(
            nll_answer=answer.mean_nll, answer_token_nlls=answer.token_nlls,
            argmax_ids=answer.argmax_ids, label_ids=answer.label_ids,
            correct_field=field_name, nll_correct=results[(row.prompt, correct)].mean_nll,
            nll_perturbed=[results[(row.prompt, t)].mean_nll for t in row.qa.perturbed_answers],
        )


def _add_generations(model: PreTrainedModel, tokenizer: Any, rows: list[_Row], cfg: EvalConfig, dtype: Any,
                     run_cl: bool, run_ou: bool) -> None:
    """One greedy generation per row; the cl and ou texts are its prefixes within their budgets."""
    prompts = [row.prompt for row in rows]
    lengths = [len(ids) for ids in prompt_ids(tokenizer, prompts)]
    cl_budget = [token_budget(n, max_length=cfg.cl_max_length) if run_cl else 0 for n in lengths]
    ou_budget = [token_budget(n, max_new_tokens=cfg.ou_max_new_tokens) if run_ou else 0 for n in lengths]
    ids = generate_ids(model, tokenizer, prompts, [max(a, b) for a, b in zip(cl_budget, ou_budget)],
                       cfg.batch_size, autocast_dtype=dtype, desc=f"knowledge generation ({len(rows)} rows)")
    for row, new, cl_n, ou_n in zip(rows, ids, cl_budget, ou_budget):
        if run_cl:
            text = decode_new(tokenizer, new[:cl_n])
            tokens = tokenizer.tokenize(text)
            row.record.update(generation=text, rouge=m.rouge_l_recall(row.qa.answer, text),
                              n_tokens=len(tokens), token_entropy=m.token_entropy(tokens))
        if run_ou:
            text = decode_new(tokenizer, new[:ou_n])
            row.record.update(generation_ou=text, rouge_ou=m.rouge_l_recall(row.qa.answer, text))


def _add_aux_scores(rows: list[_Row], cfg: EvalConfig, refusals: Sequence[str], tofu: bool,
                    notes: dict[str, Any]) -> None:
    """Cosine, refusal and NLI scores of the cl generations; a model that cannot be loaded leaves
    its metric null, with the reason in `notes["null_reasons"]`."""
    reasons = notes["null_reasons"]
    generations = [row.record["generation"] for row in rows]
    encoder, reason = load_encoder(cfg.encoder)
    if encoder is None:
        reasons["refusal_rate"] = reasons["opening_refusal_rate"] = reason
    elif not refusals:
        reasons["refusal_rate"] = reasons["opening_refusal_rate"] = "the benchmark has no refusal pool"
    else:
        detector = RefusalDetector(encoder, refusals, cfg.refusal_threshold)
        for row, (flag, max_cos) in zip(rows, detector.score(generations)):
            row.record.update(refusal=flag, refusal_max_cosine=max_cos)
        for row, (flag, _) in zip(rows, detector.score([m.first_sentence(g) for g in generations])):
            row.record["opening_refusal"] = flag
    if cfg.cosine_encoder and cfg.cosine_encoder != cfg.encoder:
        encoder, reason = load_encoder(cfg.cosine_encoder)
    if encoder is None:
        reasons["cosine"] = reason
    else:
        notes["cosine_encoder"] = encoder.name + ("" if "paraphrase-MiniLM" in encoder.name
                                                  else " (closer-look: paraphrase-MiniLM-L6-v2, not available offline)")
        gen_emb = encoder.encode(generations)
        ref_emb = encoder.encode([row.qa.cosine_reference or row.qa.answer for row in rows])
        for row, a, b in zip(rows, gen_emb, ref_emb):
            row.record["cosine"] = m.cosine_score(a, b)
    nli, reason = load_nli(cfg.nli_model)
    if nli is None:
        reasons["entailment"] = reason
    else:
        pairs = [_nli_pair(row, gen, tofu) for row, gen in zip(rows, generations)]
        for row, label in zip(rows, nli.labels([p for p, _ in pairs], [h for _, h in pairs], cfg.batch_size)):
            row.record["nli_label"] = label


def _data_null_reasons(rows: list[_Row], roles: Mapping[str, SplitRole]) -> dict[str, str]:
    """Why a cl metric is null for lack of data (custom benchmarks): a split with rows lacking perturbed answers has
    no truth ratio; a benchmark with nothing to keep has no model utility."""
    reasons = {}
    for split in roles:
        in_split = [row for row in rows if row.split == split]
        lacking = sum(not row.qa.perturbed_answers for row in in_split)
        if lacking:
            reasons[f"cl.{split}.truth_ratio"] = (f"{lacking} of {len(in_split)} rows have no perturbed answers "
                                                  "(perturbed_answer)")
    if SplitRole.UTILITY not in roles.values():
        reasons["cl.model_utility"] = "no split to keep: the benchmark has no retain or neighbour rows"
    if "retain" not in roles and "neighbour" not in roles:
        reasons["cl.model_utility_retain"] = "no retain or neighbour split"
    return reasons


def evaluate_knowledge(
    model: PreTrainedModel,
    tokenizer: Any,
    benchmark: Benchmark,
    cfg: EvalConfig,
    model_cfg: ModelConfig,
    out_dir: Path,
    retain_reference_tr: Sequence[float] | None = None,
    forget_splits: Mapping[str, EvalSplit] | None = None,
) -> dict[str, float | None]:
    """Score the forget split and `benchmark.eval_splits` (role utility); write per-example records and
    return the metrics.

    `forget_splits` replaces `{"forget": EvalSplit(FORGET, benchmark.forget)}` with the setting's own
    splits and roles: a sequential round adds the cumulative "forgotten" set, a precise request the
    item's "siblings", both forget-like.

    Files in out_dir: `knowledge.<split>.jsonl` (records), `knowledge.forget_truth_ratios.json`
    (per-example ou tr, reusable as another run's `retain_reference_tr`), `knowledge.json` (metrics,
    notes on null values and aggregate inputs, config). ou.forget_quality is null unless
    `retain_reference_tr` (a retain-reference model's forget tr) is given.
    """
    out_dir = Path(out_dir)
    splits = {**(forget_splits or {"forget": EvalSplit(SplitRole.FORGET, benchmark.forget)}),
              **benchmark.utility_splits()}
    roles = {name: split.role for name, split in splits.items()}
    check_roles(list(splits), roles)
    rows = [
        _Row(name, split.role, qa, chat_prompt(tokenizer, qa.question, model_cfg),
             {"uid": qa.uid, "question": qa.question, "answer": qa.answer})
        for name, split in splits.items() for qa in split.rows[: cfg.row_cap(benchmark.name)]
    ]
    tofu = is_tofu(list(splits))
    run_cl, run_ou = "cl" in cfg.families, "ou" in cfg.families and tofu
    notes: dict[str, Any] = {
        "protocol": "one greedy generation per row shared by cl.* and ou.*; every prompt uses the model's "
                    "chat template (prompt presets unified in this project); the cl text is cut at "
                    f"{cfg.cl_max_length} total tokens, the ou text at {cfg.ou_max_new_tokens} new tokens",
        "rows": {s: sum(r.split == s for r in rows) for s in splits},
        "roles": {name: role.value for name, role in roles.items()},
        "null_reasons": {},
    }
    if "cl" in cfg.families:
        notes["null_reasons"].update(_data_null_reasons(rows, roles))
    if "ou" in cfg.families and not tofu:
        notes["ou"] = "ou.* is TOFU-only; not computed for this benchmark"
    dtype = autocast_dtype(model_cfg)
    _add_nlls(model, tokenizer, rows, cfg, dtype)
    if not cfg.generation:
        for key in ("rouge", "token_entropy", "cosine", "entailment", "mean_len", "refusal_rate",
                    "opening_refusal_rate", "ou.*_Q_A_ROUGE"):
            notes["null_reasons"][key] = "eval.generation=false"
    elif run_cl or run_ou:
        _add_generations(model, tokenizer, rows, cfg, dtype, run_cl, run_ou)
        if run_cl:
            _add_aux_scores(rows, cfg, benchmark.refusals, tofu, notes)
    for split in splits:
        atomic_write_jsonl(out_dir / RECORD_FILE.format(split=split), [r.record for r in rows if r.split == split])
    forget = [r.record for r in rows if r.split == "forget"]
    atomic_write_json(out_dir / FORGET_TR_FILE,
                      {"uids": [r["uid"] for r in forget], "ou_tr": forget_truth_ratios(forget)})
    # The returned values come from the written files, the same path a later re-analysis takes.
    metrics = aggregate_from_records(read_knowledge_records(out_dir, list(splits)), roles, cfg, retain_reference_tr)
    if run_ou:
        if retain_reference_tr is None:
            notes["null_reasons"]["ou.forget_quality"] = "no retain-reference truth ratios given"
    notes["aggregates"] = describe_aggregates(metrics, roles, cfg.families)
    atomic_write_json(out_dir / SUMMARY_FILE,
                      {"metrics": metrics, "notes": notes, "config": dataclasses.asdict(cfg)})
    return metrics
