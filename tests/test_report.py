"""`unierase-table` on hand-written run directories, and an offline W&B round trip through Lightning."""
from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from unierase.report import main

FIXTURES = Path(__file__).parent / "fixtures"
RUNS = FIXTURES / "runs"


def test_table_matches_golden(tmp_path, capsys):
    main([str(RUNS), "--out", str(tmp_path), "--name", "summary"])
    golden = (FIXTURES / "summary_golden.md").read_text(encoding="utf-8")
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == golden
    assert capsys.readouterr().out == golden

    with open(tmp_path / "summary.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["setting"], r["seed"]) for r in rows] == [
        ("ga_gd", "batch", "1"), ("unierase", "batch", "0"), ("ga_gd", "sequential", "0")]
    ga_batch, unierase, ga_seq = rows
    # Partial aggregates are used when the full ones are null, and flagged.
    assert (ga_batch["forget_efficacy"], ga_batch["model_utility"]) == ("0.995", "0.102")
    assert ga_batch["forget_efficacy_is_partial"] == ga_batch["model_utility_is_partial"] == "true"
    assert ga_batch["ou_forget_quality"] == "" and ga_batch["edited_fraction"] == ""
    assert unierase["forget_efficacy_is_partial"] == "false"
    assert (unierase["forget_rouge"], unierase["retain_rouge"], unierase["edited_fraction"]) == ("0.088", "0.612", "0.012")
    assert (unierase["triviaqa"], unierase["humaneval"], unierase["wall_time_s"]) == ("0.333", "", "1235")
    assert (ga_seq["split"], ga_seq["model"], ga_seq["ou_model_utility"]) == ("forget01", "smollm2_135m", "0.288")

    for png in ("summary_fe_vs_mu.png", "summary_sequential.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_no_sequential_plot_without_rounds(tmp_path):
    main([str(RUNS / "2026-01-01"), "--out", str(tmp_path), "--name", "batch"])
    assert (tmp_path / "batch_fe_vs_mu.png").stat().st_size > 0
    assert not (tmp_path / "batch_sequential.png").exists()


def test_no_run_dirs_is_an_error(tmp_path):
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "metrics.json").write_text("{}")  # no config_resolved.yaml
    with pytest.raises(SystemExit, match="no run directories"):
        main([str(tmp_path)])


def _summary_from_log(path: Path) -> dict:
    """Replay the summary records of a `.wandb` transaction log (LevelDB log format, 32 KiB blocks).

    wandb-core 0.31 writes `files/wandb-summary.json` only when syncing online (wandb/wandb#9646,
    fix pending in wandb/wandb#11279); offline, the summary lives only in this log.
    """
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, chunk = path.read_bytes(), 32768, 7, b""  # 7: the ":W&B" file header
    summary: dict = {}
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:
            break
        chunk += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record is assembled
            record = wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
                for item in record.summary.remove:
                    summary.pop(item.key or "/".join(item.nested_key), None)
    return summary


def test_wandb_offline_logger(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(var, value)
    from unierase.loggers import finish

    final = {"cl.forget_efficacy": 0.9, "cl.model_utility": 0.5}
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "knowledge.forget.jsonl").write_text(
        '{"uid": "a", "generation": "I am not sure.", "rouge": 0.0, "token_nlls": [1.0]}\n'
        '{"uid": "b", "generation": "Paris.", "rouge": 1.0, "token_nlls": [0.5]}\n')
    logger = WandbLogger(project="unierase-test", save_dir=tmp_path, mode="offline", name="t")
    try:
        logger.log_metrics({"loss": 1.0, "acc": 0.1}, step=1)
        logger.log_metrics({"loss": 0.5, "acc": 0.2}, step=2)
        finish([logger], final, run_dir)
    finally:
        wandb.finish()

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary_file = runs[0] / "files" / "wandb-summary.json"
    if summary_file.is_file():  # wandb versions that write it offline (wandb/wandb#11279)
        summary = json.loads(summary_file.read_text())
    else:
        (log,) = runs[0].glob("run-*.wandb")
        summary = _summary_from_log(log)
    assert {k: summary[k] for k in final} == final
    assert (summary["loss"], summary["acc"], summary["trainer/global_step"]) == (0.5, 0.2, 2)
    (table_file,) = (runs[0] / "files" / "media" / "table" / "examples" / "eval").glob("knowledge.forget_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["uid", "generation", "rouge"]
    assert table["data"] == [["a", "I am not sure.", 0.0], ["b", "Paris.", 1.0]]
