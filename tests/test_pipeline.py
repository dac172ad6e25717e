"""End to end through the Hydra config and `run`, on the tiny model: settings, methods, run directories.
Each job takes 20 s to minutes, so all but the cheapest are in the slow tier."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CACHE_ROOT
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoTokenizer

from unierase.io import file_digest
from unierase.models import load_saved
from unierase.run import CONFIG_DIR, run

FAST = [
    "experiment=smoke", "logger=none", "trainer.enable_progress_bar=false", "eval.families=[cl]",
    "eval.max_rows=2", "eval.cl_max_length=70", "target.build_retain_reference=false", "recipe.epochs=1",
]
TINY_UNIERASE = [
    "method=unierase", "method.token.phase1.epochs=1", "method.token.phase2.epochs=1",
    "method.token.phase3.epochs=1", "method.token.perturb.layers=[1]", "method.edit.layers=[1,2]",
    "method.edit.mom2_n_samples=4", "method.edit.mom2_chunk_tokens=128", "method.edit.v_steps=2",
    "benchmark.split=forget01",
]


def isolated_cache(tmp_path: Path) -> Path:
    """A fresh cache that shares only the dequantised tokenizer source (made once per machine)."""
    cache = tmp_path / "cache"
    cache.mkdir(parents=True)
    (cache / "base_models").symlink_to(CACHE_ROOT / "base_models", target_is_directory=True)
    return cache


def run_job(tmp_path: Path, overrides: list[str], cache: Path, name: str = "run") -> tuple[dict, Path]:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=FAST + overrides + [f"paths.cache_dir={cache}"])
    run_dir = tmp_path / name
    return run(cfg, run_dir), run_dir


def test_batch_baseline_writes_the_run_directory(tmp_path, data_dir):
    cache = isolated_cache(tmp_path)
    metrics, run_dir = run_job(tmp_path, ["method=ga_gd", "benchmark.retain_authors=1"], cache)
    (target_dir,) = (cache / "targets").glob("target-*")
    assert json.loads((run_dir / "starting_model.json").read_text()) == {
        "id": target_dir.name, "weights_sha256": {"model.safetensors": file_digest(target_dir / "model.safetensors")}}
    for name in ("config_resolved.yaml", "versions.json", "metrics.json", "eval/knowledge.forget.jsonl",
                 "eval/knowledge.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["cl.forget.rouge"] == metrics["cl.forget.rouge"] and "time.total_s" in saved
    assert len((run_dir / "eval/knowledge.forget.jsonl").read_text().splitlines()) == 2
    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["packages"]["torch"] and versions["device"] == "cpu"
    saved = run_dir / "model"
    _, eval_dir = run_job(tmp_path, ["model=saved", f"model.path={saved}", "stage=eval",
                                     "benchmark.retain_authors=1"], cache, "eval")
    assert json.loads((eval_dir / "starting_model.json").read_text()) == {
        "id": str(saved), "weights_sha256": {"model.safetensors": file_digest(saved / "model.safetensors")}}


def test_reuse_unlearned_rescored_with_another_eval_trains_nothing(tmp_path, data_dir, monkeypatch):
    """setting.reuse_unlearned: a second job that differs only in `eval` loads the cached model; one that
    differs in the method trains again."""
    from baselines.method import FinetuneUnlearner

    cache = isolated_cache(tmp_path)
    job = ["method=ga_gd", "benchmark.retain_authors=1", "setting.reuse_unlearned=true"]
    first, first_dir = run_job(tmp_path, job, cache, "first")
    assert "reused_unlearned" not in first

    def no_training(*args, **kwargs):
        raise AssertionError("the cached unlearned model should have been reused")

    monkeypatch.setattr(FinetuneUnlearner, "unlearn", no_training)
    again, again_dir = run_job(tmp_path, job + ["eval.max_rows=3"], cache, "again")
    assert Path(again["reused_unlearned"]).parent == cache / "unlearned"
    assert again["time.unlearn_s"] == first["time.unlearn_s"]
    weights = [load_file(d / "model" / "model.safetensors") for d in (first_dir, again_dir)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert len((again_dir / "eval/knowledge.forget.jsonl").read_text().splitlines()) == 3
    with pytest.raises(AssertionError, match="should have been reused"):
        run_job(tmp_path, job + ["recipe.lr=2e-5"], cache, "other_method")


@pytest.mark.slow
def test_target_built_in_a_child_process_equals_one_built_here(tmp_path, data_dir):
    """target.build_in_subprocess: the job's target comes from a spawned process, and is the same model."""
    caches = {side: isolated_cache(tmp_path / side) for side in ("child", "here")}
    child, _ = run_job(tmp_path, ["method=ga_gd", "target.build_in_subprocess=true"], caches["child"], "child")
    here, _ = run_job(tmp_path, ["method=ga_gd"], caches["here"], "here")
    assert child["memory.build_peak_rss_gb"] > 0.1 and here["memory.build_peak_rss_gb"] == 0.0
    assert child["memory.peak_rss_gb"] >= child["memory.build_peak_rss_gb"]
    (child_target,), (here_target,) = ((caches[side] / "targets").glob("target-*") for side in ("child", "here"))
    assert child_target.name == here_target.name  # the same cache key
    # bf16 autocast kernels round differently across processes: equal up to that noise
    losses = [json.loads((target / "build.json").read_text())["losses"] for target in (child_target, here_target)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    weights = [load_file(target / "model.safetensors") for target in (child_target, here_target)]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-3


@pytest.mark.slow
def test_unierase_batch_edits_and_reuses_caches(tmp_path, data_dir):
    cache = isolated_cache(tmp_path)
    first, run_dir = run_job(tmp_path, TINY_UNIERASE, cache, "first")
    assert first["unierase.token_cached"] == 0.0 and first["unierase.statistics_cached"] == 0.0
    model = load_saved(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    layer_share = 2 * model.model.layers[1].mlp.down_proj.weight.numel() / sum(p.numel() for p in model.parameters())
    assert first["unierase.edited_fraction"] == pytest.approx(layer_share)
    # The fraction counts what the edit may change: check it changed exactly that. Against the target,
    # Stage A adds only embedding rows (past the target's vocabulary); Stage B only edits down_proj 1, 2.
    (target_dir,) = (cache / "targets").glob("target-*")
    target = dict(load_saved(target_dir).named_parameters())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p[: len(target[name])], target[name])}
    assert changed == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in (1, 2)}
    assert "<unlearn_0>" in tokenizer.get_vocab()
    second, _ = run_job(tmp_path, TINY_UNIERASE, cache, "second")
    assert second["unierase.token_cached"] == 1.0 and second["unierase.statistics_cached"] == 1.0
    # same token, statistics and edit: the same model and metrics
    assert second["cl.forget.prob"] == pytest.approx(first["cl.forget.prob"], rel=1e-5)


@pytest.mark.slow
def test_unierase_protects_token_keys_with_continuation_targets(tmp_path, data_dir, monkeypatch):
    """The unierase_cpu options wire through a job: Stage A's own texts reach the edit and become
    protected keys, and every request's value target carries its refusal continuation."""
    import unierase.unierase as unierase_method

    calls = []
    real_apply_edits = unierase_method.apply_edits

    def recording_apply_edits(model, tokenizer, requests, cfg, *args, **kwargs):
        state = real_apply_edits(model, tokenizer, requests, cfg, *args, **kwargs)
        calls.append((requests, cfg, kwargs["token_texts"], state))
        return state

    monkeypatch.setattr(unierase_method, "apply_edits", recording_apply_edits)
    overrides = TINY_UNIERASE + ["method.edit.protect=[token_keys]", "method.edit.value_target=token_continuation"]
    run_job(tmp_path, overrides, isolated_cache(tmp_path), "protected")
    (requests, cfg, token_texts, state), = calls
    assert (cfg.protect, cfg.value_target) == (["token_keys"], "token_continuation")
    assert sorted(question for question, _ in token_texts) == sorted(request.question for request in requests)
    unlearn_id = AutoTokenizer.from_pretrained(tmp_path / "protected" / "model").convert_tokens_to_ids("<unlearn_0>")
    for request in requests:
        targets = request.target_sequence(cfg)
        assert targets[0] == unlearn_id and targets[-1] == unlearn_id and len(targets) > 2  # U, refusal, U
    protected_positions = sum(len(ids) for _, ids in token_texts)
    for layer in cfg.layers:  # one protected key per position of U + refusal + U of every text
        assert state.protect_keys[layer].shape[1] == protected_positions


def test_alphaedit_refusal_targets_the_refusal_itself(tiny):
    """The ablation row (method.learned_token=false): each request's target is its refusal's first token, and
    the continuation is the rest of the refusal and the turn end."""
    from unierase.chat import turn_end_id
    from unierase.config import ConfigError
    from unierase.edit import EditConfig
    from unierase.records import QA
    from unierase.unierase import UniErase, UniEraseConfig

    _, tokenizer = tiny
    method = UniErase(UniEraseConfig(learned_token=False, edit=EditConfig(protect=[])))
    method.pool = ["I'm not sure about that.", "I have no idea."]
    (edit,) = method.requests(tokenizer, [QA(uid="q", question="Who wrote it?", answer="Jane.", group="a")])
    ids = [edit.target_id, *edit.continuation]
    assert ids[-1] == turn_end_id(tokenizer)
    assert tokenizer.decode(ids[:-1]) in method.pool and method.token_texts(tokenizer) == []
    with pytest.raises(ConfigError, match="token_keys"):
        UniEraseConfig(learned_token=False, edit=EditConfig(protect=["token_keys"]))


@pytest.mark.slow
def test_alphaedit_refusal_edits_without_adding_a_token(tmp_path, data_dir):
    metrics, run_dir = run_job(tmp_path, TINY_UNIERASE + ["method.learned_token=false", "method.edit.protect=[]"],
                               isolated_cache(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    assert not [t for t in tokenizer.get_vocab() if t.startswith("<unlearn_")]
    assert not (tmp_path / "cache" / "tokens").exists() and metrics["unierase.token_cached"] == 0.0
    assert metrics["unierase.first_token_rate"] is not None


@pytest.mark.slow
def test_sequential_resumes_after_a_failure_with_identical_results(tmp_path, data_dir):
    """A job stopped after round 1 of 2 resumes there, and asking for more rounds extends the same state (the state
    key leaves out setting.rounds), with the results of one straight 3-round run."""
    overrides = ["method=ga_gd", "setting=sequential", "setting.rounds=3", "benchmark.known_forget=forget10",
                 "benchmark.retain_authors=1", "eval.max_rows=2"]
    straight, straight_dir = run_job(tmp_path, overrides, isolated_cache(tmp_path), "straight")
    cache = isolated_cache(tmp_path / "interrupted")
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_job(tmp_path, overrides + ["setting.rounds=2", "setting.fail_after_round=1"], cache, "failed")
    state = next((cache / "sequential").iterdir())
    assert json.loads((state / "progress.json").read_text())["history"][-1]["round"] == 1
    assert not [p for p in state.parent.iterdir() if p.name.startswith(".")]  # no half-written state
    resumed, resumed_dir = run_job(tmp_path, overrides, cache, "resumed")
    assert resumed["rounds"] == 3
    rounds = json.loads((resumed_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]  # round 0: the target, evaluated once before round 1
    expected = json.loads((straight_dir / "rounds.json").read_text())
    for key in ("cl.forget.rouge", "cl.forget.prob", "cl.forgotten.prob", "cl.retain.prob"):
        assert rounds[-1][key] == pytest.approx(expected[-1][key], rel=1e-6), key
    assert not (resumed_dir / "eval" / "round_00").exists() and not (resumed_dir / "eval" / "round_01").exists()
    assert (resumed_dir / "eval" / "round_02").is_dir() and (resumed_dir / "eval" / "round_03").is_dir()


@pytest.mark.slow
def test_precise_requests_one_pair_each(tmp_path, data_dir):
    metrics, run_dir = run_job(tmp_path, ["method=ga_gd", "setting=precise", "setting.item_ids=[0,21]"],
                               isolated_cache(tmp_path))
    per_item = json.loads((run_dir / "precise.json").read_text())
    assert [row["item"] for row in per_item] == [0, 21] and metrics["items"] == 2
    for index in (0, 21):
        notes = json.loads((run_dir / "eval" / f"item_{index}" / "knowledge.json").read_text())["notes"]
        assert notes["rows"]["forget"] == 1
        assert notes["rows"]["siblings"] == 2  # eval.max_rows caps the 19 siblings


def test_precise_siblings_and_survival_ratio_on_a_hand_built_case():
    from unierase.records import QA, Benchmark
    from unierase.settings import _ratio, siblings

    rows = [QA(uid=f"u{i}", question=f"q{i}", answer="a", group="A" if i < 3 else "B") for i in range(5)]
    bench = Benchmark(name="t", forget=rows, retain_train=[], eval_splits={}, target_train=None)
    assert [qa.uid for qa in siblings(bench, rows[1])] == ["u0", "u2"]
    assert [qa.uid for qa in siblings(bench, rows[4])] == ["u3"]
    # siblings ROUGE 0.45 after vs 0.9 before: half of the author's other knowledge survives
    assert _ratio(0.45, 0.9) == pytest.approx(0.5)
    assert _ratio(None, 0.9) is None and _ratio(0.3, 0.0) is None
