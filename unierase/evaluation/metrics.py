"""Pure metric functions of the three families (cl, ou, ut) that docs/metrics.md defines.

Model-dependent inputs (NLLs, log-probs, embeddings, NLI labels, argmax predictions)
are passed in already computed, so every function here is deterministic and testable.
Per-row functions return one value; aggregates take the per-row values.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from scipy import stats

from unierase.evaluation import sandbox

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


# ---------------------------------------------------------------- UT accuracy and its standard error


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-evaluation-harness's `mean_stderr`: sample standard deviation (n − 1) / sqrt(n); for 0/1 values
    sqrt(p(1 − p)/(n − 1)). None below two values, where it is undefined."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return None
    return float(v.std(ddof=1) / math.sqrt(v.size))


def choice_predictions(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(pred, pred_norm) of lm-eval's multiple_choice scoring: the argmax of the summed continuation
    log-probs, and of those divided by each choice's length in characters (`acc_norm`; the first maximum wins)."""
    lls = _values(logprobs)
    lengths = np.asarray([float(len(c)) for c in choices])
    if lengths.size != lls.size or np.any(lengths == 0):
        raise ValueError("one non-empty choice per log-prob")
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


# ---------------------------------------------------------------- UT-1 MMLU

_MMLU_RE = re.compile(r"The correct answer is ([A-D])")
# A reply that opens with an option label: "B", "B.", "(B)", "B)", "B:" (SmolLM2 writes "B. mutualism.");
# not "A dog ...", where "A" is an article.
_MMLU_LEAD_RE = re.compile(r"\s*\(?([A-D])(?:[.):]|\s*$)")


def mmlu_extract(response: str) -> str | None:
    """Letter of the last "The correct answer is X" (case-sensitive), or None."""
    found = _MMLU_RE.findall(response)
    return found[-1] if found else None


def mmlu_correct(response: str, gold_letter: str) -> bool:
    """True iff the extracted letter equals the gold letter (no match is wrong)."""
    return mmlu_extract(response) == gold_letter


def mmlu_extract_lenient(response: str) -> str | None:
    """The strict letter, else the option label the reply opens with, or None."""
    strict = mmlu_extract(response)
    if strict is not None:
        return strict
    lead = _MMLU_LEAD_RE.match(response)
    return lead.group(1) if lead else None


# ---------------------------------------------------------------- UT-2 TriviaQA

_TQA_PHRASE = "The correct answer is"
_DROP_PUNCT = str.maketrans("", "", string.punctuation)


def triviaqa_extract(response: str) -> str:
    """Project extraction: rest of the line after the last answer phrase (or the whole
    response), stripped, minus one trailing period (so "St. Louis" survives)."""
    if _TQA_PHRASE in response:
        response = response.rsplit(_TQA_PHRASE, 1)[1].split("\n", 1)[0]
    text = response.strip()
    return text[:-1] if text.endswith(".") else text


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_DROP_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def triviaqa_correct(response: str, aliases: Sequence[str], match: str = "project", answer: str | None = None) -> bool:
    """Score one TriviaQA response.

    project: the normalised prediction is non-empty and contains some normalised alias.
    reference: lowercased prediction and gold (`answer`, the dataset's first answer)
    contain one another; an empty prediction therefore counts as correct.
    """
    pred = triviaqa_extract(response)
    if match == "project":
        norm = normalize_answer(pred)
        return bool(norm) and any(normalize_answer(a) in norm for a in aliases)
    if match == "reference":
        if answer is None:
            raise ValueError("reference matching needs the gold `answer` (aliases are unordered)")
        pred, gold = pred.lower(), answer.lower()
        return pred in gold or gold in pred
    raise ValueError(f"unknown match rule {match!r}")


def triviaqa_correct_lenient(response: str, aliases: Sequence[str]) -> bool:
    """Lenient: some normalised alias appears, as whole words, in the normalised first non-empty line of
    the response (no answer phrase needed; later lines, where a model lists guesses, do not count)."""
    line = next((ln for ln in response.splitlines() if ln.strip()), "")
    text = f" {normalize_answer(line)} "
    return any(f" {alias} " in text for alias in map(normalize_answer, aliases) if alias)


# ---------------------------------------------------------------- UT-3 GSM8K

_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def gsm8k_gold(answer_field: str) -> float:
    """Gold number: text after the last "#### ", commas removed."""
    return float(answer_field.rsplit("#### ", 1)[-1].replace(",", ""))


def gsm8k_extract(response: str, parse: str = "project") -> float | int | None:
    """Last number after the last "The final" (or in the whole response), "$" and "," removed.

    project: signed decimals (float); reference: last run of digits only (int).
    """
    tail = response.rsplit("The final", 1)[-1].replace("$", "").replace(",", "")
    if parse == "project":
        found = _NUMBER_RE.findall(tail)
        return float(found[-1]) if found else None
    if parse == "reference":
        found = re.findall(r"\d+", tail)
        return int(found[-1]) if found else None
    raise ValueError(f"unknown parse mode {parse!r}")


def gsm8k_correct(response: str, gold_answer_field: str, parse: str = "project") -> bool:
    """project: |pred - gold| < 1e-6. reference: pred == int(gold text), and a gold
    that int() cannot parse (one with a comma) is always wrong, as in the reference."""
    pred = gsm8k_extract(response, parse)
    if pred is None:
        return False
    if parse == "project":
        return abs(pred - gsm8k_gold(gold_answer_field)) < 1e-6
    try:
        return pred == int(gold_answer_field.rsplit("#### ", 1)[-1])
    except ValueError:
        return False


# lm-eval's gsm8k "flexible-extract" filter, and the cleanup its exact_match applies to both sides.
_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_EM_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def _em_clean(text: str) -> str:
    for pattern in _EM_IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def gsm8k_extract_lenient(response: str) -> str | None:
    """lm-eval's flexible-extract: the last number-like match anywhere in the response (None if none)."""
    found = _FLEXIBLE_RE.findall(response)
    if not found:
        return None
    return next(group for group in found[-1] if group).strip()


def gsm8k_correct_lenient(response: str, gold_answer_field: str) -> bool:
    """flexible-extract + lm-eval's exact_match: prediction and gold text equal once ",", "$", everything
    up to "#### " and one trailing "." are removed (a string match, so "18.0" is not "18")."""
    pred = gsm8k_extract_lenient(response)
    return pred is not None and _em_clean(pred) == _em_clean(gold_answer_field)


# ---------------------------------------------------------------- UT-4 HumanEval

# Opening fence with optional language tag, up to the closing fence (or the end).
_FENCE_RE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.S)


def humaneval_extract(response: str) -> str | None:
    """Code after the first "Code:", Markdown fences removed; None if "Code:" is missing."""
    if "Code:" not in response:
        return None
    code = response.split("Code:", 1)[1]
    fenced = _FENCE_RE.search(code)
    # Unfenced code may start on the "Code:" line itself; drop only that separating space,
    # so a body-only answer on the following lines keeps its indentation.
    code = fenced.group(1) if fenced else code.lstrip(" \t")
    return code.strip("\n").rstrip()


def humaneval_extract_lenient(response: str) -> str:
    """Lenient: the strict extraction, else the first fenced block, else the whole response."""
    strict = humaneval_extract(response)
    if strict is not None:
        return strict
    fenced = _FENCE_RE.search(response)
    return (fenced.group(1) if fenced else response).strip("\n").rstrip()


def humaneval_passes(code: str, test: str, entry_point: str, timeout_s: float = 3.0) -> bool:
    """Run code + test + check(entry_point) in the sandbox of `unierase.evaluation.sandbox`.

    Passes iff the harness reports that `check` returned (exit code 0 alone is not enough: an
    `os._exit(0)` in the completion fails) within `timeout_s`. The completion is untrusted model
    output: see the sandbox module for how it is isolated.
    """
    program = f"{code}\n\n{test}\n\ncheck({entry_point})\n"
    return sandbox.run_python(program, timeout_s).completed


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
