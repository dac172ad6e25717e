"""`unierase-table PATH [PATH...] [--out DIR] [--name NAME] [--records]`: the report over the runs under PATH.

Writes `<out>/<name>.md`, `<name>.csv`, `<name>_fe_vs_mu.png`, `<name>_rounds.csv` and `<name>_sequential.png`
when a run has `rounds.json`, and `<name>_audit.png` when a run has forget ROUGE under an audit attack; prints the
Markdown. With `--records`, each run's record files are first copied to `<out>/runs/<name>/` (records.py) and
the report is made from the copies, so it regenerates from a checkout that has no `outputs/`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from unierase.io import atomic_write_text
from unierase.report.grouping import load_runs
from unierase.report.plots import plot_audit, plot_fe_vs_mu, plot_sequential
from unierase.report.records import copy_records
from unierase.report.runs import ATTACK_GROUP, any_value
from unierase.report.tables import render_csv, render_markdown, render_rounds_csv


def write_report(paths: list[Path], out: Path, name: str) -> str:
    """Write the table, CSV and plots; return the Markdown table."""
    runs = load_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(runs)
    atomic_write_text(out / f"{name}.md", markdown)
    atomic_write_text(out / f"{name}.csv", render_csv(runs))
    plot_fe_vs_mu(runs, out / f"{name}_fe_vs_mu.png")
    if any(r.rounds for r in runs):
        atomic_write_text(out / f"{name}_rounds.csv", render_rounds_csv(runs))
        plot_sequential(runs, out / f"{name}_sequential.png")
    if any_value(runs, ATTACK_GROUP.columns):  # what plot_audit draws: a membership-only audit has no heatmap
        plot_audit(runs, out / f"{name}_audit.png")
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="unierase-table", description="Summarise run directories into a Markdown/CSV table and plots.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="directories searched recursively for runs (metrics.json + config_resolved.yaml)")
    parser.add_argument("--out", type=Path, help="output directory (default: the first PATH)")
    parser.add_argument("--name", default="summary", help="output file stem (default: summary)")
    parser.add_argument("--records", action="store_true",
                        help="copy each run's record files to <out>/runs/<name>/ and report from the copies")
    args = parser.parse_args(argv)
    out = args.out or args.paths[0]
    paths = args.paths
    if args.records:
        copy_records(paths, out / "runs" / args.name)
        paths = [out / "runs" / args.name]
    print(write_report(paths, out, args.name), end="")

