"""Knowledge aggregates from per-example records (docs/metrics.md): `cl.*` on every split, `ou.*` on TOFU,
forget efficacy and model utility. `evaluate_knowledge` writes the records and each split's role
(`SplitRole`, in `knowledge.json`); everything here reads only them, so a later re-analysis of a run
directory gives the same numbers."""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unierase.evaluation import metrics as m
from unierase.evaluation.config import EvalConfig
from unierase.io import DataError, read_jsonl
from unierase.records import SplitRole

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


def _cl_split(split: str, rows: Sequence[dict], role: SplitRole) -> dict[str, float | None]:
    rouges = [r.get("rouge") for r in rows]
    nli = [r.get("nli_label") for r in rows]
    entailment = None
    if all(x is not None for x in nli + rouges):
        entailment = m.entailment_score(m.entailment_labels(nli, rouges))
    truth_ratio = None  # a row without perturbed answers (custom data) has no R: null, never a mean over fewer rows
    if all(r["nll_perturbed"] for r in rows):
        Rs = [m.truth_ratio_R(r["nll_correct"], r["nll_perturbed"]) for r in rows]
        truth_ratio = m.cl_truth_ratio_forget(Rs) if role is SplitRole.FORGET else m.cl_truth_ratio_nonforget(Rs)
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


def forget_truth_ratios(forget_rows: Sequence[dict]) -> list[float | None]:
    """Per-example open-unlearning tr on the forget split (the input of forget quality); None for a row without
    perturbed answers (custom data; TOFU's rows all have them)."""
    return [m.ou_tr(r["nll_correct"], r["nll_perturbed"]) if r["nll_perturbed"] else None for r in forget_rows]


def is_tofu(splits: Sequence[str]) -> bool:
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
    return out


def check_roles(splits: Sequence[str], roles: Mapping[str, SplitRole]) -> None:
    """Every split has a role, and `forget` (the request, forget efficacy's input) is forget-like."""
    missing = [s for s in splits if s not in roles]
    if missing:
        raise ValueError(f"split(s) {missing} have no role (SplitRole)")
    if "forget" in splits and roles["forget"] is not SplitRole.FORGET:
        raise ValueError(f"the 'forget' split must have role forget, not {roles['forget'].value}")


def aggregate_components(splits: Sequence[str], roles: Mapping[str, SplitRole],
                         families: Sequence[str]) -> dict[str, list[str]]:
    """Each aggregate's input metric keys: cl forget efficacy, 5 metrics of `forget` (the request); cl model
    utility, 6 per utility-role split; ou model utility, 9 (TOFU). Forget-like splits other than `forget`
    (a sequential round's `forgotten`, a precise item's siblings) and role `other` enter none."""
    check_roles(splits, roles)
    comps: dict[str, list[str]] = {}
    if "cl" in families:
        comps["cl.forget_efficacy"] = [f"cl.forget.{x}" for x in FE_METRICS]
        comps["cl.model_utility"] = [f"cl.{s}.{x}" for s in splits if roles[s] is SplitRole.UTILITY
                                     for x in CL_METRICS]
        retain = "retain" if "retain" in splits else "neighbour"
        comps["cl.model_utility_retain"] = [f"cl.{retain}.{x}" for x in CL_METRICS] if retain in splits else []
    if "ou" in families and is_tofu(splits):
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
    roles: Mapping[str, SplitRole],
    cfg: EvalConfig,
    retain_reference_tr: Sequence[float] | None = None,
) -> dict[str, float | None]:
    """Every knowledge metric from the per-example records and the splits' roles, without the model.

    An aggregate with a null input is null; with `allow_partial_aggregates` it is also computed over
    the available inputs and stored under `<key>_partial` (see `aggregate_components`).
    """
    splits = list(records_by_split)
    check_roles(splits, roles)
    out: dict[str, float | None] = {}
    if "cl" in cfg.families:
        for split, rows in records_by_split.items():
            out.update(_cl_split(split, rows, roles[split]))
    if "ou" in cfg.families and is_tofu(splits):
        out.update(_ou_metrics(records_by_split, cfg, retain_reference_tr))
    for key, comps in aggregate_components(splits, roles, cfg.families).items():
        values = [out[c] for c in comps]
        available = [v for v in values if v is not None]
        out[key] = _COMBINE[key](values) if values and len(available) == len(values) else None  # no input: null
        if cfg.allow_partial_aggregates and 0 < len(available) < len(values):
            out[f"{key}_partial"] = _COMBINE[key](available)
    return out


def describe_aggregates(metrics: Mapping[str, float | None], roles: Mapping[str, SplitRole],
                        families: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Which inputs each aggregate includes, and the key its value is stored under."""
    described = {}
    for key, comps in aggregate_components(list(roles), roles, families).items():
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


def read_split_roles(out_dir: Path) -> dict[str, SplitRole]:
    """The roles `evaluate_knowledge` recorded in a run directory's `knowledge.json` (`notes.roles`)."""
    path = Path(out_dir) / SUMMARY_FILE
    try:
        roles = json.loads(path.read_text(encoding="utf-8"))["notes"]["roles"]
        return {split: SplitRole(role) for split, role in roles.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: no readable split roles (notes.roles): {type(err).__name__}: {err}") from None


def read_forget_truth_ratios(path: Path) -> list[float | None]:
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
    return [None if x is None else float(x) for x in data["ou_tr"]]
