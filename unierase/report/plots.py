"""The report's plots: forget efficacy vs model utility, ROUGE per round of a sequential run, and forget ROUGE
under the robustness audit's attacks.

Each plot averages the runs of one configuration over seeds (plot_units), and never averages two runs
with the same seed. Figures are written atomically as PNG.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from unierase.report.runs import ATTACK_GROUP, FAMILY, FE, MU, Run, _differs_text, _number, any_value

matplotlib.use("Agg")  # headless: servers and tests have no display; set before any figure exists


@dataclass(frozen=True)
class Unit:
    """What a plot draws as one point or line: one configuration's runs, at most one per seed."""
    label: str
    runs: tuple[Run, ...]  # n = len(runs): the seeds averaged


def plot_units(runs: list[Run]) -> list[Unit]:
    """One unit per configuration, averaging its seeds. A configuration with a seed run twice is not
    averaged at all: each of its runs is a unit, labelled with its seed and directory.

    Labels: the method; the benchmark, split, setting and model where the runs mix them; and, where its
    family has several configurations, the settings that differ and the configuration hash."""
    varying = [k for k in FAMILY[1:] if len({run.ids[k] for run in runs}) > 1]
    configs: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        configs[run.config].append(run)
    units = []
    for members in configs.values():
        first = members[0]
        label = str(first.ids["method"])
        if varying:
            label += f" ({'/'.join(str(first.ids[k]) for k in varying)})"
        if first.differs:
            label += f" [{_differs_text(first.differs)}] #{first.config}"
        seeds = [run.ids["seed"] for run in members]
        if len(set(seeds)) == len(seeds):
            units.append(Unit(label, tuple(members)))
        else:
            root = Path(os.path.commonpath([run.path for run in members]))
            units += [Unit(f"{label} seed={run.ids['seed']} {run.path.relative_to(root)}", (run,)) for run in members]
    return sorted(units, key=lambda unit: unit.label)


@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float | None  # sample standard deviation; None for one seed
    n: int

    def text(self, decimals: int = 3) -> str:
        sd = "" if self.sd is None else f" ± {self.sd:.{decimals}f}"
        return f"{self.mean:.{decimals}f}{sd}"


def unit_stat(unit: Unit, key: str) -> Stat | None:
    """The mean and sd of column `key` over the unit's seeds; None when a run lacks it."""
    values = [run.values[key] for run in unit.runs]
    if any(value is None for value in values):
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


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


@dataclass(frozen=True)
class Point:
    text: str  # its legend entry: the unit's label, `*` when partial, (n=seeds averaged)
    n: int
    model_utility: float
    forget_efficacy: float
    model_utility_sd: float | None  # sample sd over the seeds; None for one seed
    forget_efficacy_sd: float | None


def plot_fe_vs_mu(runs: list[Run], path: Path) -> list[Point]:
    """One point per configuration, the mean over its seeds (plot_units) with ± sd bars; returns the points drawn.
    Points are numbered and the labels go in a legend under the axes: configuration labels are long, and points
    that sit close together (baselines that barely forget) would make annotations unreadable."""
    units = plot_units([r for r in runs if r.values[FE] is not None and r.values[MU] is not None])
    points = []
    for unit in units:
        partial = "*" if any(r.partial & {FE, MU} for r in unit.runs) else ""
        mu, fe = unit_stat(unit, MU), unit_stat(unit, FE)
        points.append(Point(f"{unit.label}{partial} (n={mu.n})", mu.n, mu.mean, fe.mean, mu.sd, fe.sd))
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "osD^v<>pPX*h"
    for number, point in enumerate(points, start=1):
        ax.errorbar(point.model_utility, point.forget_efficacy, xerr=point.model_utility_sd,
                    yerr=point.forget_efficacy_sd, fmt=markers[(number - 1) % len(markers)], capsize=3,
                    label=f"{number}: {point.text}")
        ax.annotate(str(number), (point.model_utility, point.forget_efficacy), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if points:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no run has both values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Efficacy")
    ax.set_title("Forget Efficacy vs Model Utility (mean ± sd over seeds; * partial)")
    ax.grid(alpha=0.3)
    _save_figure(fig, path)
    return points


SEQUENTIAL_METRICS: tuple[tuple[str, str], ...] = (("cl.forget.rouge", "Forget ROUGE"),
                                                   ("cl.retain.rouge", "Retain ROUGE"))


def plot_sequential(runs: list[Run], path: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Forget and retain ROUGE after each round, one line per configuration, the mean over its seeds;
    returns the lines drawn: legend -> metric -> (round, value)."""
    lines: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for unit in plot_units([r for r in runs if r.rounds]):
        by_round: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))  # metric -> round
        for run in unit.runs:
            for entry in run.rounds:
                for metric, _ in SEQUENTIAL_METRICS:
                    value = _number(entry.get(metric))
                    if value is not None:
                        by_round[metric][int(entry["round"])].append(value)
        lines[f"{unit.label} (n={len(unit.runs)})"] = {
            metric: sorted((number, sum(values) / len(values)) for number, values in by_round[metric].items())
            for metric, _ in SEQUENTIAL_METRICS}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, (metric, title) in zip(axes, SEQUENTIAL_METRICS):
        for legend, by_metric in lines.items():
            if by_metric[metric]:
                ax.plot(*zip(*by_metric[metric]), marker="o", label=legend)
        ax.set_xlabel("Round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(title)
        ax.set_title(f"{title} per round")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # one legend for both panels, under them: configuration labels are long
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8)
    _save_figure(fig, path)
    return lines


@dataclass(frozen=True)
class Heatmap:
    labels: list[str]  # rows: the unit's label and (n=seeds averaged)
    columns: list[str]  # the attacks' headers
    values: list[list[float | None]]  # [row][column]; None: no seed has the value (drawn grey, no number)


def plot_audit(runs: list[Run], path: Path) -> Heatmap:
    """Forget ROUGE-L recall under each attack (ATTACK_GROUP), one row per configuration: the mean
    over the seeds that have the value (as plot_sequential averages the rounds it has); returns the matrix drawn."""
    columns = ATTACK_GROUP.columns
    labels, values = [], []
    for unit in plot_units([r for r in runs if any_value([r], columns)]):
        labels.append(f"{unit.label} (n={len(unit.runs)})")
        row = []
        for col in columns:
            present = [r.values[col.key] for r in unit.runs if r.values[col.key] is not None]
            row.append(sum(present) / len(present) if present else None)
        values.append(row)
    heatmap = Heatmap(labels, [col.header for col in columns], values)
    fig, ax = plt.subplots(figsize=(2 + 0.6 * len(columns), 1.5 + 0.45 * max(len(labels), 1)))
    if labels:
        # None -> NaN -> masked: a grey cell without a number, told apart from a 0 (near white in Reds).
        matrix = np.ma.masked_invalid(np.array(values, dtype=float))
        # ROUGE recall lies in [0, 1]: a fixed scale keeps colours comparable between reports.
        image = ax.imshow(matrix, cmap=matplotlib.colormaps["Reds"].with_extremes(bad="lightgrey"), vmin=0, vmax=1,
                          aspect="auto")
        fig.colorbar(image, ax=ax, label="forget ROUGE-L recall")
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if value is not None:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if value > 0.6 else "black")
        ax.set_xticks(range(len(columns)), heatmap.columns, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
    else:
        ax.text(0.5, 0.5, "no run has audit values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Forget ROUGE-L recall under attack (mean over seeds)")
    _save_figure(fig, path)
    return heatmap
