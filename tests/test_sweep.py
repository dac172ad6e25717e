"""Sweeps: launcher and search configs, the objective a job returns to a sweeper, and a 2x2 multirun
through `unierase -m hydra/launcher=local` (submitit, parallel processes) summarised by `unierase-table`."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import CACHE_ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_pipeline import FAST

from unierase.config import typed
from unierase.io import atomic_dir
from unierase.objective import ObjectiveConstraint, objective_value
from unierase.report import main as unierase_table
from unierase.run import CONFIG_DIR

METRICS = {"cl.forget_efficacy": 0.8, "cl.model_utility": 0.3, "cl.forget.rouge": None, "rounds": 3}


def test_objective_is_the_named_metric():
    assert objective_value(METRICS, "cl.forget_efficacy") == 0.8
    assert objective_value(METRICS, "rounds") == 3.0
    unconstrained = typed(OmegaConf.create({"metric": None}), ObjectiveConstraint)
    assert objective_value(METRICS, "cl.forget_efficacy", unconstrained) == 0.8


def test_objective_scores_the_penalty_outside_the_bounds():
    def constrained(**bounds) -> float:
        constraint = ObjectiveConstraint(metric="cl.model_utility", penalty=-1.0, **bounds)
        return objective_value(METRICS, "cl.forget_efficacy", constraint)

    assert constrained(min=0.2) == 0.8
    assert constrained(min=0.3) == 0.8  # bounds are inclusive
    assert constrained(min=0.4) == -1.0
    assert constrained(max=0.25) == -1.0
    assert constrained(min=0.1, max=0.5) == 0.8


def test_objective_errors_name_the_metric_and_list_the_available_ones():
    with pytest.raises(ValueError, match=r"optimized_metric 'cl.forget_eficacy' is not a metric of this run; "
                                         r"metrics with a value: cl.forget_efficacy, cl.model_utility, rounds$"):
        objective_value(METRICS, "cl.forget_eficacy")
    message = r"optimized_metric 'cl.forget.rouge' has no numeric value in this run \(None\)"
    with pytest.raises(ValueError, match=message):
        objective_value(METRICS, "cl.forget.rouge")
    with pytest.raises(ValueError, match="objective_constraint.metric 'ou.model_utility' is not a metric"):
        objective_value(METRICS, "cl.forget_efficacy", ObjectiveConstraint(metric="ou.model_utility", min=0.1))
    with pytest.raises(ValueError, match="needs a min or a max"):
        typed(OmegaConf.create({"metric": "cl.model_utility"}), ObjectiveConstraint)
    with pytest.raises(ValueError, match="sets min/max but no metric"):
        typed(OmegaConf.create({"min": 0.5}), ObjectiveConstraint)
    with pytest.raises(ValueError, match=r"min=0.5 > max=0.1"):
        typed(OmegaConf.create({"metric": "cl.model_utility", "min": 0.5, "max": 0.1}), ObjectiveConstraint)


def test_atomic_dir_with_concurrent_writers(tmp_path):
    """Parallel sweep jobs may build the same cached model at once: all succeed, one whole version stays."""
    target, writers = tmp_path / "model", 6
    barrier, errors = threading.Barrier(writers), []

    def write(index: int) -> None:
        try:
            with atomic_dir(target) as tmp:
                for part in range(5):
                    (tmp / f"part{part}").write_text(str(index))
                barrier.wait()  # every writer finishes at the same moment
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({(target / f"part{part}").read_text() for part in range(5)}) == 1  # one writer's version
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporaries left behind


@pytest.mark.parametrize("launcher, target", [
    ("local", "LocalLauncher"), ("submitit_local", "LocalLauncher"),
    ("slurm", "SlurmLauncher"), ("submitit_slurm", "SlurmLauncher"),
])
def test_launcher_configs_compose(launcher, target):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    raw = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert raw["launcher"]["_target_"].endswith(target)
    assert raw["launcher"]["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert raw["sweep"]["subdir"] == "${hydra.job.num}_${method.name}"  # our per-job dirs
    if launcher == "slurm":
        assert raw["launcher"]["gpus_per_node"] == 1 and raw["launcher"]["timeout_min"] == 720


@pytest.mark.parametrize("search, method", [("unierase_optuna", "unierase"), ("baseline_optuna", "ga_gd")])
def test_search_space_keys_exist(search, method):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={search}", f"method={method}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric and typed(cfg.objective_constraint, ObjectiveConstraint).metric
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"{search}: {key} is not in the config with method={method}"


def working_directory(tmp_path: Path, data_dir: Path) -> dict[str, str]:
    """`tmp_path` as a user's working directory (the default paths are relative to it: outputs/cache,
    outputs/multiruns/...) sharing only the dequantised tokenizer source; the environment for `unierase` there,
    one thread per process."""
    cache = tmp_path / "outputs" / "cache"
    cache.mkdir(parents=True)
    (CACHE_ROOT / "base_models").mkdir(parents=True, exist_ok=True)
    (cache / "base_models").symlink_to(CACHE_ROOT / "base_models", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "UNIERASE_CACHE"}
    return env | {"UNIERASE_DATA": str(data_dir), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # 4 processes at once: ~3.5 min on one CPU core, mostly 5 torch imports and 4 target builds
def test_submitit_local_multirun_then_table(tmp_path, data_dir):
    """What a user types: `unierase -m hydra/launcher=local ...` from a working directory, then the table."""
    env = working_directory(tmp_path, data_dir)  # 4 jobs at once: one thread each
    command = [str(Path(sys.executable).parent / "unierase"), "-m", "hydra/launcher=local", *FAST,
               "method=ga,ga_gd", "seed=0,1"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    (sweep,) = (tmp_path / "outputs" / "multiruns").glob("*/*")  # <date>/<time>
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_ga", "1_ga", "2_ga_gd", "3_ga_gd"]
    for job in jobs:
        for name in ("metrics.json", "config_resolved.yaml", "run.log"):
            assert (sweep / job / name).is_file(), f"{job}/{name}"
    assert any((sweep / ".submitit").iterdir())  # the jobs went through submitit

    unierase_table([str(sweep), "--out", str(tmp_path / "table")])
    with open(tmp_path / "table" / "summary.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("ga", "0"), ("ga", "1"), ("ga_gd", "0"), ("ga_gd", "1")]
    assert all(r["model"] == "tiny_random" and r["forget_rouge"] != "" for r in rows)


@pytest.mark.slow  # two `unierase -m` processes (torch imports) and three tiny jobs: ~1.5 min on one core
def test_a_stopped_sweep_resumes_where_it_left_off(tmp_path, data_dir):
    """`reuse_results=true`: the same command run again reuses the finished jobs and runs only the others."""
    env = working_directory(tmp_path, data_dir)
    command = [str(Path(sys.executable).parent / "unierase"), "-m", *FAST, "reuse_results=true"]

    def sweep(methods: str, name: str, *extra: str) -> Path:
        done = subprocess.run(command + [f"method={methods}", f"hydra.sweep.dir=outputs/multiruns/{name}", *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        return tmp_path / "outputs" / "multiruns" / name

    # The sweep stopped after its first job, which kept no model (setting.save_model is not part of the key).
    first = sweep("ga", "stopped", "setting.save_model=false")
    assert not (next(first.glob("*_ga")) / "model").exists()
    again = sweep("ga,ga_gd", "again")
    before = json.loads(next(first.glob("*/metrics.json")).read_text())
    reused, ran = (json.loads(next(again.glob(f"*_{m}/metrics.json")).read_text()) for m in ("ga", "ga_gd"))
    reused_from = reused.pop("reused_from")
    assert Path(reused_from).parent == first
    assert reused == before  # metrics as the finished job wrote them, its wall time included
    assert "reused_from" not in ran and ran["cl.forget.rouge"] is not None
    assert (next(again.glob("*_ga")) / "eval" / "knowledge.forget.jsonl").is_file()
    assert not (next(again.glob("*_ga")) / "model").exists()  # results are copied, the model is not
    # The same command again, in the same sweep directory (how a stopped sweep is resumed): every job finished
    # there already, and keeps its files and metrics.
    sweep("ga,ga_gd", "again")
    assert [json.loads(next(again.glob(f"*_{m}/metrics.json")).read_text()) for m in ("ga", "ga_gd")] == [
        reused | {"reused_from": reused_from}, ran]


def test_a_job_directory_that_now_holds_another_job_is_not_reused(tmp_path):
    """A results record points at a run directory; it is reused only while that directory's results_key file
    names the same key (a sweep re-run with another grid writes another configuration into 0_<method>)."""
    from unierase.run import RESULTS_KEY_FILE, finished_record, reuse_finished

    cache, source, here = tmp_path / "cache", tmp_path / "sweep" / "0_ga", tmp_path / "again" / "0_ga"
    source.mkdir(parents=True)
    here.mkdir(parents=True)
    (source / "metrics.json").write_text(json.dumps({"cl.forget.rouge": 0.5}))
    finished_record(cache, "key-a").parent.mkdir(parents=True)
    finished_record(cache, "key-a").write_text(json.dumps({"run_dir": str(source)}))
    assert reuse_finished(cache, "key-a", here) is None  # no key file: nothing says whose metrics these are
    (source / RESULTS_KEY_FILE).write_text("key-b\n")
    assert reuse_finished(cache, "key-a", here) is None  # the directory now holds key-b's job
    (source / RESULTS_KEY_FILE).write_text("key-a\n")
    assert reuse_finished(cache, "key-a", here) == {"cl.forget.rouge": 0.5, "reused_from": str(source)}
    assert reuse_finished(cache, "key-a", source) == {"cl.forget.rouge": 0.5}  # the same job, in its own directory


def test_a_job_restored_from_its_records_is_finished_without_the_caches_record(tmp_path):
    """Committed run records copied back into a sweep directory on a machine with an empty cache: the same sweep
    command finds each finished job in its own directory (metrics and a matching results_key) and skips it."""
    from unierase.run import RESULTS_KEY_FILE, reuse_finished

    cache, here = tmp_path / "empty-cache", tmp_path / "sweep" / "0_ga"
    here.mkdir(parents=True)
    (here / "metrics.json").write_text(json.dumps({"cl.forget.rouge": 0.5}))
    assert reuse_finished(cache, "key-a", here) is None  # no key file: nothing says whose metrics these are
    (here / RESULTS_KEY_FILE).write_text("key-b\n")
    assert reuse_finished(cache, "key-a", here) is None  # another job's metrics: this one runs
    (here / RESULTS_KEY_FILE).write_text("key-a\n")
    assert reuse_finished(cache, "key-a", here) == {"cl.forget.rouge": 0.5}
    assert not cache.exists()


def test_a_job_about_to_run_clears_the_results_an_earlier_job_left_in_its_directory(tmp_path):
    """While a job runs, or after it fails, its directory must not show another job's metrics to unierase-table."""
    from unierase.run import RESULTS_KEY_FILE, STARTING_MODEL_FILE, clear_results

    for name in ("metrics.json", "rounds.json", "precise.json", RESULTS_KEY_FILE, STARTING_MODEL_FILE,
                 "eval/round_01/forget.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    clear_results(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "eval/round_01/forget.json"]
