"""Summary tables and plots over finished runs: `unierase-table PATH [PATH...] [--out DIR] [--name NAME]`.

A run directory is any directory holding both `metrics.json` and `config_resolved.yaml` (single runs
under `outputs/runs/`, sweep jobs under `outputs/multiruns/`). Writes `<out>/<name>.md`, `<name>.csv`,
`<name>_fe_vs_mu.png`, `<name>_sequential.png` when a run has `rounds.json`, and `<name>_audit.png` when a run
has forget ROUGE under an audit attack; prints the Markdown.

Runs are grouped by their configuration: the resolved config without the seed and without the keys that
cannot change results (IGNORED_KEYS). The table lists every run, with its configuration's short hash and the
settings that tell it from the other configurations of the same method, benchmark, split, setting and model;
configurations with several seeds get their means ± sd, each protocol with UniErase and baseline rows the paper's
headline comparisons (headline.py), and each column group (ROUGE/Prob/truth ratio per split, the robustness
audit's `audit.*` metrics) a table of its own over the runs that have its values. The plots average the runs
of one configuration over seeds, and never average two runs with the same seed.

Where each part lives:

  runs.py      finding and loading run directories: the Run record, its columns and column groups, its settings
  grouping.py  configurations: the key (settings less the seed), what tells configurations apart, load_runs
  tables.py    the Markdown and CSV tables, with the means ± sd over seeds
  headline.py  the paper's two headline comparisons (UniErase vs the best-forgetting / best-retaining baseline)
  plots.py     the FE-vs-MU, sequential (per round) and audit (heatmap) plots, averaged over seeds
  cli.py       write_report and `unierase-table` (main)
  records.py   the runs' record files copied where git keeps them (`unierase-table --records`)
  select.py    `unierase-select`: each method's hyperparameters from a validation sweep, one rule for all
"""
from unierase.report.cli import main, write_report
from unierase.report.grouping import group_runs, load_runs, same_seed_runs
from unierase.report.plots import plot_audit, plot_fe_vs_mu, plot_sequential, plot_units
from unierase.report.runs import IGNORED_KEYS, Run, find_run_dirs, load_run
from unierase.report.tables import render_csv, render_markdown

__all__ = ["IGNORED_KEYS", "Run", "find_run_dirs", "group_runs", "load_run", "load_runs", "main", "plot_audit",
           "plot_fe_vs_mu", "plot_sequential", "plot_units", "render_csv", "render_markdown", "same_seed_runs",
           "write_report"]
