"""Pure metric functions of general ability (`ut`, docs/metrics.md): accuracy with its standard error,
and per benchmark the strict (protocol) and lenient answer extraction. HumanEval programs run in the
sandbox (unierase/evaluation/sandbox/)."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

import numpy as np

from unierase.evaluation import sandbox

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
    lls = np.asarray(logprobs, dtype=float)
    if lls.size == 0:
        raise ValueError("empty input")
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
