"""`unierase-select SWEEP [SWEEP...] --reference RUN --out DIR`: each method's hyperparameters, chosen by one rule
on a validation sweep and written as a config of the `tuned` group (issue #22).

The rule, the same for every method: among the method's configurations in the sweep (seeds averaged), keep those
whose model utility is at least `--min-utility-ratio` times the reference's (the target model scored on the same
validation protocol: a `stage=eval` run), and take the one with the highest forget efficacy (ties: the higher
utility). When none is feasible, the one with the highest utility is taken and the file says so. `<out>/<method>.yaml`
holds the settings the sweep varied, at the chosen values, under a header listing every trial, so a table's rows
say where their hyperparameters came from: `unierase experiment=cpu_tofu_batch method=ga_gd tuned=ga_gd`.
Every run must share the reference's protocol (its benchmark, evaluation and target settings), and no two runs may
be the same configuration and seed (a reused copy in a second sweep directory would count twice).
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from unierase.io import atomic_write_text
from unierase.report.grouping import load_runs, seed_following
from unierase.report.runs import FE, MU, Run, load_run


@dataclass(frozen=True)
class Trial:
    """One configuration of a method in the sweep, its seeds averaged."""
    config: str
    settings: dict[str, Any]  # the settings the method's sweep varied, at this configuration's values
    forget_efficacy: float | None
    model_utility: float | None
    runs: tuple[Run, ...]

    def feasible(self, bound: float) -> bool:
        return self.model_utility is not None and self.model_utility >= bound


@dataclass(frozen=True)
class Selection:
    method: str
    chosen: Trial
    trials: tuple[Trial, ...]
    bound: float  # the least model utility a trial must keep
    feasible: bool  # False: no trial kept the bound; `chosen` is the one with the highest utility


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if len(present) == len(values) and present else None


def protocol_differences(run: Run, reference: Run) -> list[str]:
    """The protocol settings in which `run` differs from `reference`, as `path: run value vs reference value`."""
    ours, theirs = run.protocol(), reference.protocol()
    return [f"{path}: {ours.get(path)!r} vs {theirs.get(path)!r}" for path in sorted({*ours, *theirs})
            if ours.get(path) != theirs.get(path)]


def _command_line(run: Run) -> dict[str, str] | None:
    """The run's command-line overrides (Hydra's `.hydra/overrides.yaml`), path -> value; None without the file."""
    overrides = run.path / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return None
    pairs = (str(item).split("=", 1) for item in OmegaConf.load(overrides))
    return {pair[0].lstrip("+~"): pair[-1] for pair in pairs}


def _swept(path: str, swept_paths: set[str]) -> bool:
    return any(path == swept or path.startswith(swept + ".") for swept in swept_paths)


def trials_of(runs: list[Run]) -> list[Trial]:
    """A method's configurations; `settings` holds the paths whose value differs between them.

    Where Hydra recorded the command lines, only paths under an override whose value differs between the runs
    count (a swept config group, `recipe=a,b`, counts with every path under it), so an interpolated copy (a
    baseline's `method.recipe: ${recipe}`) is not written beside its source: a tuned file that set both would
    freeze the copy, and a later `recipe.lr=...` on the command line would no longer reach the method."""
    seen: dict[tuple[str, Any], Run] = {}
    for run in runs:
        twin = seen.setdefault((run.config, run.ids["seed"]), run)
        if twin is not run:
            raise SystemExit(f"unierase-select: {twin.path} and {run.path} are the same configuration and seed "
                             "(a reused copy?): pass each trial's sweep directory once")
    following = seed_following(runs)
    paths = {path for run in runs for path in run.settings if path not in following}
    command_lines = [_command_line(run) for run in runs]
    if all(found is not None for found in command_lines):
        keys = set().union(*command_lines)
        swept = {key for key in keys if len({repr(line.get(key)) for line in command_lines}) > 1}
        paths = {path for path in paths if _swept(path, swept)}
    varied = [path for path in sorted(paths) if len({repr(run.settings.get(path)) for run in runs}) > 1]
    by_config: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_config[run.config].append(run)
    trials = [Trial(config, {path: members[0].settings[path] for path in varied if path in members[0].settings},
                    _mean([run.values[FE] for run in members]),
                    _mean([run.values[MU] for run in members]), tuple(members))
              for config, members in by_config.items()]
    return sorted(trials, key=lambda trial: [_order(value) for value in trial.settings.values()])


def _order(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order, before anything else in text order."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0, float(value), ""
    return 1, 0.0, repr(value)


def select(runs: list[Run], reference_utility: float, ratio: float) -> list[Selection]:
    """The rule of the module docstring, per method."""
    by_method: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_method[str(run.ids["method"])].append(run)
    bound = ratio * reference_utility
    selections = []
    for method, members in sorted(by_method.items()):
        trials = trials_of(members)
        feasible = [t for t in trials if t.feasible(bound) and t.forget_efficacy is not None]
        if feasible:
            chosen = max(feasible, key=lambda t: (t.forget_efficacy, t.model_utility))
        else:
            chosen = max(trials, key=lambda t: -1.0 if t.model_utility is None else t.model_utility)
        selections.append(Selection(method, chosen, tuple(trials), bound, bool(feasible)))
    return selections


def _number(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def tuned_yaml(selection: Selection, sources: list[Path], reference: Path, reference_utility: float,
               ratio: float) -> str:
    """The `tuned` group entry: a header with the rule and every trial, then the chosen settings."""
    chosen = selection.chosen
    rule = (f"max forget efficacy subject to model utility >= {ratio} x the reference's {reference_utility:.4f} "
            f"= {selection.bound:.4f}")
    header = [
        "# @package _global_",
        f"# {selection.method}: chosen by unierase-select on {', '.join(str(s) for s in sources)}",
        f"# reference (the target on the same protocol): {reference}",
        f"# rule: {rule}.",
        f"# {len(selection.trials)} configurations, {sum(len(t.runs) for t in selection.trials)} runs."
        + ("" if selection.feasible else " NO configuration kept the bound: this is the one with the highest utility."),
        "# trials (forget efficacy / model utility / seeds: settings):",
    ]
    if any(run.partial & {FE, MU} for trial in selection.trials for run in trial.runs):
        header.insert(-1, "# forget efficacy and model utility are partial aggregates (`*_partial`: null components "
                          "left out) in some or all runs.")
    for trial in selection.trials:
        mark = "  <- chosen" if trial is chosen else ""
        values = ", ".join(f"{path}={value}" for path, value in trial.settings.items()) or "(the only one)"
        header.append(f"#   {_number(trial.forget_efficacy)} / {_number(trial.model_utility)} / "
                      f"{len(trial.runs)}: {values}{mark}")
    body = OmegaConf.create({})
    for path, value in chosen.settings.items():
        OmegaConf.update(body, path, value, force_add=True)
    return "\n".join(header) + "\n" + (OmegaConf.to_yaml(body) if chosen.settings else "{}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="unierase-select", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="SWEEP", help="directories searched for runs")
    parser.add_argument("--reference", type=Path, required=True,
                        help="a run directory scoring the target on the same protocol (stage=eval)")
    parser.add_argument("--min-utility-ratio", type=float, default=0.9)
    parser.add_argument("--out", type=Path, required=True, help="where <method>.yaml goes (e.g. conf/tuned)")
    args = parser.parse_args(argv)
    if not ((args.reference / "metrics.json").is_file() and (args.reference / "config_resolved.yaml").is_file()):
        parser.error(f"--reference {args.reference} is not a run directory (metrics.json + config_resolved.yaml)")
    reference = load_run(args.reference)
    reference_utility = reference.values["model_utility"]
    if reference_utility is None:
        parser.error(f"{args.reference} has no model utility (cl.model_utility or its partial form)")
    runs = load_runs(args.paths)
    for run in runs:
        differences = protocol_differences(run, reference)
        if differences:
            parser.error(f"{run.path} was not scored on the reference's protocol ({args.reference}): "
                         + "; ".join(differences[:3]) + (" ..." if len(differences) > 3 else ""))
    selections = select(runs, reference_utility, args.min_utility_ratio)
    args.out.mkdir(parents=True, exist_ok=True)
    for selection in selections:
        text = tuned_yaml(selection, args.paths, args.reference, reference_utility, args.min_utility_ratio)
        atomic_write_text(args.out / f"{selection.method}.yaml", text)
        print(text)
