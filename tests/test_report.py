"""`unierase-table` on hand-written run directories, and an offline W&B round trip through Lightning."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from unierase.report import load_runs, main, plot_audit, plot_fe_vs_mu, plot_sequential

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
    assert (unierase["forget_rouge"], unierase["retain_rouge"], unierase["edited_fraction"]) == (
        "0.088", "0.612", "0.012")
    assert (unierase["triviaqa"], unierase["humaneval"], unierase["wall_time_s"]) == ("0.333", "", "1235")
    # What each row cost: UniErase's edited share, a baseline's trained share (1, or LoRA's), the peak memory.
    assert (unierase["trained_fraction"], unierase["peak_rss_gb"]) == ("", "5.2")
    assert (ga_batch["trained_fraction"], ga_batch["peak_rss_gb"]) == ("1.000", "7.0")
    # Each utility accuracy has its standard error beside it (empty where metrics.json has none).
    assert (unierase["mmlu_stderr"], unierase["triviaqa_stderr"], ga_batch["mmlu_stderr"]) == ("0.163", "0.211", "")
    assert (ga_seq["split"], ga_seq["model"], ga_seq["ou_model_utility"]) == ("forget01", "smollm2_135m", "0.288")
    # Every split's scores are columns of their own (the per-split group), empty where a split was not scored.
    assert (unierase["real_authors_rouge"], unierase["world_facts_rouge"]) == ("0.701", "")

    for png in ("summary_fe_vs_mu.png", "summary_sequential.png"):
        assert (tmp_path / png).stat().st_size > 0
    runs = load_runs([RUNS])
    points = plot_fe_vs_mu(runs, tmp_path / "points.png")
    assert [(p.text, p.model_utility, p.forget_efficacy) for p in points] == [
        ("ga_gd (batch)* (n=1)", 0.1019, 0.99461), ("ga_gd (sequential) (n=1)", 0.31, 0.88),
        ("unierase (batch) (n=1)", 0.56789, 0.91234)]
    assert plot_sequential(runs, tmp_path / "lines.png") == {"ga_gd (n=1)": {
        "cl.forget.rouge": [(1, 0.6), (2, 0.35), (3, 0.1)], "cl.retain.rouge": [(1, 0.7), (2, 0.52), (3, 0.3)]}}


def test_no_sequential_plot_without_rounds(tmp_path):
    main([str(RUNS / "2026-01-01"), "--out", str(tmp_path), "--name", "batch"])
    assert (tmp_path / "batch_fe_vs_mu.png").stat().st_size > 0
    assert not (tmp_path / "batch_sequential.png").exists()


def test_no_run_dirs_is_an_error(tmp_path):
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "metrics.json").write_text("{}")  # no config_resolved.yaml
    with pytest.raises(SystemExit, match="no run directories"):
        main([str(tmp_path)])


def _write_run(run_dir: Path, seed: int, fe: float, mu: float, data_dir: str = "/data/shared", l2: float = 1.0,
               launched_from: str | None = None, rounds: list[dict] | None = None,
               metrics: dict[str, float | None] | None = None, method: str = "unierase_cpu",
               kind: str = "unierase", recipe_lr: float | None = None, overrides: list[str] | None = None) -> None:
    """A run directory of `unierase experiment=demo method=unierase_cpu` (abridged), with what varies between
    runs that differ only in the seed: where the cache and logs go, tags, the progress bar; `metrics` are
    written beside FE and MU; `recipe_lr` adds a baseline's recipe and its resolved copy under the method;
    `overrides` is the command line Hydra records in `.hydra/overrides.yaml`."""
    config = {
        "paths": {"data_dir": data_dir, "cache_dir": f"/cache/{run_dir.name}"},
        "model": {"name": "smollm2_135m"},
        "benchmark": {"name": "tofu", "data_dir": data_dir, "split": "forget01"},
        "method": {"name": method, "kind": kind, "token": {"seed": seed}, "edit": {"L2": l2, "seed": seed}},
        "setting": {"name": "batch"},
        "logger": {"name": "wandb", "group": f"outputs/multiruns/{run_dir.name}", "tags": [run_dir.name]},
        "trainer": {"precision": "bf16-mixed", "enable_progress_bar": seed == 0},
        "stage": "unlearn", "seed": seed, "tags": [run_dir.name],
        "target": {"seed": 0, "build_in_subprocess": seed == 0},  # a literal 0: not the run seed
        "optimized_metric": None,
    }
    if recipe_lr is not None:
        config["recipe"] = {"lr": recipe_lr, "epochs": 5}
        config["method"]["recipe"] = dict(config["recipe"])
    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / "config_resolved.yaml")
    (run_dir / "metrics.json").write_text(json.dumps({"cl.forget_efficacy": fe, "cl.model_utility": mu,
                                                      **(metrics or {})}))
    if rounds is not None:
        (run_dir / "rounds.json").write_text(json.dumps(rounds))
    if overrides is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    if launched_from is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"cwd": launched_from}}}),
                       run_dir / ".hydra" / "hydra.yaml")


def _report(root: Path, out: Path) -> tuple[str, list[dict[str, str]]]:
    main([str(root), "--out", str(out), "--name", "t"])
    markdown = (out / "t.md").read_text(encoding="utf-8")
    with open(out / "t.csv", newline="", encoding="utf-8") as handle:
        return markdown, list(csv.DictReader(handle))


def _markdown_tables(markdown: str) -> list[list[dict[str, str]]]:
    """Each table's rows, header -> cell."""
    blocks: list[list[str]] = [[]]
    for line in markdown.splitlines():
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip("|").split("|")]

    return [[dict(zip(cells(header), cells(row))) for row in rows]
            for header, _rule, *rows in (block for block in blocks if block)]


def _markdown_rows(markdown: str) -> list[dict[str, str]]:
    return _markdown_tables(markdown)[0]


def test_other_data_folder_and_same_seed_are_never_averaged(tmp_path):
    """Issue #25: seed 0 on the shared data folder, seed 0 on another, and a rerun of the first."""
    root = tmp_path / "runs"
    _write_run(root / "a_shared", 0, 0.8, 0.4)
    _write_run(root / "b_other", 0, 0.6, 0.5, data_dir="/data/other")
    _write_run(root / "c_rerun", 0, 0.7, 0.3)
    markdown, rows = _report(root, tmp_path / "out")

    shared, rerun, other = sorted(rows, key=lambda r: r["run_dir"].replace("b_other", "z"))
    assert shared["config"] == rerun["config"] != other["config"]
    assert shared["config_diff"] == rerun["config_diff"] == "benchmark.data_dir=paths.data_dir=/data/shared"
    assert other["config_diff"] == "benchmark.data_dir=paths.data_dir=/data/other"
    assert [r["same_config_and_seed"] for r in (shared, rerun, other)] == ["true", "true", "false"]
    assert [(r["Config"], r["Seed"], r["Forget Efficacy"]) for r in _markdown_rows(markdown)] == [
        (f"{other['config']}: benchmark.data_dir=paths.data_dir=/data/other", "0", "0.600"),
        (f"{shared['config']}: benchmark.data_dir=paths.data_dir=/data/shared", "0†", "0.800"),
        (f"{shared['config']}: benchmark.data_dir=paths.data_dir=/data/shared", "0†", "0.700")]
    assert (f"† same configuration and same seed: listed apart and never averaged, in the plots neither: "
            f"`{root / 'a_shared'}`, `{root / 'c_rerun'}`.") in markdown

    points = plot_fe_vs_mu(load_runs([root]), tmp_path / "p.png")
    label = "unierase_cpu [benchmark.data_dir=paths.data_dir={}] #{}"
    assert [(p.text, p.n, p.forget_efficacy, p.model_utility) for p in points] == [
        (label.format("/data/other", other["config"]) + " (n=1)", 1, 0.6, 0.5),
        (label.format("/data/shared", shared["config"]) + " seed=0 a_shared (n=1)", 1, 0.8, 0.4),
        (label.format("/data/shared", shared["config"]) + " seed=0 c_rerun (n=1)", 1, 0.7, 0.3)]
    assert all(p.forget_efficacy_sd is None and p.model_utility_sd is None for p in points)  # one seed: no bar


def test_seeds_of_one_configuration_are_averaged(tmp_path):
    root = tmp_path / "runs"
    _write_run(root / "seed0", 0, 0.8, 0.4)
    _write_run(root / "seed1", 1, 0.6, 0.5)
    markdown, rows = _report(root, tmp_path / "out")

    assert [(r["seed"], r["config_diff"], r["same_config_and_seed"]) for r in rows] == [
        ("0", "", "false"), ("1", "", "false")]
    assert rows[0]["config"] == rows[1]["config"]
    assert [(r["Config"], r["Seed"]) for r in _markdown_rows(markdown)] == [(rows[0]["config"], "0"),
                                                                            (rows[0]["config"], "1")]
    assert "†" not in markdown
    (point,) = plot_fe_vs_mu(load_runs([root]), tmp_path / "p.png")
    assert (point.text, point.n) == ("unierase_cpu (n=2)", 2)
    assert (point.forget_efficacy, point.model_utility) == pytest.approx((0.7, 0.45))
    # sample sd over the two seeds: |0.8 - 0.6| / sqrt(2) and |0.4 - 0.5| / sqrt(2), drawn as error bars
    assert (point.forget_efficacy_sd, point.model_utility_sd) == pytest.approx((0.2 / 2 ** 0.5, 0.1 / 2 ** 0.5))


def test_hyperparameter_sweep_gives_one_point_per_value(tmp_path):
    root = tmp_path / "multiruns"
    for job, (l2, seed) in enumerate([(1.0, 0), (1.0, 1), (10.0, 0), (10.0, 1)]):
        rounds = [{"round": 1, "cl.forget.rouge": l2 / 10 + seed, "cl.retain.rouge": 0.5}]
        _write_run(root / f"{job}_unierase_cpu", seed, 0.5 + l2 / 100 + seed / 10, 0.4, l2=l2, rounds=rounds)
    _, rows = _report(root, tmp_path / "out")

    assert [(r["config_diff"], r["seed"]) for r in rows] == [
        ("method.edit.L2=1.0", "0"), ("method.edit.L2=1.0", "1"), ("method.edit.L2=10.0", "0"),
        ("method.edit.L2=10.0", "1")]
    low, high = rows[0]["config"], rows[2]["config"]
    assert rows[1]["config"] == low != high == rows[3]["config"]

    runs = load_runs([root])
    points = plot_fe_vs_mu(runs, tmp_path / "p.png")
    assert [(p.text, p.n) for p in points] == [(f"unierase_cpu [method.edit.L2=1.0] #{low} (n=2)", 2),
                                               (f"unierase_cpu [method.edit.L2=10.0] #{high} (n=2)", 2)]
    assert [p.forget_efficacy for p in points] == pytest.approx([0.56, 0.65])
    lines = plot_sequential(runs, tmp_path / "s.png")
    assert list(lines) == [p.text for p in points]
    assert [line["cl.forget.rouge"] for line in lines.values()] == [[(1, pytest.approx(0.6))], [(1, 1.5)]]
    with open(tmp_path / "out" / "t_rounds.csv", newline="", encoding="utf-8") as handle:
        per_round = list(csv.DictReader(handle))
    # One row per run and round, labelled like the plot's lines (without their seed count), each seed its own row.
    assert [(r["method"], r["seed"], r["round"], r["forget_rouge"], r["retain_rouge"]) for r in per_round] == [
        (points[0].text.removesuffix(" (n=2)"), "0", "1", "0.1000", "0.5000"),
        (points[0].text.removesuffix(" (n=2)"), "1", "1", "1.1000", "0.5000"),
        (points[1].text.removesuffix(" (n=2)"), "0", "1", "1.0000", "0.5000"),
        (points[1].text.removesuffix(" (n=2)"), "1", "1", "2.0000", "0.5000")]
    assert per_round[0]["first_token_rate"] == "" and per_round[0]["run_dir"].endswith("0_unierase_cpu")


def test_relative_data_folder_resolves_against_the_launch_directory(tmp_path):
    root = tmp_path / "runs"
    _write_run(root / "main_seed0", 0, 0.8, 0.4, data_dir="../shared/data", launched_from="/a/main")
    _write_run(root / "main_seed1", 1, 0.6, 0.4, data_dir="/a/shared/data", launched_from="/b/main")
    _write_run(root / "other_checkout", 0, 0.5, 0.4, data_dir="../shared/data", launched_from="/b/main")
    _, rows = _report(root, tmp_path / "out")

    by_dir = {Path(r["run_dir"]).name: r for r in rows}
    assert by_dir["main_seed0"]["config"] == by_dir["main_seed1"]["config"] != by_dir["other_checkout"]["config"]
    assert by_dir["other_checkout"]["config_diff"] == "benchmark.data_dir=paths.data_dir=/b/shared/data"


AUDIT = {"audit.plain.forget_rouge": 0.05, "audit.plain_suppressed.forget_rouge": 0.41234,
         "audit.quant4.forget_rouge": None, "audit.relearn.forget_rouge": 0.6, "audit.worst.forget_rouge": 0.6,
         "audit.plain.retain_rouge": 0.7, "audit.mia.min_k_auc": 0.81, "audit.mia.privleak": -37.54,
         "audit.suppression.banned_tokens": 2.0}
ATTACK_TITLE = "### Robustness: forget ROUGE-L recall under attack (lower = still forgotten)"
MEMBERSHIP_TITLE = "### Robustness: retain cost and membership inference"


def test_audit_metrics_get_tables_of_their_own(tmp_path):
    root = tmp_path / "runs"
    _write_run(root / "audited", 0, 0.8, 0.4, metrics=AUDIT)
    _write_run(root / "not_audited", 0, 0.6, 0.5, l2=10.0)
    markdown, rows = _report(root, tmp_path / "out")

    main_table, attacks, membership = _markdown_tables(markdown)
    assert len(main_table) == 2
    assert markdown.index(ATTACK_TITLE) < markdown.index(MEMBERSHIP_TITLE)
    # Only the audited run is listed; nulls and absent keys show as dashes.
    ((attack_row,), (membership_row,)) = attacks, membership
    assert attack_row["Config"] == membership_row["Config"] == main_table[0]["Config"]
    assert (attack_row["Plain"], attack_row["Plain +S"], attack_row["4-bit"], attack_row["Relearn after"],
            attack_row["Worst"], attack_row["Paraphrase"]) == ("0.050", "0.412", "–", "0.600", "0.600", "–")
    assert (membership_row["Retain plain"], membership_row["Min-K AUC"], membership_row["Privleak"],
            membership_row["Banned tokens"], membership_row["Loss AUC"]) == ("0.700", "0.810", "-37.5", "2", "–")
    assert markdown.count("+S = the method's added tokens banned from decoding.") == 2
    assert "0.5 = indistinguishable" in markdown and "≈ 0 is ideal" in markdown

    header = list(rows[0])
    assert header.index("peak_rss_gb") + 1 == header.index("audit_plain_forget_rouge")
    assert header.index("audit_suppression_banned_tokens") + 1 == header.index("forget_efficacy_is_partial")
    audited, not_audited = sorted(rows, key=lambda r: r["run_dir"])
    assert (audited["audit_plain_forget_rouge"], audited["audit_plain_suppressed_forget_rouge"],
            audited["audit_quant4_forget_rouge"], audited["audit_mia_privleak"],
            audited["audit_suppression_banned_tokens"]) == ("0.050", "0.412", "", "-37.5", "2")
    assert not any(value for key, value in not_audited.items() if key.startswith("audit_"))
    assert (tmp_path / "out" / "t_audit.png").stat().st_size > 0

    main([str(RUNS), "--out", str(tmp_path / "no_audit"), "--name", "t"])
    assert not (tmp_path / "no_audit" / "t_audit.png").exists()


def test_membership_only_audit_has_no_attack_table_or_heatmap(tmp_path):
    root = tmp_path / "runs"
    _write_run(root / "mia", 0, 0.8, 0.4, metrics={"audit.mia.loss_auc": 0.55, "audit.plain.forget_rouge": None})
    markdown, rows = _report(root, tmp_path / "out")

    assert ATTACK_TITLE not in markdown and MEMBERSHIP_TITLE in markdown
    assert _markdown_tables(markdown)[1][0]["Loss AUC"] == "0.550"
    # The CSV, like the Markdown, has a group's columns only where a run has one of its values.
    assert rows[0]["audit_mia_loss_auc"] == "0.550" and "audit_plain_forget_rouge" not in rows[0]
    assert not (tmp_path / "out" / "t_audit.png").exists()


def test_audit_heatmap_averages_seeds(tmp_path):
    root = tmp_path / "runs"
    for seed, plain, quant8 in ((0, 0.2, 0.5), (1, 0.4, None)):
        _write_run(root / f"seed{seed}", seed, 0.8, 0.4,
                   metrics={"audit.plain.forget_rouge": plain, "audit.quant8.forget_rouge": quant8})
    _write_run(root / "not_audited", 0, 0.6, 0.5, l2=10.0)
    heatmap = plot_audit(load_runs([root]), tmp_path / "audit.png")

    config = next(r.config for r in load_runs([root]) if r.path.name == "seed0")
    assert heatmap.labels == [f"unierase_cpu [method.edit.L2=1.0] #{config} (n=2)"]
    assert heatmap.columns[:2] == ["Plain", "Paraphrase"] and len(heatmap.columns) == 18
    (row,) = heatmap.values
    # Each cell is the mean over the seeds that have it; a value no seed has stays blank.
    quant8 = heatmap.columns.index("8-bit")
    assert row[0] == pytest.approx(0.3) and row[quant8] == 0.5
    assert all(value is None for i, value in enumerate(row) if i not in (0, quant8))
    assert (tmp_path / "audit.png").stat().st_size > 0


def test_wandb_offline_logger(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    environment = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                   "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache")}
    for var, value in environment.items():
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
        # The run's own summary, read in-process: offline, wandb-core 0.31 keeps it only in its transaction log
        # (wandb/wandb#9646), which under CI load was read before the final summary reached it.
        summary = dict(logger.experiment.summary)
    finally:
        wandb.finish()

    assert {k: summary[k] for k in final} == final
    assert (summary["loss"], summary["acc"], summary["trainer/global_step"]) == (0.5, 0.2, 2)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (table_file,) = (runs[0] / "files" / "media" / "table" / "examples" / "eval").glob("knowledge.forget_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["uid", "generation", "rouge"]
    assert table["data"] == [["a", "I am not sure.", 0.0], ["b", "Paris.", 1.0]]


def test_headline_ratios_and_seed_means_by_hand(tmp_path):
    """UniErase over seeds 0/1 (FE 0.8/0.9, MU 0.5/0.6), GA+GD (0.95 / 0.1) forgets most, NPO+GD (0.5 / 0.55)
    retains most. Utility ratio 0.55 / 0.1 = 5.5x, but 0.85 < 0.95: the first claim fails on forgetting;
    efficacy gain 0.85 / 0.5 - 1 = +70 %."""
    from unierase.report.headline import headlines

    for job, (method, kind, seed, fe, mu) in enumerate([
            ("unierase_cpu", "unierase", 0, 0.8, 0.5), ("unierase_cpu", "unierase", 1, 0.9, 0.6),
            ("ga_gd", "finetune", 0, 0.95, 0.1), ("npo_gd", "finetune", 0, 0.5, 0.55)]):
        _write_run(tmp_path / "runs" / f"{job}_{method}", seed, fe, mu, method=method, kind=kind)
    (found,) = headlines(load_runs([tmp_path / "runs"]))
    assert (found.best_forgetting.label, found.best_retaining.label) == ("ga_gd", "npo_gd")
    assert found.unierase.forget_efficacy.mean == pytest.approx(0.85)
    assert found.unierase.forget_efficacy.sd == pytest.approx(0.0707107, abs=1e-6)
    assert found.utility_ratio == pytest.approx(5.5) and not found.utility_claim_holds
    assert found.efficacy_gain == pytest.approx(0.7) and found.efficacy_claim_holds

    markdown, _ = _report(tmp_path / "runs", tmp_path / "out")
    means = _markdown_tables(markdown)[1]
    assert [(row["Configuration"], row["n"], row["Forget Efficacy"], row["Model Utility"]) for row in means] == [
        ("ga_gd", "1", "0.950", "0.100"), ("npo_gd", "1", "0.500", "0.550"),
        ("unierase_cpu", "2", "0.850 ± 0.071", "0.550 ± 0.071")]
    assert ("- unierase_cpu (FE 0.850 ± 0.071, MU 0.550 ± 0.071, n=2): utility ratio 5.50x, forgetting less "
            "(does NOT hold); efficacy gain +70.00% (holds in direction).") in markdown


def test_headline_needs_a_baseline_and_survives_a_destroyed_one(tmp_path):
    """No baseline in a protocol: no headline. A best-forgetting baseline at MU 0 gives an infinite ratio."""
    from unierase.report.headline import headlines

    _write_run(tmp_path / "alone" / "0_unierase_cpu", 0, 0.9, 0.5)
    assert headlines(load_runs([tmp_path / "alone"])) == []
    _write_run(tmp_path / "alone" / "1_ga_gd", 0, 1.0, 0.0, method="ga_gd", kind="finetune")
    (found,) = headlines(load_runs([tmp_path / "alone"]))
    assert found.utility_ratio == float("inf") and not found.utility_claim_holds  # it forgets less (0.9 < 1.0)
    markdown, _ = _report(tmp_path / "alone", tmp_path / "out")
    assert "utility ratio unbounded (the baseline's utility is 0), forgetting less (does NOT hold)" in markdown


def test_headline_compares_only_runs_scored_on_the_same_protocol(tmp_path):
    """Two protocols alike in benchmark/split/setting/model but scored on other data (e.g. the demo and the
    validation authors, both forget01): each UniErase row meets only its own protocol's baselines."""
    from unierase.report.headline import headlines, render_headlines

    _write_run(tmp_path / "a" / "0_unierase_cpu", 0, 0.8, 0.4)
    _write_run(tmp_path / "a" / "1_ga_gd", 0, 0.5, 0.4, method="ga_gd", kind="finetune")
    _write_run(tmp_path / "b" / "0_unierase_cpu", 0, 0.7, 0.3, data_dir="/validation")
    _write_run(tmp_path / "b" / "1_ga_gd", 0, 0.9, 0.0, method="ga_gd", kind="finetune", data_dir="/validation")
    found = headlines(load_runs([tmp_path]))
    assert sorted((h.unierase.forget_efficacy.mean, h.best_forgetting.forget_efficacy.mean) for h in found) == [
        (0.7, 0.9), (0.8, 0.5)]
    titles = [line for line in render_headlines(found) if line.startswith("###")]
    assert len(titles) == 2 and len(set(titles)) == 2 and all("tofu/forget01/batch/smollm2_135m #" in t for t in titles)


def test_select_keeps_the_utility_bound_then_maximises_forget_efficacy(tmp_path, capsys):
    """unierase-select: reference utility 0.4, ratio 0.9 -> bound 0.36. L2=1 forgets most but keeps 0.30 (out);
    L2=10 (0.70 / 0.38) beats L2=100 (0.50 / 0.40). Seeds are averaged first."""
    from unierase.report.select import main as select_main

    sweep = tmp_path / "validation"
    for job, (l2, seed, fe, mu) in enumerate([(1.0, 0, 0.9, 0.30), (1.0, 1, 0.9, 0.30), (10.0, 0, 0.6, 0.37),
                                              (10.0, 1, 0.8, 0.39), (100.0, 0, 0.5, 0.40)]):
        _write_run(sweep / f"{job}_unierase_cpu", seed, fe, mu, l2=l2)
    _write_run(tmp_path / "target_eval", 0, 0.0, 0.4)
    select_main([str(sweep), "--reference", str(tmp_path / "target_eval"), "--out", str(tmp_path / "tuned")])
    text = (tmp_path / "tuned" / "unierase_cpu.yaml").read_text(encoding="utf-8")
    assert text.startswith("# @package _global_\n") and text in capsys.readouterr().out
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "tuned" / "unierase_cpu.yaml")) == {
        "method": {"edit": {"L2": 10.0}}}
    assert "0.7000 / 0.3800 / 2: method.edit.L2=10.0  <- chosen" in text
    assert "0.9000 / 0.3000 / 2: method.edit.L2=1.0\n" in text and "3 configurations, 5 runs" in text
    assert "partial aggregates" not in text

    with pytest.raises(SystemExit):
        select_main([str(sweep), "--reference", str(tmp_path / "missing"), "--out", str(tmp_path / "tuned")])
    err = capsys.readouterr().err
    assert f"--reference {tmp_path / 'missing'} is not a run directory" in err
    select_main([str(sweep), "--reference", str(tmp_path / "target_eval"), "--min-utility-ratio", "1.1",
                 "--out", str(tmp_path / "strict")])  # bound 0.44: nothing keeps it
    text = (tmp_path / "strict" / "unierase_cpu.yaml").read_text(encoding="utf-8")
    assert "NO configuration kept the bound" in text and "method.edit.L2=100.0  <- chosen" in text


def test_select_writes_what_the_sweep_set_not_its_interpolated_copy(tmp_path):
    """A baseline's `method.recipe: ${recipe}` resolves to a copy that varies with `recipe.lr`; the tuned file
    sets only `recipe.lr`, the path the sweep's command line set, so later overrides still reach the method.
    Trials are listed in numeric order of their settings (3e-5 before 1e-4)."""
    from unierase.report.select import main as select_main

    sweep = tmp_path / "validation"
    for job, (lr, fe) in enumerate([(1.0e-4, 0.9), (3.0e-5, 0.5)]):
        _write_run(sweep / f"{job}_ga_gd", 0, fe, 0.4, method="ga_gd", kind="finetune", recipe_lr=lr,
                   overrides=[f"recipe.lr={lr}", "method=ga_gd", "experiment=cpu_tofu_validation"])
    _write_run(tmp_path / "target_eval", 0, 0.0, 0.4)
    select_main([str(sweep), "--reference", str(tmp_path / "target_eval"), "--out", str(tmp_path / "tuned")])
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "tuned" / "ga_gd.yaml")) == {"recipe": {"lr": 1.0e-4}}
    text = (tmp_path / "tuned" / "ga_gd.yaml").read_text(encoding="utf-8")
    assert text.index("recipe.lr=3e-05") < text.index("recipe.lr=0.0001  <- chosen")

    # Selection offline reads the `*_partial` aggregates; the file says so.
    _write_run(sweep / "2_ga_gd", 0, 0.0, 0.4, method="ga_gd", kind="finetune", recipe_lr=1.0e-6,
               overrides=["recipe.lr=1e-06", "method=ga_gd", "experiment=cpu_tofu_validation"],
               metrics={"cl.forget_efficacy": None, "cl.forget_efficacy_partial": 0.1})
    select_main([str(sweep), "--reference", str(tmp_path / "target_eval"), "--out", str(tmp_path / "tuned")])
    text = (tmp_path / "tuned" / "ga_gd.yaml").read_text(encoding="utf-8")
    assert "0.1000 / 0.4000 / 1: recipe.lr=1e-06\n" in text and "are partial aggregates" in text


def test_select_writes_the_values_under_a_swept_config_group(tmp_path):
    """`recipe=cpu,slow` sweeps a config group: the recorded override is `recipe`, and the tuned file sets what
    differs under it (recipe.lr), still not the method's interpolated copy."""
    from unierase.report.select import main as select_main

    sweep = tmp_path / "validation"
    for job, (group, lr, fe) in enumerate([("cpu", 1.0e-4, 0.9), ("slow", 1.0e-5, 0.5)]):
        _write_run(sweep / f"{job}_ga_gd", 0, fe, 0.4, method="ga_gd", kind="finetune", recipe_lr=lr,
                   overrides=[f"recipe={group}", "method=ga_gd"])
    _write_run(tmp_path / "target_eval", 0, 0.0, 0.4)
    select_main([str(sweep), "--reference", str(tmp_path / "target_eval"), "--out", str(tmp_path / "tuned")])
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "tuned" / "ga_gd.yaml")) == {"recipe": {"lr": 1.0e-4}}


def test_select_refuses_another_protocol_and_a_trial_counted_twice(tmp_path, capsys):
    """A run scored on other data than the reference is not a trial of this selection; the same configuration and
    seed in two sweep directories (a reused copy) would count as two seeds. Both are one clear error."""
    from unierase.report.select import main as select_main

    _write_run(tmp_path / "target_eval", 0, 0.0, 0.4)
    _write_run(tmp_path / "mixed" / "0_unierase_cpu", 0, 0.9, 0.4)
    _write_run(tmp_path / "mixed" / "1_unierase_cpu", 0, 0.9, 0.4, data_dir="/other/data", l2=10.0)
    with pytest.raises(SystemExit):
        select_main([str(tmp_path / "mixed"), "--reference", str(tmp_path / "target_eval"), "--out", str(tmp_path)])
    assert "not scored on the reference's protocol" in capsys.readouterr().err

    _write_run(tmp_path / "first" / "0_unierase_cpu", 0, 0.9, 0.4)
    _write_run(tmp_path / "second" / "0_unierase_cpu", 0, 0.9, 0.4)
    with pytest.raises(SystemExit, match="same configuration and seed"):
        select_main([str(tmp_path / "first"), str(tmp_path / "second"), "--reference", str(tmp_path / "target_eval"),
                     "--out", str(tmp_path / "tuned")])
    assert not (tmp_path / "tuned").exists()


def test_csv_names_run_directories_relative_to_where_the_table_is_made(tmp_path, monkeypatch):
    """A table regenerated from another checkout (same relative sweep paths) is byte for byte the committed one."""
    tables = []
    for checkout in ("first", "second"):
        root = tmp_path / checkout
        _write_run(root / "outputs" / "multiruns" / "t" / "0_ga_gd", 0, 0.8, 0.4)
        monkeypatch.chdir(root)
        main(["outputs/multiruns/t", "--out", "docs", "--name", "t"])
        tables.append((root / "docs" / "t.csv").read_text(encoding="utf-8"))
    assert tables[0] == tables[1]
    assert next(csv.DictReader(tables[0].splitlines()))["run_dir"] == "outputs/multiruns/t/0_ga_gd"


def test_a_seed_saved_with_its_model_is_the_same_configuration_as_one_without(tmp_path):
    """`setting.save_model` and `setting.fail_after_round` change no result (the results key leaves them out), so
    the report does not split a configuration's seeds over them either."""
    from unierase.report.runs import IGNORED_KEYS
    from unierase.run import NOT_RESULT_SETTING_KEYS

    assert {f"setting.{key}" for key in NOT_RESULT_SETTING_KEYS} <= set(IGNORED_KEYS)
    for seed, save in ((0, True), (1, False)):
        _write_run(tmp_path / f"seed{seed}", seed, 0.8, 0.4)
        config = OmegaConf.load(tmp_path / f"seed{seed}" / "config_resolved.yaml")
        config.setting.save_model = save
        OmegaConf.save(config, tmp_path / f"seed{seed}" / "config_resolved.yaml")
    assert len({run.config for run in load_runs([tmp_path])}) == 1


def test_records_regenerate_the_table_without_the_run_directories(tmp_path, monkeypatch):
    """`--records` copies each run's small files beside the table; the table made from them, after `outputs/` is
    gone, is byte for byte the one `--records` wrote, and no model file is copied."""
    monkeypatch.chdir(tmp_path)
    sweep = Path("outputs/multiruns/t")
    _write_run(sweep / "0_unierase_cpu", 0, 0.8, 0.4, data_dir="../shared/data", launched_from="/a/checkout",
               rounds=[{"round": 1, "cl.forget.rouge": 0.1}], overrides=["seed=0"])
    _write_run(sweep / "1_ga_gd", 0, 0.5, 0.2, method="ga_gd", kind="finetune", recipe_lr=1e-5)
    (sweep / "1_ga_gd" / "model.safetensors").write_bytes(b"weights")
    (sweep / "0_unierase_cpu" / "results_key").write_text("key-a\n")
    main([str(sweep), "--out", "docs", "--name", "t", "--records"])
    written = {name: Path("docs", name).read_text(encoding="utf-8") for name in ("t.md", "t.csv", "t_rounds.csv")}
    assert sorted(p.name for p in Path("docs/runs/t/t/0_unierase_cpu").rglob("*") if p.is_file()) == [
        "config_resolved.yaml", "hydra.yaml", "metrics.json", "overrides.yaml", "results_key", "rounds.json"]
    assert not list(Path("docs/runs").rglob("model.safetensors"))
    assert {row["run_dir"] for row in csv.DictReader(written["t.csv"].splitlines())} == {
        "docs/runs/t/t/0_unierase_cpu", "docs/runs/t/t/1_ga_gd"}

    shutil.rmtree("outputs")
    main(["docs/runs/t", "--out", "docs", "--name", "t"])
    assert {name: Path("docs", name).read_text(encoding="utf-8") for name in written} == written


def test_records_refuse_to_copy_a_folder_into_itself_or_two_roots_into_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_run(Path("docs/runs/t/t/0_unierase_cpu"), 0, 0.8, 0.4)
    with pytest.raises(SystemExit, match="already inside"):
        main(["docs/runs/t", "--out", "docs", "--name", "t", "--records"])
    _write_run(Path("a/sweep/0_unierase_cpu"), 0, 0.8, 0.4)
    _write_run(Path("b/sweep/0_unierase_cpu"), 1, 0.8, 0.4)
    with pytest.raises(SystemExit, match="share a folder name"):
        main(["a/sweep", "b/sweep", "--out", "docs", "--name", "u", "--records"])
    assert not Path("docs/runs/u").exists()


def test_an_evaluated_model_is_named_by_its_folder_and_left_out_of_the_headline(tmp_path):
    """`stage=eval` on the cached target: its config still holds the default method group (UniErase), which must
    neither name its row nor make it the headline's UniErase (it would be, with the highest FE and MU here)."""
    from unierase.report.headline import headlines

    _write_run(tmp_path / "runs" / "0_unierase_cpu", 0, 0.8, 0.5)
    _write_run(tmp_path / "runs" / "1_ga_gd", 0, 0.7, 0.2, method="ga_gd", kind="finetune")
    target = tmp_path / "runs" / "target_eval"
    _write_run(target, 0, 0.9, 0.6)
    config = OmegaConf.load(target / "config_resolved.yaml")
    config.stage, config.model.path = "eval", "/cache/targets/target-1f5cb0a071040d84"
    OmegaConf.save(config, target / "config_resolved.yaml")
    runs = load_runs([tmp_path / "runs"])
    assert sorted(run.ids["method"] for run in runs) == ["eval:target", "ga_gd", "unierase_cpu"]
    (found,) = headlines(runs)
    assert found.unierase.label == "unierase_cpu"


def _start_from(run_dir: Path, digest: str, model: str = "target-1f5cb0a071040d84") -> None:
    (run_dir / "starting_model.json").write_text(json.dumps(
        {"id": model, "weights_sha256": {"model.safetensors": digest}}))


def test_runs_started_from_two_builds_of_the_target_are_refused_and_one_build_is_named(tmp_path, monkeypatch):
    """A rebuilt target (same cache entry) can hold other weights: rows started from two builds of it must not share
    a table. The weights are named under the table; runs without the record are listed."""
    monkeypatch.chdir(tmp_path)
    sweep = Path("outputs/multiruns/t")
    _write_run(sweep / "0_unierase_cpu", 0, 0.8, 0.4)
    _write_run(sweep / "1_ga_gd", 0, 0.5, 0.2, method="ga_gd", kind="finetune", recipe_lr=1e-5)
    _write_run(sweep / "2_npo_gd", 0, 0.5, 0.2, method="npo_gd", kind="finetune", recipe_lr=1e-5)
    _start_from(sweep / "0_unierase_cpu", "a" * 64)
    _start_from(sweep / "1_ga_gd", "a" * 64)
    main([str(sweep), "--out", "docs", "--name", "t", "--records"])
    assert Path("docs/runs/t/t/1_ga_gd/starting_model.json").is_file()  # a record file: it travels with the table
    markdown = Path("docs/t.md").read_text(encoding="utf-8")
    config = {run.ids["method"]: run.config for run in load_runs([sweep])}
    assert (f"`{'a' * 12}`: ga_gd #{config['ga_gd']} (seed 0), unierase_cpu #{config['unierase_cpu']} (seed 0); "
            f"not recorded: npo_gd #{config['npo_gd']} (seed 0).") in markdown

    _start_from(sweep / "2_npo_gd", "b" * 64)
    with pytest.raises(SystemExit, match=f"started from target-1f5cb0a071040d84 with different weights "
                                         f"\\({'a' * 12} in .*; {'b' * 12} in .*2_npo_gd\\)"):
        main([str(sweep), "--out", "other", "--name", "t"])
    assert not Path("other/t.md").exists()
    # Another cache entry (a tiny model's base follows the seed; another target recipe) is another model.
    _start_from(sweep / "2_npo_gd", "b" * 64, model="target-0123456789abcdef")
    main([str(sweep), "--out", "other", "--name", "t"])
    assert f"`{'b' * 12}`: npo_gd #{config['npo_gd']} (seed 0)" in Path("other/t.md").read_text(encoding="utf-8")
