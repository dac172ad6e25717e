"""Split roles (docs/metrics.md, "Split roles"): each setting declares them where it makes its splits, and the
knowledge aggregates read them, never the split names: forget-like splits use the forget forms and stay out
of model utility, utility splits are its inputs, `other` splits are reported only. Hand-made records, no model
in the aggregate tests."""
from __future__ import annotations

import math

import pytest
from conftest import eval_config

from unierase.context import RunContext
from unierase.evaluation import metrics as m
from unierase.evaluation.aggregate import aggregate_components, aggregate_from_records, check_roles
from unierase.method import Unlearner
from unierase.records import QA, Benchmark, SplitRole
from unierase.settings import SettingConfig, run_batch, run_precise, run_sequential
from unierase.training import TrainerConfig

FORGET, UTILITY, OTHER = SplitRole.FORGET, SplitRole.UTILITY, SplitRole.OTHER
TOFU_UTILITY = ("retain", "real_authors", "world_facts")
CL = ("rouge", "prob", "truth_ratio", "token_entropy", "cosine", "entailment")


def _row(i: int, nll_correct: float, nll_perturbed: float, rouge: float) -> dict:
    """One record with every field the aggregates read (NLI label included, so no aggregate is partial)."""
    return {"uid": f"u{i}", "rouge": rouge, "rouge_ou": rouge, "nll_answer": nll_correct, "nll_correct": nll_correct,
            "nll_perturbed": [nll_perturbed] * 3, "token_entropy": 0.5 + 0.1 * i, "cosine": 0.6, "n_tokens": 10,
            "nli_label": "entailment", "refusal": False, "opening_refusal": False,
            "argmax_ids": [1, 2], "label_ids": [1, 2]}


def _records(splits: list[str]) -> dict[str, list[dict]]:
    # R = exp(L(perturbed) − L(correct)): e on row 0 and 1 on row 1 in every split (the SPEC's CL-3 example).
    return {s: [_row(0, 1.0, 2.0, 0.9), _row(1, 2.0, 2.0, 0.7)] for s in splits}


TR_FORGET = 1 - (math.exp(-1) + 1) / 2  # 0.31606
TR_NONFORGET = (1 - math.exp(-1)) / 2  # 0.31606 as well: the tests tell the forms apart with R = 1/e


def _mu_inputs(out: dict, splits: list[str]) -> list[float]:
    return [out[f"cl.{s}.{x}"] for s in splits for x in CL]


def test_sequential_round_forgotten_is_forget_like_and_outside_model_utility():
    cfg = eval_config("fast")
    splits = ["forget", "forgotten", *TOFU_UTILITY]
    records = _records(splits)
    records["forgotten"][0]["nll_correct"] = 3.0  # R = 1/e on row 0: the two TR forms now differ
    roles = {"forget": FORGET, "forgotten": FORGET} | dict.fromkeys(TOFU_UTILITY, UTILITY)
    out = aggregate_from_records(records, roles, cfg)

    comps = aggregate_components(splits, roles, cfg.families)
    assert len(comps["cl.model_utility"]) == 18 and not any("forgotten" in c for c in comps["cl.model_utility"])
    assert out["cl.model_utility"] == pytest.approx(m.harmonic_mean(_mu_inputs(out, list(TOFU_UTILITY))))
    assert out["cl.forget.truth_ratio"] == pytest.approx(TR_FORGET)
    # forgotten: the forget form, where R = 1/e counts like R = e (the non-forget form would give 0 for it).
    assert out["cl.forgotten.truth_ratio"] == pytest.approx(TR_FORGET)
    assert out["cl.retain.truth_ratio"] == pytest.approx(TR_NONFORGET)
    assert out["cl.forget_efficacy"] == pytest.approx(m.forget_efficacy(
        *(out[f"cl.forget.{x}"] for x in ("rouge", "prob", "truth_ratio", "cosine", "entailment"))))

    # What the names alone used to give: forgotten in model utility (24 inputs) with the non-forget form.
    legacy = aggregate_from_records(records, roles | {"forgotten": UTILITY}, cfg)
    assert legacy["cl.forgotten.truth_ratio"] == pytest.approx(0.0)
    assert legacy["cl.model_utility"] != pytest.approx(out["cl.model_utility"])


def test_precise_siblings_are_forget_like_at_the_start_and_after_each_item():
    cfg = eval_config("fast")
    start_splits = ["forget", "siblings_1", "siblings_3", *TOFU_UTILITY]
    start_roles = {"forget": FORGET, "siblings_1": FORGET, "siblings_3": FORGET} | dict.fromkeys(TOFU_UTILITY, UTILITY)
    start = aggregate_from_records(_records(start_splits), start_roles, cfg)
    assert aggregate_components(start_splits, start_roles, cfg.families)["cl.model_utility"] == [
        f"cl.{s}.{x}" for s in TOFU_UTILITY for x in CL]
    assert start["cl.model_utility"] == pytest.approx(m.harmonic_mean(_mu_inputs(start, list(TOFU_UTILITY))))

    item_splits = ["forget", "siblings", *TOFU_UTILITY]
    records = _records(item_splits)
    records["siblings"][0]["nll_correct"] = 3.0
    roles = {"forget": FORGET, "siblings": FORGET} | dict.fromkeys(TOFU_UTILITY, UTILITY)
    item = aggregate_from_records(records, roles, cfg)
    assert item["cl.siblings.truth_ratio"] == pytest.approx(TR_FORGET)
    assert item["cl.model_utility"] == pytest.approx(m.harmonic_mean(_mu_inputs(item, list(TOFU_UTILITY))))
    assert item["ou.model_utility"] is not None  # the ou family reads the TOFU split names, unchanged


def test_real_world_batch_and_the_other_role():
    cfg = eval_config("fast")
    records = _records(["forget", "neighbour", "probe"])
    records["probe"][0]["nll_correct"] = 3.0
    roles = {"forget": FORGET, "neighbour": UTILITY, "probe": OTHER}
    out = aggregate_from_records(records, roles, cfg)
    assert aggregate_components(list(records), roles, cfg.families)["cl.model_utility"] == [
        f"cl.neighbour.{x}" for x in CL]
    assert out["cl.model_utility"] == pytest.approx(m.harmonic_mean(_mu_inputs(out, ["neighbour"])))
    assert out["cl.model_utility_retain"] == out["cl.model_utility"]
    assert out["cl.probe.truth_ratio"] == pytest.approx(0.0)  # reported with the non-forget form


def test_roles_are_required_and_forget_is_forget_like():
    with pytest.raises(ValueError, match="no role"):
        check_roles(["forget", "retain"], {"forget": FORGET})
    with pytest.raises(ValueError, match="'forget' split must have role forget"):
        check_roles(["forget"], {"forget": UTILITY})


class _Untouched(Unlearner):
    def unlearn(self, model, tokenizer, request, benchmark, ctx):
        return model


def test_settings_declare_the_roles_of_the_splits_they_make(tiny, tiny_cfg, tmp_path):
    model, tokenizer = tiny
    forget = [QA(f"f{i}", f"q{i}", "a", "A" if i < 2 else "B") for i in range(4)]
    bench = Benchmark(name="t", forget=forget, retain_train=[], eval_splits={"retain": forget[:1]},
                      target_train=None, rounds=[forget[:2], forget[2:]])
    assert {n: s.role for n, s in bench.utility_splits().items()} == {"retain": UTILITY}
    seen: list[dict[str, SplitRole]] = []

    def evaluate(model, tokenizer, splits, out_dir):
        seen.append({name: split.role for name, split in splits.items()})
        return {}

    def ctx(name: str) -> RunContext:
        return RunContext(run_dir=tmp_path / name, cache_dir=tmp_path / "cache", model_cfg=tiny_cfg,
                          trainer_cfg=TrainerConfig(), seed=0, results_key=name, sequential_key=name)

    run_batch(_Untouched(), model, tokenizer, bench, ctx("batch"), evaluate, SettingConfig())
    run_sequential(_Untouched(), model, tokenizer, bench, ctx("seq"), evaluate, SettingConfig(name="sequential"))
    run_precise(_Untouched(), model, tokenizer, bench, ctx("precise"), evaluate,
                SettingConfig(name="precise", item_ids=[0, 2]))
    assert seen == [
        {"forget": FORGET},
        {"forget": FORGET}, {"forget": FORGET, "forgotten": FORGET}, {"forget": FORGET, "forgotten": FORGET},
        {"forget": FORGET, "siblings_0": FORGET, "siblings_2": FORGET},
        {"forget": FORGET, "siblings": FORGET}, {"forget": FORGET, "siblings": FORGET},
    ]


def test_sequential_protection_never_sees_the_scored_retain_split(data_dir, tiny, tiny_cfg, tmp_path, monkeypatch):
    """cpu_tofu_sequential: the target learns retain authors 0-3, the retain split scores 0-1, and UniErase's
    edit.protect=[retain_keys] (and [retain_answer_keys], their answers) reads exactly authors 2-3, none of whose
    questions any split scores."""
    from hydra import compose, initialize_config_dir

    import unierase.unierase as unierase_method
    from benchmarks.tofu import TofuConfig, load_tofu
    from unierase.chat import turn_end_id
    from unierase.config import typed
    from unierase.run import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=cpu_tofu_sequential", f"benchmark.data_dir={data_dir}"])
    benchmark = load_tofu(typed(cfg.benchmark, TofuConfig))
    scored = {qa.question for rows in benchmark.eval_splits.values() for qa in rows}
    protected = benchmark.unscored_retain()
    assert {qa.group for qa in benchmark.eval_splits["retain"]} == {"retain/author0", "retain/author1"}
    assert len(protected) == 40 and not scored & {qa.question for qa in protected}
    assert {qa.question for qa in protected} < {qa.question for qa in benchmark.retain_train}

    seen = {}
    monkeypatch.setattr(unierase_method, "apply_edits",
                        lambda *args, retain, retain_answers, **kwargs: seen.update(retain=retain,
                                                                                   answers=retain_answers))
    monkeypatch.setattr(unierase_method, "first_token_rate", lambda *args: 1.0)
    method = unierase_method.UniErase(unierase_method.UniEraseConfig(learned_token=False))
    method.pool = ["I'm not sure."]
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path, model_cfg=tiny_cfg, trainer_cfg=TrainerConfig(), seed=0,
                     results_key="k")
    method.unlearn(None, tiny[1], benchmark.rounds[0], benchmark, ctx)
    assert seen["retain"] == [(qa.question, qa.subject) for qa in protected]
    tokenizer = tiny[1]
    assert seen["answers"] == [(qa.question, tokenizer(qa.answer, add_special_tokens=False).input_ids
                                + [turn_end_id(tokenizer)]) for qa in protected]


def test_validation_protocol_shares_no_author_with_the_table(data_dir):
    """cpu_tofu_validation (where hyperparameters are chosen) and cpu_tofu_batch (the table): no QA the one learns,
    forgets or scores is learned, forgotten or scored by the other."""
    from hydra import compose, initialize_config_dir

    from benchmarks.tofu import TofuConfig, load_tofu
    from unierase.config import typed
    from unierase.run import CONFIG_DIR

    def benchmark(experiment: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={experiment}", f"benchmark.data_dir={data_dir}"])
        return load_tofu(typed(cfg.benchmark, TofuConfig))

    def questions(bench) -> set[str]:
        rows = [*bench.target_train, *bench.forget, *bench.retain_train, *bench.eval_splits["retain"]]
        return {qa.question for qa in rows}

    validation, table = benchmark("cpu_tofu_validation"), benchmark("cpu_tofu_batch")
    assert len(validation.forget) == 40 and len(table.forget) == 200 and len(table.eval_splits["retain"]) == 200
    assert not questions(validation) & questions(table)
