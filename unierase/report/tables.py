"""The report's tables: every run as one row, rendered as padded Markdown and as CSV; in the Markdown, the
configurations' means ± sd over seeds (where one has several seeds), the paper's headline comparisons
(headline.py) and the column groups (per split, robustness audit), after the main table."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from unierase.report.grouping import same_seed_runs
from unierase.report.headline import headlines, render_headlines
from unierase.report.plots import plot_units, unit_stat
from unierase.report.runs import (
    COLUMN_GROUPS,
    FE,
    ID_COLUMNS,
    METRIC_COLUMNS,
    MU,
    Column,
    Run,
    _differs_text,
    _value_text,
    any_value,
)

MISSING_MD = "–"
PARTIAL_NOTE = ("\\* partial aggregate (`*_partial`): computed over the available components only, "
                "because at least one component metric was null.")
CONFIG_NOTE = ("Config: hash of the resolved configuration without the seed (runs that share it differ only in "
               "the seed), then what tells it from the other configurations of the same method, benchmark, split, "
               "setting and model.")
SAME_SEED_MARK = "†"
# The columns of the means over seeds: the comparison's aggregates, ROUGE on both splits, forget quality, cost.
SEED_MEAN_KEYS: tuple[str, ...] = (FE, MU, "forget_rouge", "retain_rouge", "forget_truth_ratio",
                                   "ou_forget_quality", "wall_time_s")


def _fmt(value: float | None, decimals: int, missing: str) -> str:
    return missing if value is None else f"{value:.{decimals}f}"


def _id_text(value: Any, missing: str) -> str:
    return missing if value is None else str(value)


def _config_text(run: Run) -> str:
    return f"{run.config}: {_differs_text(run.differs)}" if run.differs else run.config


def _table(runs: list[Run], columns: tuple[Column, ...], marked: set[int]) -> list[str]:
    """The padded Markdown lines of one table: the ID, Config and Seed columns, then `columns`; the seeds of
    runs in `marked` (by id) carry SAME_SEED_MARK."""
    id_columns = [(k, h) for k, h in ID_COLUMNS if k != "seed"]
    headers = [h for _, h in id_columns] + ["Config", "Seed"] + [c.header for c in columns]
    numeric = [False] * (len(id_columns) + 1) + [True] * (1 + len(columns))
    rows = []
    for run in runs:
        cells = [_id_text(run.ids[k], MISSING_MD) for k, _ in id_columns]
        cells.append(_config_text(run).replace("|", "\\|"))
        cells.append(_id_text(run.ids["seed"], MISSING_MD) + (SAME_SEED_MARK if id(run) in marked else ""))
        for col in columns:
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
    return [line(headers), rule, *(line(r) for r in rows)]


def _seed_means_table(runs: list[Run]) -> list[str]:
    """One row per configuration (plot_units): mean ± sample sd over its seeds, `–` where a seed lacks the value."""
    columns = [col for col in METRIC_COLUMNS if col.key in SEED_MEAN_KEYS]
    lines = ["| Configuration | n | " + " | ".join(col.header for col in columns) + " |",
             "|---|--:|" + "--:|" * len(columns)]
    for unit in plot_units(runs):
        cells = []
        for col in columns:
            stat = unit_stat(unit, col.key)
            partial = "\\*" if any(col.key in run.partial for run in unit.runs) else ""
            cells.append(MISSING_MD if stat is None else stat.text(col.decimals) + partial)
        label = unit.label.replace("|", "\\|")
        lines.append(f"| {label} | {len(unit.runs)} | " + " | ".join(cells) + " |")
    return lines


def _starting_weights_note(runs: list[Run]) -> list[str]:
    """Which weights each row started from, so a reader sees that the rows share one target build."""
    if all(run.starting_weights is None for run in runs):
        return []
    by_weights: dict[str | None, list[str]] = {}
    for run in runs:
        # the config hash tells apart two configurations of one method (the Config column's first field)
        by_weights.setdefault(run.starting_weights, []).append(
            f"{run.ids['method']} #{run.config} (seed {run.ids['seed']})")
    parts = [f"`{weights[:12]}`: {', '.join(labels)}" for weights, labels in by_weights.items() if weights]
    if None in by_weights:
        parts.append(f"not recorded: {', '.join(by_weights[None])}")
    return ["", "Starting weights (sha256 of the model's safetensors, first 12 digits; `starting_model.json`): "
                + "; ".join(parts) + "."]


def render_markdown(runs: list[Run]) -> str:
    """The main table with its notes; the means over seeds where a configuration has several; the headline
    comparisons where a protocol has UniErase and baseline rows; then a section per column group (COLUMN_GROUPS)
    that has a value, listing the runs that have one."""
    same_seed = same_seed_runs(runs)
    marked = {id(run) for members in same_seed for run in members}
    lines = [*_table(runs, METRIC_COLUMNS, marked), "", CONFIG_NOTE, *_starting_weights_note(runs)]
    if any(run.partial for run in runs):
        lines += ["", PARTIAL_NOTE]
    if same_seed:
        groups = "; ".join(", ".join(f"`{run.path}`" for run in members) for members in same_seed)
        lines += ["", f"{SAME_SEED_MARK} same configuration and same seed: listed apart and never averaged, "
                      f"in the plots neither: {groups}."]
    if any(len(unit.runs) > 1 for unit in plot_units(runs)):
        lines += ["", "### Mean ± sd over seeds", "", *_seed_means_table(runs)]
    lines += render_headlines(headlines(runs))
    for group in COLUMN_GROUPS:
        audited = [run for run in runs if any_value([run], group.columns)]
        if audited:
            lines += ["", f"### {group.title}", "", *_table(audited, group.columns, marked)]
            lines += [line for note in group.notes for line in ("", note)]
    return "\n".join(lines) + "\n"


def shown_path(path: Path) -> str:
    """A run directory as the CSVs name it: relative to the working directory when under it, so the committed
    tables regenerate byte for byte from another checkout."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def render_csv(runs: list[Run]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    marked = {id(run) for members in same_seed_runs(runs) for run in members}
    # A group's columns only where a run has a value, so the CSV of runs without the audit has no audit columns.
    columns = METRIC_COLUMNS + tuple(col for group in COLUMN_GROUPS if any_value(runs, group.columns)
                                     for col in group.columns)
    # The partial flags keep in the CSV what the Markdown shows with `*`; config_diff names every setting.
    writer.writerow([k for k, _ in ID_COLUMNS] + [c.key for c in columns]
                    + [f"{FE}_is_partial", f"{MU}_is_partial", "config", "config_diff", "same_config_and_seed",
                       "run_dir"])
    for run in runs:
        diff = "; ".join(f"{path}={value if isinstance(value, str) else _value_text(value)}"
                         for path, value in run.differs.items())
        writer.writerow([_id_text(run.ids[k], "") for k, _ in ID_COLUMNS]
                        + [_fmt(run.values[c.key], c.decimals, "") for c in columns]
                        + [str(FE in run.partial).lower(), str(MU in run.partial).lower(), run.config, diff,
                           str(id(run) in marked).lower(), shown_path(run.path)])
    return buffer.getvalue()


# The per-round CSV's metric columns: (round entry key, CSV column).
ROUND_COLUMNS: tuple[tuple[str, str], ...] = (
    ("cl.forget.rouge", "forget_rouge"), ("cl.forgotten.rouge", "forgotten_rouge"), ("cl.retain.rouge", "retain_rouge"),
    ("cl.real_authors.rouge", "real_authors_rouge"), ("cl.world_facts.rouge", "world_facts_rouge"),
    ("cl.forget.prob", "forget_prob"), ("cl.retain.prob", "retain_prob"),
    ("unierase.first_token_rate", "first_token_rate"), ("time.unlearn_s", "unlearn_s"),
)


def render_rounds_csv(runs: list[Run]) -> str:
    """One row per round of every sequential run (round 0: the model before the first request): `method` is the
    run's configuration label, as in the plots' legend; `forget_rouge` scores the round's own request."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "seed", "round", *(column for _, column in ROUND_COLUMNS), "run_dir"])
    for unit in plot_units([run for run in runs if run.rounds]):
        for run in unit.runs:
            for entry in run.rounds:
                values = [entry.get(key) for key, _ in ROUND_COLUMNS]
                writer.writerow([unit.label, _id_text(run.ids["seed"], ""), entry["round"],
                                 *("" if v is None else f"{v:.4f}" for v in values), shown_path(run.path)])
    return buffer.getvalue()
