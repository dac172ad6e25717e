"""The robustness audit (unierase/evaluation/audit.py): suppression, the relearning split, token statistics,
and the whole audit on the tiny model through the Hydra config."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CACHE_ROOT, tiny_config
from test_pipeline import TINY_UNIERASE, isolated_cache, run_job

from unierase.chat import chat_prompt
from unierase.evaluation.audit import added_token_ids, relearn_halves
from unierase.evaluation.engine import generate_ids
from unierase.evaluation.membership import token_stats
from unierase.models import load_model
from unierase.records import QA

QUESTIONS = ["Who wrote the book?", "What is the capital?", "Name a colour.", "How old is the author today?"]


@pytest.fixture(scope="module")
def varied():
    """Larger init: greedy outputs vary (the default tiny model repeats one token)."""
    cfg = tiny_config(initializer_range=0.3)
    model, tokenizer = load_model(cfg, CACHE_ROOT, seed=0)
    return model, tokenizer, cfg


def test_suppression_removes_the_banned_ids_from_every_generation(varied):
    model, tokenizer, cfg = varied
    prompts = [chat_prompt(tokenizer, q, cfg) for q in QUESTIONS]
    free = generate_ids(model, tokenizer, prompts, [12] * len(prompts), batch_size=3)
    banned = sorted({t for row in free for t in row})[:5]  # ids the free decoding does choose
    assert banned
    suppressed = generate_ids(model, tokenizer, prompts, [12] * len(prompts), batch_size=3, banned_ids=banned)
    assert all(not set(row) & set(banned) for row in suppressed)
    assert suppressed != free


def test_token_stats_renormalise_without_the_banned_ids(varied):
    model, tokenizer, cfg = varied
    prompt, answer = chat_prompt(tokenizer, QUESTIONS[0], cfg), "Jane Doe wrote it."
    ids = tokenizer(prompt + answer, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    banned = [7, 11]
    (stats,) = token_stats(model, tokenizer, [prompt], [answer], banned, batch_size=1, max_length=200, dtype=None)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    first = len(ids) - len(answer_ids) - 1  # the position predicting the answer's first token
    expected = logp[first, answer_ids[0]].item()
    assert stats.logprobs[0] == pytest.approx(expected, abs=1e-4)
    kept = 1 - logp[first, banned].exp().sum().item()
    assert stats.suppressed_logprobs[0] == pytest.approx(expected - math.log(kept), abs=1e-4)
    assert len(stats.logprobs) == len(answer_ids) + 1  # the answer and the turn-end token
    assert all(s > 0 for s in stats.sigmas)


def test_relearning_trains_on_one_half_and_scores_the_other():
    rows = [QA(uid=str(i), question=f"q{i}", answer="a", group=f"author{i // 4}") for i in range(8)]
    trained, scored = relearn_halves(rows)
    assert {qa.uid for qa in trained}.isdisjoint(qa.uid for qa in scored)
    assert len(trained) + len(scored) == len(rows)
    assert {qa.group for qa in trained} == {qa.group for qa in scored}  # both halves cover every author


def test_added_token_ids_are_what_the_starting_vocabulary_lacks(tiny):
    _, tokenizer = tiny
    before = set(tokenizer.get_vocab())
    tokenizer.add_tokens(["<unlearn_0>", "<unlearn_1>"], special_tokens=True)
    assert added_token_ids(tokenizer, before) == tokenizer.convert_tokens_to_ids(["<unlearn_0>", "<unlearn_1>"])
    assert added_token_ids(tokenizer, set(tokenizer.get_vocab())) == []


AUDIT = ["eval.families=[cl,audit]", "eval.max_rows=4", "eval.audit.max_new_tokens=6",
         "eval.audit.relearn.epochs=1", "eval.audit.few_shot=2", "eval.audit.quant_group_size=16",
         "target.build_retain_reference=true", "benchmark.retain_authors=1"]


@pytest.mark.slow
def test_audit_of_unierase_end_to_end(tmp_path, data_dir):
    cache = isolated_cache(tmp_path)
    metrics, run_dir = run_job(tmp_path, TINY_UNIERASE + AUDIT, cache)
    summary = json.loads((run_dir / "eval" / "audit.json").read_text())
    banned = summary["notes"]["banned_tokens"]
    assert banned == ["<unlearn_0>"] and metrics["audit.suppression.banned_tokens"] == 1.0
    generations = [json.loads(line) for line in (run_dir / "eval" / "audit.generations.jsonl").read_text().splitlines()]
    attacks = {g["attack"] for g in generations}
    assert {"plain", "plain_suppressed", "paraphrase", "raw_format", "few_shot", "system_prompt",
            "ignore_instruction", "quant8", "quant4", "relearn"} <= attacks
    for attack in ("plain", "quant4", "paraphrase_suppressed"):
        rows = [g for g in generations if g["attack"] == attack and g["split"] == "forget"]
        assert len(rows) == 4
        assert metrics[f"audit.{attack}.forget_rouge"] == pytest.approx(sum(g["rouge"] for g in rows) / 4)
    relearn = summary["notes"]["relearn"]
    assert set(relearn["trained_uids"]).isdisjoint(relearn["scored_uids"])
    assert len([g for g in generations if g["attack"] == "relearn" and g["split"] == "forget"]) == 2
    for key in ("audit.mia.loss_auc", "audit.mia.min_k_pp_auc", "audit.mia.reference_auc", "audit.mia.privleak",
                "audit.relearn.base_forget_rouge", "audit.worst.forget_rouge"):
        assert metrics[key] is not None, key
    (references,) = (cache / "audit").glob("references-*/references.json")
    target = json.loads(references.read_text())["target"]
    for attack in ("plain", "paraphrase", "quant4"):
        value, of_target = metrics[f"audit.{attack}.forget_rouge"], target[f"audit.{attack}.forget_rouge"]
        ratio = metrics[f"audit.{attack}.forget_rouge_vs_target"]
        assert ratio == (pytest.approx(value / of_target) if of_target else None)
        gain = metrics[f"audit.{attack}.forget_rouge_gain"]
        assert gain == pytest.approx(value - metrics["audit.plain.forget_rouge"])
    assert 0.0 <= metrics["audit.mia.min_k_auc"] <= 1.0
    mia = [json.loads(line) for line in (run_dir / "eval" / "audit.mia.jsonl").read_text().splitlines()]
    assert [r["member"] for r in mia].count("holdout") == 4


def test_audit_of_a_baseline_reports_suppression_as_a_no_op(tmp_path, data_dir):
    metrics, run_dir = run_job(tmp_path, ["method=ga_gd", *AUDIT, "target.build_retain_reference=false",
                                          "eval.audit.attacks=[plain,suppression,mia]"], isolated_cache(tmp_path))
    assert metrics["audit.suppression.banned_tokens"] == 0.0
    assert metrics["audit.plain_suppressed.forget_rouge"] == metrics["audit.plain.forget_rouge"]
    assert metrics["audit.mia.loss_auc"] is not None and metrics["audit.mia.privleak"] is None
    notes = json.loads((run_dir / "eval" / "audit.json").read_text())["notes"]
    assert "no-op" in notes["suppression"] and "retain-reference" in notes["null_reasons"]["audit.mia.privleak"]
