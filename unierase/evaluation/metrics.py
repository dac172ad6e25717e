"""Pure metric functions of the knowledge families (cl, ou) and the refusal detector, as docs/metrics.md
defines them; the general-ability ones (ut) are in utility_metrics.py.

Model-dependent inputs (NLLs, log-probs, embeddings, NLI labels, argmax predictions)
are passed in already computed, so every function here is deterministic and testable.
Per-row functions return one value; aggregates take the per-row values.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from scipy import stats

# The scorer holds no per-call state, so one instance serves every call.
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

# Added to probability denominators exactly where open-unlearning adds it.
_OU_EPS = 1e-10


def _values(values: Sequence[float]) -> np.ndarray:
    """Float array of `values`; an empty input is an error, not a silent NaN."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("empty input")
    return arr


# ---------------------------------------------------------------- primitives (docs/metrics.md, Conventions)


def rouge_l_recall(reference: str, generation: str) -> float:
    """ROUGE-L recall: LCS / number of reference tokens (P3)."""
    return _ROUGE.score(reference, generation)["rougeL"].recall


def prob_from_nll(mean_nll: float) -> float:
    """Length-normalised probability P = exp(-L) from a mean token NLL (P1)."""
    return math.exp(-mean_nll)


def normalised_prob(p_correct: float, p_perturbed: Sequence[float]) -> float:
    """CL-2 Form B for one row: P / (P + sum_j P_j)."""
    return p_correct / (p_correct + float(np.sum(p_perturbed)))


# ---------------------------------------------------------------- truth ratio


def truth_ratio_R(nll_correct: float, nll_perturbed: Sequence[float]) -> float:
    """Closer-look R = exp(mean_j L(perturbed_j) - L(correct)) = P(correct) / geo-mean P(perturbed)."""
    return math.exp(float(np.mean(_values(nll_perturbed))) - nll_correct)


def cl_truth_ratio_forget(Rs: Sequence[float]) -> float:
    """CL TR_F = 1 - mean min(R, 1/R); lower is better forgetting."""
    r = _values(Rs)
    return float(1.0 - np.mean(np.minimum(r, 1.0 / r)))


def cl_truth_ratio_nonforget(Rs: Sequence[float]) -> float:
    """CL TR_N = mean max(0, 1 - 1/R); higher is better."""
    r = _values(Rs)
    return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / r)))


def ou_tr(nll_correct: float, nll_perturbed: Sequence[float]) -> float:
    """open-unlearning tr = P_wrong / (P_correct + 1e-10), P_wrong = exp(-mean_j L_j) (~ 1/R)."""
    p_wrong = math.exp(-float(np.mean(_values(nll_perturbed))))
    return p_wrong / (math.exp(-nll_correct) + _OU_EPS)


def ou_truth_ratio_forget(trs: Sequence[float]) -> float:
    """open-unlearning forget aggregate mean min(tr, 1/(tr+1e-10)); 1 = indifferent."""
    tr = _values(trs)
    return float(np.mean(np.minimum(tr, 1.0 / (tr + _OU_EPS))))


def ou_truth_ratio_true_better(trs: Sequence[float]) -> float:
    """open-unlearning non-forget aggregate mean max(0, 1 - tr)."""
    return float(np.mean(np.maximum(0.0, 1.0 - _values(trs))))


# ---------------------------------------------------------------- CL-4..CL-6


def token_entropy(tokens: Sequence[str]) -> float:
    """Unigram entropy in bits over log2(n); 0 when n <= 1 (CL-4)."""
    n = len(tokens)
    if n <= 1:
        return 0.0
    f = np.array(list(Counter(tokens).values()), dtype=float) / n
    return float(-np.sum(f * np.log2(f)) / math.log2(n))


def cosine_score(a: np.ndarray, b: np.ndarray) -> float:
    """max(0, cos(a, b)) for one pair of embeddings (CL-5)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(max(0.0, a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))


def entailment_labels(raw_labels: Sequence[str], rouges: Sequence[float], threshold: float = 0.1) -> list[str]:
    """Replace the NLI label by "none" where the row's ROUGE-L recall < threshold (CL-6)."""
    return [lab if r >= threshold else "none" for lab, r in zip(raw_labels, rouges, strict=True)]


def entailment_score(labels: Sequence[str]) -> float:
    """Fraction of rows labelled "entailment"."""
    return float(np.mean(_values([lab == "entailment" for lab in labels])))


# ---------------------------------------------------------------- aggregates


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; any 0 gives 0."""
    v = _values(values)
    if np.any(v < 0):
        raise ValueError("harmonic mean needs non-negative values")
    if np.any(v == 0):
        return 0.0
    return float(v.size / np.sum(1.0 / v))


def forget_efficacy(rouge: float, prob: float, truth_ratio_forget: float, cosine: float, entailment: float) -> float:
    """cl.forget_efficacy = 1 - mean of the five Forget metrics (token entropy excluded)."""
    return 1.0 - (rouge + prob + truth_ratio_forget + cosine + entailment) / 5.0


def forget_quality(tr_model: Sequence[float], tr_retain: Sequence[float]) -> float:
    """ou.forget_quality: two-sample KS p-value (scipy default method: exact for small samples)."""
    return float(stats.ks_2samp(_values(tr_model), _values(tr_retain)).pvalue)


# ---------------------------------------------------------------- open-unlearning token metrics


def extraction_strength(predictions: Sequence[int], labels: Sequence[int], reference_quirk: bool = False) -> float:
    """ES = 1 - k*/n, k* the smallest k with predictions[k:] == labels[k:].

    With `reference_quirk`, k* is capped at n-1 as in open-unlearning's loop, so a
    wrong last token gives 1/n instead of 0.
    """
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError("need equally long, non-empty predictions and labels")
    match = np.asarray(predictions) == np.asarray(labels)
    n = match.size
    wrong = np.flatnonzero(~match)
    k = int(wrong[-1]) + 1 if wrong.size else 0  # the suffix after the last mistake is all correct
    if reference_quirk:
        k = min(k, n - 1)
    return 1.0 - k / n


def exact_memorization(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of answer positions whose argmax prediction equals the label."""
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    return float(np.mean(_values(np.asarray(predictions) == np.asarray(labels))))


# ---------------------------------------------------------------- UT-5 refusal


def is_refusal(response: str, pool: Sequence[str], max_cosine: float, threshold: float = 0.5) -> bool:
    """Refusal iff the stripped response equals a pool line, or max_j cos(response, pool_j) >= threshold."""
    text = response.strip()
    return any(text == line.strip() for line in pool) or max_cosine >= threshold


def first_sentence(response: str) -> str:
    """The response up to and including its first '.', '?' or '!' (all of it when it has none).

    Our addition, for "refuses first": an answer that opens with a refusal and then rambles on is a refusal at
    its start but not as a whole, and the two rates tell these apart.
    """
    text = response.strip()
    match = re.search(r"[.?!]", text)
    return text[: match.end()] if match else text
