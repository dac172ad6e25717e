"""Summary tables and plots over finished runs: `unierase-table PATH [PATH...] [--out DIR] [--name NAME]`.

A run directory is any directory holding both `metrics.json` and `config_resolved.yaml` (single runs
under `outputs/runs/`, sweep jobs under `outputs/multiruns/`). Writes `<out>/<name>.md`, `<name>.csv`,
`<name>_fe_vs_mu.png` and, when a run has `rounds.json`, `<name>_sequential.png`; prints the Markdown.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from unierase.io import atomic_write_text

matplotlib.use("Agg")  # headless: servers and tests have no display; set before any figure exists

MISSING_MD = "–"
PARTIAL_NOTE = ("\\* partial aggregate (`*_partial`): computed over the available components only, "
                "because at least one component metric was null.")


@dataclass(frozen=True)
class Column:
    key: str  # CSV header
    header: str  # Markdown header
    metric: str  # metrics.json key
    fallback: str | None = None  # used (and flagged partial) when `metric` is null
    decimals: int = 3


ID_COLUMNS: tuple[tuple[str, str], ...] = (
    ("method", "Method"), ("benchmark", "Benchmark"), ("split", "Split"),
    ("setting", "Setting"), ("model", "Model"), ("seed", "Seed"),
)
METRIC_COLUMNS: tuple[Column, ...] = (
    Column("forget_efficacy", "Forget Efficacy", "cl.forget_efficacy", "cl.forget_efficacy_partial"),
    Column("model_utility", "Model Utility", "cl.model_utility", "cl.model_utility_partial"),
    Column("forget_rouge", "Forget ROUGE", "cl.forget.rouge"),
    Column("retain_rouge", "Retain ROUGE", "cl.retain.rouge"),
    Column("forget_prob", "Forget Prob", "cl.forget.prob"),
    Column("forget_truth_ratio", "Forget TR", "cl.forget.truth_ratio"),
    Column("ou_forget_quality", "OU Forget Quality", "ou.forget_quality"),
    Column("ou_model_utility", "OU Model Utility", "ou.model_utility"),
    Column("mmlu", "MMLU", "ut.mmlu.acc"),
    Column("triviaqa", "TriviaQA", "ut.triviaqa.acc"),
    Column("gsm8k", "GSM8K", "ut.gsm8k.acc"),
    Column("humaneval", "HumanEval", "ut.humaneval.acc"),
    Column("edited_fraction", "Edited Fraction", "unierase.edited_fraction"),
    Column("wall_time_s", "Wall Time (s)", "time.total_s", decimals=0),
)
FE, MU = METRIC_COLUMNS[0].key, METRIC_COLUMNS[1].key


@dataclass
class Run:
    path: Path
    ids: dict[str, Any]  # the ID_COLUMNS values (None where the config lacks them)
    values: dict[str, float | None]  # METRIC_COLUMNS values by key
    partial: set[str] = field(default_factory=set)  # keys whose value came from the fallback
    rounds: list[dict[str, Any]] | None = None

    def sort_key(self) -> tuple:
        # None sorts last without comparing None to str/int.
        return tuple((self.ids[k] is None, self.ids[k] if self.ids[k] is not None else "")
                     for k in ("benchmark", "setting", "method", "seed"))


def _number(value: Any) -> float | None:
    """A finite number, or None (null, NaN, strings and booleans count as missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def find_run_dirs(paths: list[Path]) -> list[Path]:
    found: set[Path] = set()
    for root in paths:
        if not root.is_dir():
            raise SystemExit(f"unierase-table: {root} is not a directory")
        for metrics in root.rglob("metrics.json"):  # includes root/metrics.json
            run_dir = metrics.parent
            # Hidden directories are atomic-write temporaries (unierase.io.atomic_dir): never finished runs.
            hidden = any(part.startswith(".") for part in run_dir.relative_to(root).parts)
            if not hidden and metrics.is_file() and (run_dir / "config_resolved.yaml").is_file():
                found.add(run_dir.resolve())
    return sorted(found)


def load_run(run_dir: Path) -> Run:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    ids = {
        "method": OmegaConf.select(cfg, "method.name"),
        "benchmark": OmegaConf.select(cfg, "benchmark.name"),
        "split": OmegaConf.select(cfg, "benchmark.split"),
        "setting": OmegaConf.select(cfg, "setting.name"),
        "model": OmegaConf.select(cfg, "model.name"),
        "seed": OmegaConf.select(cfg, "seed"),
    }
    values: dict[str, float | None] = {}
    partial: set[str] = set()
    for col in METRIC_COLUMNS:
        value = _number(metrics.get(col.metric))
        if value is None and col.fallback:
            value = _number(metrics.get(col.fallback))
            if value is not None:
                partial.add(col.key)
        values[col.key] = value
    rounds_file = run_dir / "rounds.json"
    rounds = json.loads(rounds_file.read_text()) if rounds_file.is_file() else None
    return Run(run_dir, ids, values, partial, rounds)


def load_runs(paths: list[Path]) -> list[Run]:
    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise SystemExit(f"unierase-table: no run directories (metrics.json + config_resolved.yaml) "
                         f"under {', '.join(map(str, paths))}")
    return sorted((load_run(d) for d in run_dirs), key=Run.sort_key)


def _fmt(value: float | None, decimals: int, missing: str) -> str:
    return missing if value is None else f"{value:.{decimals}f}"


def _id_text(value: Any, missing: str) -> str:
    return missing if value is None else str(value)


def render_markdown(runs: list[Run]) -> str:
    headers = [h for _, h in ID_COLUMNS] + [c.header for c in METRIC_COLUMNS]
    numeric = [k == "seed" for k, _ in ID_COLUMNS] + [True] * len(METRIC_COLUMNS)
    rows = []
    for run in runs:
        cells = [_id_text(run.ids[k], MISSING_MD) for k, _ in ID_COLUMNS]
        for col in METRIC_COLUMNS:
            text = _fmt(run.values[col.key], col.decimals, MISSING_MD)
            cells.append(text + "\\*" if col.key in run.partial else text)
        rows.append(cells)
    # Padded columns so the printed table is readable as plain text as well as rendered.
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    lines = [line(headers), rule, *(line(r) for r in rows)]
    if any(run.partial for run in runs):
        lines += ["", PARTIAL_NOTE]
    return "\n".join(lines) + "\n"


def render_csv(runs: list[Run]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    # The partial flags keep in the CSV what the Markdown shows with `*`.
    writer.writerow([k for k, _ in ID_COLUMNS] + [c.key for c in METRIC_COLUMNS]
                    + [f"{FE}_is_partial", f"{MU}_is_partial", "run_dir"])
    for run in runs:
        writer.writerow([_id_text(run.ids[k], "") for k, _ in ID_COLUMNS]
                        + [_fmt(run.values[c.key], c.decimals, "") for c in METRIC_COLUMNS]
                        + [str(FE in run.partial).lower(), str(MU in run.partial).lower(), str(run.path)])
    return buffer.getvalue()


def _group_label(run: Run, several_groups: bool) -> str:
    # Benchmark and setting only appear in labels when the runs mix them.
    if not several_groups:
        return str(run.ids["method"])
    return f"{run.ids['method']} ({run.ids['benchmark']}/{run.ids['setting']})"


def _save_figure(fig: plt.Figure, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def plot_fe_vs_mu(runs: list[Run], path: Path) -> None:
    """One point per method (per benchmark/setting when the runs mix them), the mean over seeds."""
    several = len({(r.ids["benchmark"], r.ids["setting"]) for r in runs}) > 1
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.values[FE] is not None and run.values[MU] is not None:
            groups[_group_label(run, several)].append(run)
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, members in sorted(groups.items()):
        fe = sum(r.values[FE] for r in members) / len(members)
        mu = sum(r.values[MU] for r in members) / len(members)
        marked = label + ("*" if any(r.partial & {FE, MU} for r in members) else "")
        ax.scatter(mu, fe)
        ax.annotate(f"{marked} (n={len(members)})", (mu, fe), textcoords="offset points", xytext=(5, 5))
    if not groups:
        ax.text(0.5, 0.5, "no run has both values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Efficacy")
    ax.set_title("Forget Efficacy vs Model Utility (mean over seeds; * partial)")
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def plot_sequential(runs: list[Run], path: Path) -> None:
    """Forget and retain ROUGE after each round, one line per method, the mean over seeds."""
    sequential = [r for r in runs if r.rounds]
    several = len({(r.ids["benchmark"], r.ids["setting"]) for r in sequential}) > 1
    # label -> round -> metric -> values over seeds
    series: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    metrics = (("cl.forget.rouge", "Forget ROUGE"), ("cl.retain.rouge", "Retain ROUGE"))
    for run in sequential:
        for entry in run.rounds:
            for metric, _ in metrics:
                value = _number(entry.get(metric))
                if value is not None:
                    series[_group_label(run, several)][int(entry["round"])][metric].append(value)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, (metric, title) in zip(axes, metrics):
        for label, by_round in sorted(series.items()):
            points = sorted((n, sum(v[metric]) / len(v[metric])) for n, v in by_round.items() if v[metric])
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xlabel("Round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(title)
        ax.set_title(f"{title} per round")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    _save_figure(fig, path)


def write_report(paths: list[Path], out: Path, name: str) -> str:
    """Write the table, CSV and plots; return the Markdown table."""
    runs = load_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(runs)
    atomic_write_text(out / f"{name}.md", markdown)
    atomic_write_text(out / f"{name}.csv", render_csv(runs))
    plot_fe_vs_mu(runs, out / f"{name}_fe_vs_mu.png")
    if any(r.rounds for r in runs):
        plot_sequential(runs, out / f"{name}_sequential.png")
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="unierase-table", description="Summarise run directories into a Markdown/CSV table and plots.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="directories searched recursively for runs (metrics.json + config_resolved.yaml)")
    parser.add_argument("--out", type=Path, help="output directory (default: the first PATH)")
    parser.add_argument("--name", default="summary", help="output file stem (default: summary)")
    args = parser.parse_args(argv)
    print(write_report(args.paths, args.out or args.paths[0], args.name), end="")


if __name__ == "__main__":
    main()
