"""Run records: the few small files of each run that the report and `unierase-select` read, copied out of
`outputs/` (which git ignores: models, logs, predictions) into a folder that can be committed.

A committed table made with `unierase-table ... --records` names its runs inside `<out>/runs/<name>/`, so anyone
can regenerate it byte for byte from the repository alone (`unierase-table <out>/runs/<name> --out <out> --name
<name>`; tests/test_committed_results.py does, for every committed table).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from unierase.io import atomic_dir
from unierase.report.runs import find_run_dirs

# What load_run reads (metrics, resolved config, per-round metrics, the launch directory in hydra.yaml), what
# unierase-select writes back (the command line in overrides.yaml), and the results key that lets a sweep restored
# from these records skip its finished jobs (run.reuse_finished), and the weights the job started from
# (run.write_starting_model); each is a few kB.
RECORD_FILES: tuple[str, ...] = ("metrics.json", "config_resolved.yaml", "rounds.json", "results_key",
                                 "starting_model.json", ".hydra/hydra.yaml", ".hydra/overrides.yaml")


def copy_records(paths: list[Path], dest: Path) -> None:
    """Replace `dest` with the record files of every run under `paths`, each root's runs under
    `dest/<root's folder name>/` at their paths relative to the root."""
    roots = [path.resolve() for path in paths]
    names = [root.name for root in roots]
    if len(set(names)) != len(names):
        raise SystemExit(f"unierase-table --records: two PATHs share a folder name ({', '.join(names)}); "
                         "their records would land in one folder")
    inside = [str(root) for root in roots if root == dest.resolve() or dest.resolve() in root.parents]
    if inside:
        raise SystemExit(f"unierase-table --records: {', '.join(inside)} is already inside {dest}; "
                         "regenerate from it without --records")
    runs = [(root, run_dir) for root in roots for run_dir in find_run_dirs([root])]
    if not runs:
        raise SystemExit(f"unierase-table --records: no run directories under {', '.join(map(str, paths))}")
    with atomic_dir(dest) as staging:
        for root, run_dir in runs:
            for name in RECORD_FILES:
                source = run_dir / name
                if source.is_file():
                    target = staging / root.name / run_dir.relative_to(root) / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target)
