"""Summary tables and plots over finished runs: `unierase-table PATH [PATH...] [--out DIR] [--name NAME]`.

A run directory is any directory holding both `metrics.json` and `config_resolved.yaml` (single runs
under `outputs/runs/`, sweep jobs under `outputs/multiruns/`). Writes `<out>/<name>.md`, `<name>.csv`,
`<name>_fe_vs_mu.png` and, when a run has `rounds.json`, `<name>_sequential.png`; prints the Markdown.

Runs are grouped by their configuration: the resolved config without the seed and without the keys that
cannot change results (IGNORED_KEYS). The table lists every run, with its configuration's short hash and the
settings that tell it from the other configurations of the same method, benchmark, split, setting and model;
the plots average the runs of one configuration over seeds, and never average two runs with the same seed.
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

from unierase.io import atomic_write_text, stable_hash

matplotlib.use("Agg")  # headless: servers and tests have no display; set before any figure exists

MISSING_MD = "–"
PARTIAL_NOTE = ("\\* partial aggregate (`*_partial`): computed over the available components only, "
                "because at least one component metric was null.")
CONFIG_NOTE = ("Config: hash of the resolved configuration without the seed (runs that share it differ only in "
               "the seed), then what tells it from the other configurations of the same method, benchmark, split, "
               "setting and model.")
SAME_SEED_MARK = "†"

# Resolved-config keys (and everything under them) that cannot change a run's results, left out of its
# configuration: where the cache lives (entries are keyed by what produced them), logging and labels, the
# progress display, what a sweeper is told, and how the target is built (not part of its cache key: the
# same cached target either way). Everything else counts, so an unknown key splits groups, never merges them.
IGNORED_KEYS: tuple[str, ...] = (
    "paths.cache_dir", "logger", "tags", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "optimized_metric", "objective_constraint", "target.build_in_subprocess", "target.gradient_checkpointing",
)
# Folders whose relative paths resolve against the directory `unierase` was started from.
DATA_DIR_KEYS: tuple[str, ...] = ("paths.data_dir", "benchmark.data_dir", "method.edit.mom2_corpus")
UNSET = "(unset)"  # a setting one configuration has and another lacks
DIFFERS_SHOWN = 3  # settings named in a label; the CSV's config_diff has them all


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
FAMILY: tuple[str, ...] = ("method", "benchmark", "split", "setting", "model")  # the ID columns but the seed
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
    settings: dict[str, Any] = field(default_factory=dict)  # dotted path -> value, without `seed` and IGNORED_KEYS
    config: str = ""  # short hash of the configuration: `settings` less those that follow the seed (group_runs)
    # What tells `config` from its family's other configurations: "path=value", or "path=path=value" for
    # settings that always agree there.
    differs: dict[str, Any] = field(default_factory=dict)

    def family(self) -> tuple[Any, ...]:
        return tuple(self.ids[k] for k in FAMILY)

    def sort_key(self) -> tuple:
        return tuple(_none_last(v) for v in (self.ids["benchmark"], self.ids["setting"], self.ids["method"],
                                             self.ids["split"], self.ids["model"], _differs_text(self.differs),
                                             self.config, self.ids["seed"], str(self.path)))


def _none_last(value: Any) -> tuple[bool, Any]:
    # None sorts last without comparing None to str/int.
    return value is None, value if value is not None else ""


def _number(value: Any) -> float | None:
    """A finite number, or None (null, NaN, strings and booleans count as missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted path -> value; lists and empty dicts are values."""
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix.removesuffix("."): node}


def _value_text(value: Any) -> str:
    """Comparable text of a setting: tells 1 from "1" and works for lists."""
    return json.dumps(value, sort_keys=True, default=str)


def _differs_text(differs: dict[str, Any], width: int = 32) -> str:
    """`path=value` for the first DIFFERS_SHOWN settings; long values keep their end (a folder's last parts)."""
    shown = []
    for path, value in list(differs.items())[:DIFFERS_SHOWN]:
        text = value if isinstance(value, str) else _value_text(value)
        shown.append(f"{path}={text if len(text) <= width else '…' + text[1 - width:]}")
    more = len(differs) - DIFFERS_SHOWN
    return ", ".join(shown) + (f", +{more} more" if more > 0 else "")


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


def _launch_dir(run_dir: Path) -> Path | None:
    """The directory `unierase` was started from, as Hydra recorded it (None without `.hydra/hydra.yaml`)."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd")
    return Path(cwd) if cwd else None


def _settings(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The flattened config without the seed and IGNORED_KEYS; data folders absolute where the launch
    directory is known, so `../shared/data` started from two checkouts names two folders."""
    settings = {path: value for path, value in _flatten(cfg).items()
                if path != "seed" and not any(path == k or path.startswith(k + ".") for k in IGNORED_KEYS)}
    launch = _launch_dir(run_dir)
    for key in DATA_DIR_KEYS:
        value = settings.get(key)
        if launch is not None and isinstance(value, str) and not Path(value).is_absolute():
            settings[key] = os.path.normpath(launch / value)
    return settings


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
    return Run(run_dir, ids, values, partial, rounds, _settings(OmegaConf.to_container(cfg), run_dir))


def _seed_following(runs: list[Run]) -> set[str]:
    """Nested `seed` settings equal to the run's seed in every run that has them (`method.edit.seed: ${seed}`).

    Decided over all runs, not one at a time: `target.seed` is a literal 0 that a seed-0 run matches by
    chance; a seed-1 run with `target.seed` 0 shows it does not follow the seed, and it stays in the key."""
    nested = {path for run in runs for path in run.settings if path.rsplit(".", 1)[-1] == "seed"}
    return {path for path in nested
            if all(run.settings[path] == run.ids["seed"] for run in runs if path in run.settings)}


def group_runs(runs: list[Run]) -> None:
    """Set each run's `config` and `differs`. A hash names a configuration within this set of runs."""
    following = _seed_following(runs)
    keys: dict[str, dict[str, Any]] = {}  # config hash -> the settings it hashes
    families: dict[tuple[Any, ...], set[str]] = defaultdict(set)  # family -> its config hashes
    for run in runs:
        key = {path: value for path, value in run.settings.items() if path not in following}
        run.config = stable_hash(key, 8)
        keys[run.config] = key
        families[run.family()].add(run.config)
    differs: dict[str, dict[str, Any]] = {}
    for family in families.values():
        configs = sorted(family)
        # The values a setting takes across the family's configurations -> the settings that take them, so
        # an interpolated copy (benchmark.data_dir: ${paths.data_dir}) joins its source in one entry.
        together: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for path in sorted({path for config in configs for path in keys[config]}):
            values = tuple(_value_text(keys[config].get(path, UNSET)) for config in configs)
            if len(set(values)) > 1:
                together[values].append(path)
        for config in configs:
            differs[config] = {"=".join(paths): keys[config].get(paths[0], UNSET) for paths in together.values()}
    for run in runs:
        run.differs = differs[run.config]


def load_runs(paths: list[Path]) -> list[Run]:
    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise SystemExit(f"unierase-table: no run directories (metrics.json + config_resolved.yaml) "
                         f"under {', '.join(map(str, paths))}")
    runs = [load_run(d) for d in run_dirs]
    group_runs(runs)
    return sorted(runs, key=Run.sort_key)


def same_seed_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs that share configuration and seed (reruns, or the same command on an unchanged data folder):
    each list holds two or more, which nothing here averages."""
    by_seed: dict[tuple[str, Any], list[Run]] = defaultdict(list)
    for run in runs:
        by_seed[(run.config, run.ids["seed"])].append(run)
    return [members for members in by_seed.values() if len(members) > 1]


def _fmt(value: float | None, decimals: int, missing: str) -> str:
    return missing if value is None else f"{value:.{decimals}f}"


def _id_text(value: Any, missing: str) -> str:
    return missing if value is None else str(value)


def _config_text(run: Run) -> str:
    return f"{run.config}: {_differs_text(run.differs)}" if run.differs else run.config


def render_markdown(runs: list[Run]) -> str:
    id_columns = [(k, h) for k, h in ID_COLUMNS if k != "seed"]
    headers = [h for _, h in id_columns] + ["Config", "Seed"] + [c.header for c in METRIC_COLUMNS]
    numeric = [False] * (len(id_columns) + 1) + [True] * (1 + len(METRIC_COLUMNS))
    same_seed = same_seed_runs(runs)
    marked = {id(run) for members in same_seed for run in members}
    rows = []
    for run in runs:
        cells = [_id_text(run.ids[k], MISSING_MD) for k, _ in id_columns]
        cells.append(_config_text(run).replace("|", "\\|"))
        cells.append(_id_text(run.ids["seed"], MISSING_MD) + (SAME_SEED_MARK if id(run) in marked else ""))
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
    lines = [line(headers), rule, *(line(r) for r in rows), "", CONFIG_NOTE]
    if any(run.partial for run in runs):
        lines += ["", PARTIAL_NOTE]
    if same_seed:
        groups = "; ".join(", ".join(f"`{run.path}`" for run in members) for members in same_seed)
        lines += ["", f"{SAME_SEED_MARK} same configuration and same seed: listed apart and never averaged, "
                      f"in the plots neither: {groups}."]
    return "\n".join(lines) + "\n"


def render_csv(runs: list[Run]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    marked = {id(run) for members in same_seed_runs(runs) for run in members}
    # The partial flags keep in the CSV what the Markdown shows with `*`; config_diff names every setting.
    writer.writerow([k for k, _ in ID_COLUMNS] + [c.key for c in METRIC_COLUMNS]
                    + [f"{FE}_is_partial", f"{MU}_is_partial", "config", "config_diff", "same_config_and_seed",
                       "run_dir"])
    for run in runs:
        diff = "; ".join(f"{path}={value if isinstance(value, str) else _value_text(value)}"
                         for path, value in run.differs.items())
        writer.writerow([_id_text(run.ids[k], "") for k, _ in ID_COLUMNS]
                        + [_fmt(run.values[c.key], c.decimals, "") for c in METRIC_COLUMNS]
                        + [str(FE in run.partial).lower(), str(MU in run.partial).lower(), run.config, diff,
                           str(id(run) in marked).lower(), str(run.path)])
    return buffer.getvalue()


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
    text: str  # its annotation: the unit's label, `*` when partial, (n=seeds averaged)
    n: int
    model_utility: float
    forget_efficacy: float


def plot_fe_vs_mu(runs: list[Run], path: Path) -> list[Point]:
    """One point per configuration, the mean over its seeds (plot_units); returns the points drawn."""
    units = plot_units([r for r in runs if r.values[FE] is not None and r.values[MU] is not None])
    points = []
    for unit in units:
        partial = "*" if any(r.partial & {FE, MU} for r in unit.runs) else ""
        n = len(unit.runs)
        points.append(Point(f"{unit.label}{partial} (n={n})", n, sum(r.values[MU] for r in unit.runs) / n,
                            sum(r.values[FE] for r in unit.runs) / n))
    fig, ax = plt.subplots(figsize=(6, 5))
    for point in points:
        ax.scatter(point.model_utility, point.forget_efficacy)
        ax.annotate(point.text, (point.model_utility, point.forget_efficacy), textcoords="offset points",
                    xytext=(5, 5))
    if not points:
        ax.text(0.5, 0.5, "no run has both values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Efficacy")
    ax.set_title("Forget Efficacy vs Model Utility (mean over seeds; * partial)")
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
        if ax.has_data():
            ax.legend()
    _save_figure(fig, path)
    return lines


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
