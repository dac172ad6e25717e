"""No lost or stale results: unique run directories, atomic model saves, temporaries of killed writers
cleaned, the model saved before evaluation, and state keys that see the data."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from unierase.context import RunContext
from unierase.io import TEMP_TAG, atomic_dir
from unierase.method import Unlearner
from unierase.models import save_model
from unierase.records import QA, Benchmark
from unierase.run import CONFIG_DIR, results_key
from unierase.run_dir import unique_dir
from unierase.settings import SettingConfig, run_batch
from unierase.training import TrainerConfig


def test_two_processes_asking_for_one_run_dir_get_two(tmp_path):
    """Two jobs started in the same second: each creates its own directory, atomically."""
    wanted = str(tmp_path / "runs" / "12-00-00_ga_tofu_batch")
    code = f"from unierase.run_dir import unique_dir; print(unique_dir({wanted!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    made = sorted(proc.communicate()[0].strip() for proc in procs)
    assert made == sorted([wanted, wanted + "_2", wanted + "_3"])
    assert all(Path(path).is_dir() for path in made)


def test_unique_dir_skips_an_existing_directory(tmp_path):
    taken = tmp_path / "run"
    taken.mkdir()
    assert unique_dir(str(taken)) == f"{taken}_2"
    assert unique_dir(str(taken)) == f"{taken}_2"  # the same request in one process: the same directory


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_writers_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "model"
    host = socket.gethostname()
    dead = tmp_path / f".model{TEMP_TAG}{host}-{_dead_pid()}-abc123"
    alive = tmp_path / f".model{TEMP_TAG}{host}-{os.getpid()}-def456"
    elsewhere = tmp_path / f".model{TEMP_TAG}another-host-{_dead_pid()}-ghi789"
    for path in (dead, alive, elsewhere):
        path.mkdir()
        (path / "weights").write_text("partial")
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("complete")
    assert (target / "weights").read_text() == "complete"
    assert not dead.exists()  # killed writer on this machine
    assert alive.exists() and elsewhere.exists()  # a live writer, and one this machine cannot judge


def test_a_failed_model_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving the tokenizer")

    monkeypatch.setattr(tokenizer, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tokenizer, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # no weights without a tokenizer, no temporaries


class _Untouched(Unlearner):
    def unlearn(self, model, tokenizer, request, benchmark, ctx):
        return model


def test_the_model_is_saved_before_evaluation(tiny, tiny_cfg, tmp_path):
    model, tokenizer = tiny
    bench = Benchmark(name="t", forget=[QA("u0", "q", "a", "A")], retain_train=[], eval_splits={},
                      target_train=None)
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", model_cfg=tiny_cfg,
                     trainer_cfg=TrainerConfig(), seed=0, results_key="k")

    def failing_evaluation(*args):
        raise RuntimeError("evaluation crashed")

    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run_batch(_Untouched(), model, tokenizer, bench, ctx, failing_evaluation, SettingConfig())
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()


def test_results_key_sees_the_data_and_not_where_files_go():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "setting=sequential"])
        moved = compose("config", overrides=["experiment=smoke", "setting=sequential", "paths.cache_dir=/elsewhere",
                                             "logger=none", "setting.fail_after_round=2", "setting.save_model=false",
                                             "trainer.log_every_n_steps=50"])
        other_lr = compose("config", overrides=["experiment=smoke", "setting=sequential", "recipe.lr=0.5"])
        fp32 = compose("config", overrides=["experiment=smoke", "setting=sequential", "trainer.precision=32-true"])
    forget = [QA("u0", "Who wrote it?", "Ann", "A")]
    bench = Benchmark(name="tofu", forget=forget, retain_train=[], eval_splits={}, target_train=forget)
    other_data = replace(bench, forget=[QA("u0", "Who wrote it?", "Bob", "A")])
    assert results_key(cfg, bench) == results_key(moved, bench)
    assert results_key(cfg, bench) != results_key(cfg, other_data)  # another data folder: another job
    assert results_key(cfg, bench) != results_key(other_lr, bench)
    assert results_key(cfg, bench) != results_key(fp32, bench)  # training in another precision: another job
