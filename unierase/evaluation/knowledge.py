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
- `eval.max_rows` caps every split, ou's included.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from unierase.evaluation import metrics as m
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
from unierase.io import DataError, atomic_write_json, atomic_write_jsonl, read_jsonl
from unierase.models import ModelConfig, autocast_dtype, chat_prompt
from unierase.records import QA, Benchmark

CL_METRICS = ("rouge", "prob", "truth_ratio", "token_entropy", "cosine", "entailment")
FE_METRICS = ("rouge", "prob", "truth_ratio", "cosine", "entailment")  # token entropy excluded
FORM_B_SPLITS = frozenset({"real_authors", "world_facts"})  # normalised probability (docs/metrics.md, CL-2 form B)
OU_SPLITS = {"retain": "retain", "real_authors": "ra", "world_facts": "wf"}  # ou key prefixes

RECORD_FILE = "knowledge.{split}.jsonl"
SUMMARY_FILE = "knowledge.json"
FORGET_TR_FILE = "knowledge.forget_truth_ratios.json"


# ------------------------------------------------------------------------------ aggregation


def _mean(values: Sequence[Any]) -> float | None:
    """Mean, or None when any input is missing (its metric could not be computed)."""
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(np.asarray(values, dtype=float)))


def _probs(split: str, rows: Sequence[dict]) -> list[float]:
    """Probability per row (docs/metrics.md, CL-2): form B (normalised over the perturbed answers) on RA/WF,
    form A elsewhere."""
    if split in FORM_B_SPLITS:
        return [m.normalised_prob(m.prob_from_nll(r["nll_answer"]), [m.prob_from_nll(x) for x in r["nll_perturbed"]])
                for r in rows]
    return [m.prob_from_nll(r["nll_answer"]) for r in rows]


def _cl_split(split: str, rows: Sequence[dict]) -> dict[str, float | None]:
    rouges = [r.get("rouge") for r in rows]
    Rs = [m.truth_ratio_R(r["nll_correct"], r["nll_perturbed"]) for r in rows]
    nli = [r.get("nli_label") for r in rows]
    entailment = None
    if all(x is not None for x in nli + rouges):
        entailment = m.entailment_score(m.entailment_labels(nli, rouges))
    truth_ratio = m.cl_truth_ratio_forget(Rs) if split == "forget" else m.cl_truth_ratio_nonforget(Rs)
    return {
        f"cl.{split}.rouge": _mean(rouges),
        f"cl.{split}.prob": _mean(_probs(split, rows)),
        f"cl.{split}.truth_ratio": truth_ratio,
        f"cl.{split}.token_entropy": _mean([r.get("token_entropy") for r in rows]),
        f"cl.{split}.cosine": _mean([r.get("cosine") for r in rows]),
        f"cl.{split}.entailment": entailment,
        f"cl.{split}.mean_len": _mean([r.get("n_tokens") for r in rows]),
        f"cl.{split}.refusal_rate": _mean([r.get("refusal") for r in rows]),
        f"cl.{split}.opening_refusal_rate": _mean([r.get("opening_refusal") for r in rows]),
    }


def forget_truth_ratios(forget_rows: Sequence[dict]) -> list[float]:
    """Per-example open-unlearning tr on the forget split (the input of forget quality)."""
    return [m.ou_tr(r["nll_correct"], r["nll_perturbed"]) for r in forget_rows]


def _is_tofu(splits: Sequence[str]) -> bool:
    return "forget" in splits and all(s in splits for s in OU_SPLITS)


def _ou_prob_name(split: str) -> str:
    return "Q_A_Prob_normalised" if split in FORM_B_SPLITS else "Q_A_Prob"


def _ou_metrics(records: Mapping[str, Sequence[dict]], cfg: EvalConfig,
                retain_reference_tr: Sequence[float] | None) -> dict[str, float | None]:
    forget = records["forget"]
    out: dict[str, float | None] = {
        "ou.forget_Q_A_Prob": _mean(_probs("forget", forget)),
        "ou.forget_Q_A_ROUGE": _mean([r.get("rouge_ou") for r in forget]),
        "ou.forget_truth_ratio": m.ou_truth_ratio_forget(forget_truth_ratios(forget)),
    }
    for split, short in OU_SPLITS.items():
        rows = records[split]
        out[f"ou.{short}_{_ou_prob_name(split)}"] = _mean(_probs(split, rows))
        out[f"ou.{short}_Q_A_ROUGE"] = _mean([r.get("rouge_ou") for r in rows])
        out[f"ou.{short}_Truth_Ratio"] = m.ou_truth_ratio_true_better(
            [m.ou_tr(r["nll_correct"], r["nll_perturbed"]) for r in rows])
    out["ou.extraction_strength"] = _mean([
        m.extraction_strength(r["argmax_ids"], r["label_ids"], reference_quirk=cfg.es_reference_quirk)
        for r in forget
    ])
    out["ou.exact_memorization"] = _mean([m.exact_memorization(r["argmax_ids"], r["label_ids"]) for r in forget])
    out["ou.forget_quality"] = (None if retain_reference_tr is None
                                else m.forget_quality(forget_truth_ratios(forget), retain_reference_tr))
    out["ou.privleak"] = None  # needs a TOFU holdout split, which the data folder lacks
    return out


def aggregate_components(splits: Sequence[str], families: Sequence[str]) -> dict[str, list[str]]:
    """Each aggregate's input metric keys (cl: FE of 5, MU of 6 per non-forget split; ou: MU of 9)."""
    comps: dict[str, list[str]] = {}
    if "cl" in families:
        comps["cl.forget_efficacy"] = [f"cl.forget.{x}" for x in FE_METRICS]
        comps["cl.model_utility"] = [f"cl.{s}.{x}" for s in splits if s != "forget" for x in CL_METRICS]
        retain = "retain" if "retain" in splits else "neighbour"
        comps["cl.model_utility_retain"] = [f"cl.{retain}.{x}" for x in CL_METRICS]
    if "ou" in families and _is_tofu(splits):
        comps["ou.model_utility"] = [
            f"ou.{short}_{kind}" for split, short in OU_SPLITS.items()
            for kind in (_ou_prob_name(split), "Q_A_ROUGE", "Truth_Ratio")
        ]
    return comps


def _forget_efficacy(values: Sequence[float]) -> float:
    # A partial FE (allow_partial_aggregates) is 1 − the mean of the metrics available.
    return m.forget_efficacy(*values) if len(values) == len(FE_METRICS) else 1.0 - float(np.mean(values))


_COMBINE: dict[str, Callable[[Sequence[float]], float]] = {
    "cl.forget_efficacy": _forget_efficacy,
    "cl.model_utility": m.harmonic_mean,
    "cl.model_utility_retain": m.harmonic_mean,
    "ou.model_utility": m.harmonic_mean,
}


def aggregate_from_records(
    records_by_split: Mapping[str, Sequence[dict]],
    cfg: EvalConfig,
    retain_reference_tr: Sequence[float] | None = None,
) -> dict[str, float | None]:
    """Every knowledge metric from the per-example records, without the model.

    An aggregate with a null input is null; with `allow_partial_aggregates` it is also computed over
    the available inputs and stored under `<key>_partial` (see `aggregate_components`).
    """
    splits = list(records_by_split)
    out: dict[str, float | None] = {}
    if "cl" in cfg.families:
        for split, rows in records_by_split.items():
            out.update(_cl_split(split, rows))
    if "ou" in cfg.families and _is_tofu(splits):
        out.update(_ou_metrics(records_by_split, cfg, retain_reference_tr))
    for key, comps in aggregate_components(splits, cfg.families).items():
        values = [out[c] for c in comps]
        available = [v for v in values if v is not None]
        out[key] = _COMBINE[key](values) if len(available) == len(values) else None
        if cfg.allow_partial_aggregates and 0 < len(available) < len(values):
            out[f"{key}_partial"] = _COMBINE[key](available)
    return out


def describe_aggregates(metrics: Mapping[str, float | None], splits: Sequence[str],
                        families: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Which inputs each aggregate includes, and the key its value is stored under."""
    described = {}
    for key, comps in aggregate_components(splits, families).items():
        included = [c for c in comps if metrics.get(c) is not None]
        stored = None
        if metrics.get(key) is not None:
            stored = key
        elif f"{key}_partial" in metrics:
            stored = f"{key}_partial"
        described[key] = {"components": comps, "included": included, "stored_as": stored}
    return described


# ------------------------------------------------------------------------------ files


def read_knowledge_records(out_dir: Path, splits: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """The per-split records of a run directory (all `knowledge.<split>.jsonl` when splits is None)."""
    out_dir = Path(out_dir)
    if splits is None:
        splits = sorted(p.name.split(".")[1] for p in out_dir.glob(RECORD_FILE.format(split="*")))
    return {s: read_jsonl(out_dir / RECORD_FILE.format(split=s)) for s in splits}


def read_forget_truth_ratios(path: Path) -> list[float]:
    """Per-example forget tr saved by `evaluate_knowledge` (a run directory or the file itself);
    a retain-reference model's file gives another run its forget quality."""
    path = Path(path)
    if path.is_dir():
        path = path / FORGET_TR_FILE
    if not path.is_file():
        raise DataError(f"forget truth-ratio file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ou_tr"), list):
        raise DataError(f"{path}: expected an object with an 'ou_tr' list")
    return [float(x) for x in data["ou_tr"]]


# ------------------------------------------------------------------------------ evaluation


@dataclass
class _Row:
    split: str
    qa: QA
    prompt: str
    record: dict[str, Any]


def _correct_answer(qa: QA) -> tuple[str, str]:
    """The truth ratio's "correct" answer: the paraphrase where the split has one (forget, retain,
    real-world), else the answer itself (real authors, world facts)."""
    return ("paraphrased_answer", qa.paraphrased_answer) if qa.paraphrased_answer else ("answer", qa.answer)


def _nli_pair(row: _Row, generation: str, tofu: bool) -> tuple[str, str]:
    """(premise, hypothesis) as docs/metrics.md, CL-6 defines it: generation → answer on TOFU forget and on
    both real-world splits; reference → generation on the other TOFU splits."""
    if row.split == "forget" or not tofu:
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
                                        cfg.batch_size, cfg.nll_max_length, autocast_dtype=dtype)))
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
                       cfg.batch_size, autocast_dtype=dtype)
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


def evaluate_knowledge(
    model: PreTrainedModel,
    tokenizer: Any,
    benchmark: Benchmark,
    cfg: EvalConfig,
    model_cfg: ModelConfig,
    out_dir: Path,
    retain_reference_tr: Sequence[float] | None = None,
    forget_splits: Mapping[str, Sequence[QA]] | None = None,
) -> dict[str, float | None]:
    """Score the forget split and `benchmark.eval_splits`; write per-example records and return the metrics.

    `forget_splits` replaces `{"forget": benchmark.forget}`: a sequential round adds the cumulative
    "forgotten" set, a precise request the item's "siblings"; each is scored like a forget split.

    Files in out_dir: `knowledge.<split>.jsonl` (records), `knowledge.forget_truth_ratios.json`
    (per-example ou tr, reusable as another run's `retain_reference_tr`), `knowledge.json` (metrics,
    notes on null values and aggregate inputs, config). ou.forget_quality is null unless
    `retain_reference_tr` (a retain-reference model's forget tr) is given.
    """
    out_dir = Path(out_dir)
    splits = {**(forget_splits or {"forget": benchmark.forget}), **benchmark.eval_splits}
    rows = [
        _Row(split, qa, chat_prompt(tokenizer, qa.question, model_cfg),
             {"uid": qa.uid, "question": qa.question, "answer": qa.answer})
        for split, qas in splits.items() for qa in qas[: cfg.max_rows]
    ]
    tofu = _is_tofu(list(splits))
    run_cl, run_ou = "cl" in cfg.families, "ou" in cfg.families and tofu
    notes: dict[str, Any] = {
        "protocol": "one greedy generation per row shared by cl.* and ou.*; every prompt uses the model's "
                    "chat template (prompt presets unified in this project); the cl text is cut at "
                    f"{cfg.cl_max_length} total tokens, the ou text at {cfg.ou_max_new_tokens} new tokens",
        "rows": {s: sum(r.split == s for r in rows) for s in splits},
        "null_reasons": {},
    }
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
    metrics = aggregate_from_records(read_knowledge_records(out_dir, list(splits)), cfg, retain_reference_tr)
    if run_ou:
        if retain_reference_tr is None:
            notes["null_reasons"]["ou.forget_quality"] = "no retain-reference truth ratios given"
        notes["null_reasons"]["ou.privleak"] = "needs a TOFU holdout split (not in the data folder)"
    notes["aggregates"] = describe_aggregates(metrics, list(splits), cfg.families)
    atomic_write_json(out_dir / SUMMARY_FILE,
                      {"metrics": metrics, "notes": notes, "config": dataclasses.asdict(cfg)})
    return metrics
