"""Runs grouped by configuration: the resolved config without the seed and without the keys that cannot
change results (IGNORED_KEYS). Each run gets its configuration's short hash and the settings that tell
it from the other configurations of the same method, benchmark, split, setting and model.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from unierase.io import stable_hash
from unierase.report.runs import Run, _value_text, find_run_dirs, load_run

UNSET = "(unset)"  # a setting one configuration has and another lacks


def seed_following(runs: list[Run]) -> set[str]:
    """Nested `seed` settings equal to the run's seed in every run that has them (`method.edit.seed: ${seed}`).

    Decided over all runs, not one at a time: `target.seed` is a literal 0 that a seed-0 run matches by
    chance; a seed-1 run with `target.seed` 0 shows it does not follow the seed, and it stays in the key."""
    nested = {path for run in runs for path in run.settings if path.rsplit(".", 1)[-1] == "seed"}
    return {path for path in nested
            if all(run.settings[path] == run.ids["seed"] for run in runs if path in run.settings)}


def group_runs(runs: list[Run]) -> None:
    """Set each run's `config` and `differs`. A hash names a configuration within this set of runs."""
    following = seed_following(runs)
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


def check_one_start(runs: list[Run]) -> None:
    """Refuse runs that started from one model (the same cache entry or path) holding different weights: two builds
    of one cached target can differ (thread count, machine), and rows started from each are not comparable. A
    different entry (another seed's tiny base, another target recipe) is another model by its config; runs that did
    not record their start are not checked."""
    starts: dict[str, dict[str, Path]] = defaultdict(dict)  # starting model -> its weights -> a run that had them
    for run in runs:
        if run.starting_model is not None and run.starting_weights is not None:
            starts[run.starting_model].setdefault(run.starting_weights, run.path)
    for model, found in starts.items():
        if len(found) > 1:
            listed = "; ".join(f"{weights[:12]} in {path}" for weights, path in sorted(found.items()))
            raise SystemExit(f"unierase-table: runs started from {model} with different weights ({listed}): a "
                             f"rebuilt model is another model; report each build's runs apart")


def load_runs(paths: list[Path]) -> list[Run]:
    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise SystemExit(f"unierase-table: no run directories (metrics.json + config_resolved.yaml) "
                         f"under {', '.join(map(str, paths))}")
    runs = [load_run(d) for d in run_dirs]
    check_one_start(runs)
    group_runs(runs)
    return sorted(runs, key=Run.sort_key)


def same_seed_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs that share configuration and seed (reruns, or the same command on an unchanged data folder):
    each list holds two or more, which nothing here averages."""
    by_seed: dict[tuple[str, Any], list[Run]] = defaultdict(list)
    for run in runs:
        by_seed[(run.config, run.ids["seed"])].append(run)
    return [members for members in by_seed.values() if len(members) > 1]
