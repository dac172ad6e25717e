"""Worked examples of the metric definitions (docs/metrics.md), one test per example group, with their
expected values."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from unierase.evaluation import metrics as m
from unierase.evaluation import utility_metrics as um

E = math.e
TIGHT = dict(abs=1e-5)


# ---------------------------------------------------------------- primitives (P1-P3)


def test_nll_to_prob():
    L = float(np.mean([0.5, 1.0, 1.5]))
    assert L == pytest.approx(1.0)
    assert m.prob_from_nll(L) == pytest.approx(0.36788, **TIGHT)


def test_rouge_l_recall_examples():
    assert m.rouge_l_recall("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert m.rouge_l_recall("Paris", "The Eiffel Tower is in Paris, France.") == 1.0
    assert m.rouge_l_recall("The author's full name is Hsiao Yun-Hwa.", "I don't know.") == 0.0
    # The reference is the first argument: swapping changes the denominator.
    assert m.rouge_l_recall("The Eiffel Tower is in Paris, France.", "Paris") == pytest.approx(1 / 7)


# ---------------------------------------------------------------- CL family


def test_cl1_rouge_mean():
    rows = [m.rouge_l_recall("the cat sat on the mat", "the cat is on the mat"), 0.0]
    assert np.mean(rows) == pytest.approx(0.41667, **TIGHT)


def test_cl2_prob_forms():
    form_a = np.mean([m.prob_from_nll(1.0), m.prob_from_nll(0.5)])
    assert form_a == pytest.approx(0.48721, **TIGHT)
    assert m.normalised_prob(0.5, [0.2, 0.2, 0.1]) == pytest.approx(0.5)


def test_cl3_truth_ratio():
    Rs = [m.truth_ratio_R(1.0, [2.0] * 5), m.truth_ratio_R(2.0, [2.0] * 5)]
    assert Rs == pytest.approx([E, 1.0])
    assert m.cl_truth_ratio_forget(Rs) == pytest.approx(0.31606, **TIGHT)
    assert m.cl_truth_ratio_nonforget(Rs) == pytest.approx(0.31606, **TIGHT)
    # R = 1/e adds nothing to TR_N and counts for TR_F exactly like R = e.
    assert m.cl_truth_ratio_nonforget([1 / E]) == 0.0
    assert m.cl_truth_ratio_forget([1 / E]) == pytest.approx(m.cl_truth_ratio_forget([E]))
    # R is a ratio of geometric means: mean of perturbed NLLs, not of probabilities.
    assert m.truth_ratio_R(1.0, [1.0, 3.0]) == pytest.approx(E)


@pytest.mark.parametrize(
    "tokens, expected",
    [(["a", "b", "a", "c"], 0.75), (["a", "a"], 0.0), (["x"], 0.0), ([], 0.0), (list("abcdefg"), 1.0)],
)
def test_cl4_token_entropy(tokens, expected):
    assert m.token_entropy(tokens) == pytest.approx(expected, abs=1e-12)


def test_cl5_cosine_mock():
    scores = [m.cosine_score(np.array([1.0, 0.0]), np.array([0.6, 0.8])),
              m.cosine_score(np.array([1.0, 0.0]), np.array([-1.0, 0.0]))]
    assert scores == pytest.approx([0.6, 0.0])
    assert np.mean(scores) == pytest.approx(0.3)


def test_cl6_entailment():
    labels = m.entailment_labels(["entailment", "neutral", "entailment", "contradiction"], [0.5, 0.9, 0.05, 0.3])
    assert labels == ["entailment", "neutral", "none", "contradiction"]
    assert m.entailment_score(labels) == pytest.approx(0.25)
    assert m.entailment_labels(["entailment"], [0.1]) == ["entailment"]  # the cut is strict (< 0.1)
    with pytest.raises(ValueError):
        m.entailment_labels(["entailment"], [0.5, 0.5])


def test_cl_forget_efficacy():
    assert m.forget_efficacy(0.0235, 0.4326, 0.4746, 0.0514, 0.0033) == pytest.approx(0.80292, **TIGHT)


RA = [0.9580, 0.4443, 0.5635, 0.9845, 0.9390, 0.7400]
WF = [0.9031, 0.5176, 0.6680, 0.9667, 0.9112, 0.6667]
RETAIN = [0.8706, 0.9419, 0.5244, 0.9652, 0.9176, 0.8000]


def test_cl_model_utility_regression_row():
    assert m.harmonic_mean(RA + WF + RETAIN) == pytest.approx(0.74496, **TIGHT)
    assert m.harmonic_mean(RETAIN) == pytest.approx(0.80074, **TIGHT)


def test_harmonic_mean_small_cases():
    assert m.harmonic_mean([0.5, 1.0]) == pytest.approx(0.66667, **TIGHT)
    assert m.harmonic_mean([0.5, 0.5, 1.0]) == pytest.approx(0.6)
    assert m.harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    for bad in ([], [0.5, -0.1]):
        with pytest.raises(ValueError):
            m.harmonic_mean(bad)


# ---------------------------------------------------------------- OU family


def test_ou_truth_ratio():
    assert m.ou_tr(1.0, [2.0] * 5) == pytest.approx(1 / E)  # = 1/R
    assert m.ou_tr(2.0, [2.0, 2.0, 2.0]) == pytest.approx(1.0)
    trs = [1 / E, 1.0]
    assert m.ou_truth_ratio_forget(trs) == pytest.approx(0.68394, **TIGHT)
    assert m.ou_truth_ratio_true_better(trs) == pytest.approx(0.31606, **TIGHT)
    # Orientation: ou forget aggregate ~ 1 - cl TR_F on the same rows.
    Rs = [m.truth_ratio_R(1.0, [2.0] * 5), m.truth_ratio_R(2.0, [2.0] * 5)]
    assert m.ou_truth_ratio_forget(trs) == pytest.approx(1 - m.cl_truth_ratio_forget(Rs), abs=1e-8)


def test_ou_model_utility_nine():
    assert m.harmonic_mean([0.9, 0.6, 0.5, 0.45, 0.95, 0.55, 0.5, 0.9, 0.65]) == pytest.approx(0.61982, **TIGHT)


def test_forget_quality_ks():
    assert m.forget_quality([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252, abs=1e-9)
    assert m.forget_quality([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(0.0079365, abs=1e-7)
    assert m.forget_quality([0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.5, 0.6]) == pytest.approx(0.77143, **TIGHT)
    trs = [0.2, 0.5, 0.9, 1.3, 0.7, 0.05]
    assert m.forget_quality(trs, list(trs)) == 1.0
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 1.0, 100)
    assert m.forget_quality(base, base + 5.0) < 1e-10
    # KS is rank-based: tr = 1/R gives the same p-value as R.
    a, b = [0.5, 1.2, 2.0, 3.1], [0.4, 0.9, 1.1, 5.0, 6.0]
    assert m.forget_quality(1 / np.array(a), 1 / np.array(b)) == pytest.approx(m.forget_quality(a, b))


def test_extraction_strength_and_em():
    labels = [5, 6, 7, 8]
    assert m.extraction_strength([5, 9, 7, 8], labels) == 0.5
    assert m.extraction_strength(labels, labels) == 1.0
    assert m.extraction_strength([5, 6, 7, 0], labels) == 0.0
    assert m.extraction_strength([5, 6, 7, 0], labels, reference_quirk=True) == 0.25
    assert m.extraction_strength([5, 9, 7, 8], labels, reference_quirk=True) == 0.5  # quirk only bites at the end
    assert m.exact_memorization([5, 9, 7, 8], labels) == 0.75



def test_mmlu():
    assert um.mmlu_correct("Because of X. The correct answer is B.", "B")
    assert um.mmlu_correct("The correct answer is A. On reflection, The correct answer is C.", "C")
    assert not um.mmlu_correct("Answer: B", "B")
    assert um.mmlu_extract("the correct answer is B") is None  # case-sensitive


def test_mmlu_lenient_reads_a_leading_option_label():
    assert um.mmlu_extract_lenient("B. mutualism.") == "B"  # what SmolLM2 writes; the strict rule gives None
    assert um.mmlu_extract_lenient("(C) 42") == "C" and um.mmlu_extract_lenient(" D") == "D"
    assert um.mmlu_extract_lenient("A dog barks.") is None  # an article, not an option
    assert um.mmlu_extract_lenient("B. no. The correct answer is C.") == "C"  # the strict phrase wins


# ---------------------------------------------------------------- lm-evaluation-harness definitions (UT)


def test_mean_stderr_is_lm_evals():
    # lm_eval.api.metrics.mean_stderr = sample_stddev / sqrt(n); for 0/1 values sqrt(p(1 − p)/(n − 1)).
    assert um.mean_stderr([1, 0, 0, 1]) == pytest.approx(math.sqrt(1 / 3) / 2, **TIGHT)  # 0.28868
    assert um.mean_stderr([1] * 3 + [0] * 7) == pytest.approx(math.sqrt(0.3 * 0.7 / 9), **TIGHT)  # 0.15275
    assert um.mean_stderr([1, 1, 1]) == 0.0
    assert um.mean_stderr([1]) is None and um.mean_stderr([]) is None


def test_choice_predictions_acc_and_acc_norm():
    # lm-eval's multiple_choice: pred = argmax(lls); pred_norm = argmax(lls / len(choice)) in characters.
    lls = [-10.0, -12.0, -9.5, -20.0]
    assert um.choice_predictions(lls, ["Paris", "the city of Lyon", "Rome", "a"]) == (2, 1)  # -2, -0.75, -2.375, -20
    assert um.choice_predictions(lls, ["A", "B", "C", "D"]) == (2, 2)  # letters: acc_norm is acc
    assert um.choice_predictions([-1.0, -1.0], ["x", "y"]) == (0, 0)  # ties: the first maximum
    with pytest.raises(ValueError):
        um.choice_predictions([-1.0], ["x", "y"])


GSM_LENIENT = [  # response, gold field, lm-eval flexible-extract + exact_match
    ("48/2 = 24 in May, 48+24 = 72 clips in total.", "...\n#### 72", True),
    ("So the answer is $1,018.", "#### 1018", True),  # "$1,018." -> "1018"
    ("It costs 3.50 dollars", "#### 3.5", False),  # a string match: 3.50 is not 3.5
    ("Answer: 18.0", "#### 18", False),
    ("The final answer is 7. Check: 2 + 5", "#### 7", False),  # the last number, wherever it is
    ("I am not sure.", "#### 3", False),
]


@pytest.mark.parametrize("response, gold, correct", GSM_LENIENT)
def test_gsm8k_lenient_is_flexible_extract(response, gold, correct):
    assert um.gsm8k_correct_lenient(response, gold) is correct


def test_gsm8k_flexible_extract_matches():
    assert um.gsm8k_extract_lenient("a -12 b 7") == "7"
    assert um.gsm8k_extract_lenient("It is -1,234.") == "-1,234."
    assert um.gsm8k_extract_lenient("none") is None


def test_triviaqa_lenient_reads_the_first_line():
    burke = ["Kathy Burke", "Katherine Lucy Bridget Burke"]
    assert um.triviaqa_correct_lenient("\nKathy Burke played Valerie.\nMore text.", burke)
    assert not um.triviaqa_correct_lenient("Some actress.\nKathy Burke", burke)  # later lines do not count
    assert not um.triviaqa_correct_lenient("Parisian food", ["Paris"])  # whole words
    assert um.triviaqa_correct_lenient("It is the Onions!", ONION)


def test_humaneval_lenient_extraction():
    assert um.humaneval_extract_lenient("Code: def f(): return 1") == "def f(): return 1"  # strict first
    assert um.humaneval_extract_lenient("Here:\n```python\ndef f():\n    return 1\n```") == "def f():\n    return 1"
    assert um.humaneval_extract_lenient("    return 1\n") == "    return 1"


ONION = ["Onion skins", "Onion", "Bulb onion", "Onions"]


def test_triviaqa_project_and_reference():
    assert um.triviaqa_correct("The correct answer is onions.", ONION)
    assert um.triviaqa_correct("The correct answer is a red onion.", ONION)
    assert not um.triviaqa_correct("The correct answer is .", ONION)
    assert um.triviaqa_correct("The correct answer is .", ONION, match="reference", answer="Onion")
    assert um.triviaqa_correct("The correct answer is onions.", ONION, match="reference", answer="Onion")
    assert not um.triviaqa_correct("The correct answer is garlic.", ONION)
    assert not um.triviaqa_correct("The correct answer is garlic.", ONION, match="reference", answer="Onion")
    with pytest.raises(ValueError):
        um.triviaqa_correct("The correct answer is onions.", ONION, match="reference")


def test_triviaqa_extraction_and_normalisation():
    assert um.triviaqa_extract("Hmm.\nThe correct answer is St. Louis.\nDone.") == "St. Louis"
    assert um.triviaqa_extract("  Paris. ") == "Paris"  # no phrase: the whole response
    assert um.normalize_answer("  The  Beatles'  ") == "beatles"


GSM_CASES = [  # response, gold field, project verdict, reference verdict
    ("Adding up... The final answer is $1,018.", "so 1018\n#### 1018", True, True),
    ("The final answer is 18.0", "#### 18", True, False),
    ("The final answer is -5.", "#### -5", True, False),
    ("The final answer is 1,018.", "#### 1,018", True, False),  # comma gold: never right in reference
    ("I am not sure.", "#### 3", False, False),
]


@pytest.mark.parametrize("response, gold, project, reference", GSM_CASES)
def test_gsm8k_both_modes(response, gold, project, reference):
    assert um.gsm8k_correct(response, gold) is project
    assert um.gsm8k_correct(response, gold, parse="reference") is reference


def test_gsm8k_gold_and_extract():
    assert um.gsm8k_gold("a\n#### 1,018") == 1018.0
    assert um.gsm8k_gold("#### -5") == -5.0
    assert um.gsm8k_extract("We get 3. The final answer is 18.0") == 18.0
    assert um.gsm8k_extract("The final answer is 18.0", parse="reference") == 0


ADD_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n"


def test_humaneval_mock_item():
    good = um.humaneval_extract("Code: def add(a, b): return a + b")
    assert good == "def add(a, b): return a + b"
    assert um.humaneval_passes(good, ADD_TEST, "add")
    assert not um.humaneval_passes(um.humaneval_extract("Code: def add(a, b): return a - b"), ADD_TEST, "add")
    assert um.humaneval_extract("Here it is") is None


def test_humaneval_fences_and_real_item():
    fenced = "Sure.\nCode:\n```python\ndef add(a, b):\n    return a + b\n```\nHope this helps."
    assert um.humaneval_extract(fenced) == "def add(a, b):\n    return a + b"
    assert um.humaneval_extract("Code:\n    return a + b\n") == "    return a + b"  # body keeps indentation
    path = Path(__file__).resolve().parents[2] / "shared/data/utility/human_eval.jsonl"
    if not path.exists():
        pytest.skip("shared HumanEval data not present")
    item = json.loads(path.read_text().splitlines()[0])
    code = item["prompt"] + item["canonical_solution"]
    assert um.humaneval_passes(code, item["test"], item["entry_point"])
    assert not um.humaneval_passes(item["prompt"] + "    return None\n", item["test"], item["entry_point"])


def test_humaneval_hard_exit_and_infinite_loop():
    assert not um.humaneval_passes("import os\nos._exit(3)", ADD_TEST, "add")  # the reference counted this as a pass
    start = time.monotonic()
    assert not um.humaneval_passes("def add(a, b):\n    while True:\n        pass", ADD_TEST, "add", timeout_s=1.0)
    assert time.monotonic() - start < 10


def test_refusal_rate():
    pool = ["I don't know.", "I have no idea."]
    rows = [("Not sure about that one.", 0.62), ("Paris.", 0.30), ("  I don't know.\n", 0.1)]
    flags = [m.is_refusal(r, pool, c) for r, c in rows]
    assert flags == [True, False, True]
    assert np.mean(flags) == pytest.approx(0.66667, **TIGHT)
    assert m.is_refusal("x", pool, 0.5)  # the threshold is inclusive


def test_opening_refusal_reads_the_first_sentence():
    pool = ["I'm not certain about that."]
    rambling = "I'm not certain about that.Dreamhard:Dreamhard,Dreamhard"
    assert m.first_sentence(rambling) == "I'm not certain about that."
    assert m.first_sentence("  Who knows? Not me.") == "Who knows?"
    assert m.first_sentence("No punctuation at all ") == "No punctuation at all"
    assert m.first_sentence("") == ""
    # Measured cosines of a real run's generation: whole text 0.25, its first sentence a pool line.
    assert not m.is_refusal(rambling, pool, 0.25)
    assert m.is_refusal(m.first_sentence(rambling), pool, 0.25)
