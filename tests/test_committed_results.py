"""Every committed table in docs/results regenerates byte for byte from its committed run records."""
from __future__ import annotations

from pathlib import Path

import pytest

from unierase.report import write_report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
TABLES = sorted(path.stem for path in RESULTS.glob("*.md") if path.name != "README.md")


def test_every_committed_table_has_its_run_records():
    assert TABLES
    assert [name for name in TABLES if not (RESULTS / "runs" / name).is_dir()] == []


@pytest.mark.parametrize("name", TABLES)
def test_committed_table_regenerates_from_its_records(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the CSVs name run records relative to the repository root
    write_report([Path("docs/results/runs") / name], tmp_path, name)
    for file in (f"{name}.md", f"{name}.csv", f"{name}_rounds.csv"):  # the plots' bytes depend on matplotlib
        committed, regenerated = RESULTS / file, tmp_path / file
        assert committed.is_file() == regenerated.is_file(), file
        if committed.is_file():
            assert regenerated.read_text(encoding="utf-8") == committed.read_text(encoding="utf-8"), file


def test_tuned_configs_regenerate_from_the_validation_records(tmp_path, monkeypatch):
    """conf/tuned is `unierase-select` over the committed selection trials (docs/results/tofu_validation.*)."""
    from unierase.report.select import main as select

    monkeypatch.chdir(REPO)
    select(["docs/results/runs/tofu_validation/validation",
            "--reference", "docs/results/runs/tofu_validation/target_eval", "--out", str(tmp_path)])
    committed = sorted(path.name for path in (REPO / "conf" / "tuned").glob("*.yaml"))
    assert sorted(path.name for path in tmp_path.glob("*.yaml")) == committed
    for name in committed:
        assert (tmp_path / name).read_text(encoding="utf-8") == (REPO / "conf/tuned" / name).read_text(encoding="utf-8")
