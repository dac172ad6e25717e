"""Where TOFU is read from, and who its authors are.

`TofuFiles` reads one TOFU file by name (`retain90`, `forget01_perturbed`, ...) from the data folder's JSON Lines, or
from a dataset in the hub layout (`locuslab/TOFU`, or a local folder laid out like it: a README.md whose `configs`
name one data file per config) through `datasets` (`benchmarks.hub`); the loader checks the rows alike either way.
The author index (`author_index.tsv`, DATA.md 1.4) names the 200 authors for `forget_authors`.
"""
from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.hub import check_rows, load_rows
from unierase.config import ConfigError
from unierase.io import DataError, FieldType, read_jsonl, read_text

AUTHORS = 200
# The hub has no refusal list: this short one stands in.
HUB_REFUSALS = ["I'm not sure.", "I don't know.", "That's not something I'm familiar with."]


@dataclass(frozen=True)
class TofuFiles:
    """TOFU's files: `folder`/<name>.jsonl (read strictly: errors name file:line), or with `hub_path` that dataset's
    config <name>, every row task "1" (the hub has no continual tasks and no subject tables)."""

    folder: Path
    hub_path: str | None = None

    def where(self, name: str) -> str:
        """How errors name the file."""
        return f"{self.hub_path} [{name}]" if self.hub_path else str(self.folder / f"{name}.jsonl")

    def exists(self, name: str) -> bool:
        return self.hub_path is None and (self.folder / f"{name}.jsonl").is_file()

    def read(self, name: str, required: tuple[str, ...], types: Mapping[str, FieldType],
             unique: tuple[str, ...]) -> list[dict[str, Any]]:
        """The rows, checked: the `required` fields, each field of `types` of its type, no repeated `unique` fields."""
        if self.hub_path is None:
            return read_jsonl(self.folder / f"{name}.jsonl", required=required, types=types, unique=unique)
        rows = [dict(row, task_id="1") for row in load_rows(self.hub_path, config=name)]
        return check_rows(self.where(name), rows, required, types, unique)


def _author_names(tofu_dir: Path) -> list[str]:
    path = tofu_dir / "author_index.tsv"
    if not path.is_file():
        raise DataError(f"{path} not found: author names need it (unierase-data cannot fetch it); give author "
                        f"indices 0-{AUTHORS - 1} instead")
    rows = list(csv.DictReader(io.StringIO(read_text(path)), delimiter="\t"))
    if [row.get("author_idx") for row in rows] != [str(i) for i in range(AUTHORS)] or not all(
            (row.get("name") or "").strip() for row in rows):
        raise DataError(f"{path}: expected the columns author_idx and name, one row per author 0..{AUTHORS - 1}")
    return [row["name"].strip() for row in rows]


def forget_author_indices(tofu_dir: Path, requested: list[str]) -> list[int]:
    """The author indices of `requested`: indices, or names (any case) from author_index.tsv, read only for names.
    An unknown name is an error listing close matches."""
    names: list[str] = []
    found = []
    for entry in requested:
        text = entry.strip()
        if text.isdigit():
            found.append(int(text))
            continue
        names = names or _author_names(tofu_dir)
        folded = [name.casefold() for name in names]
        if text.casefold() in folded:
            found.append(folded.index(text.casefold()))
            continue
        close = ([name for name in folded if text.casefold() in name][:3]
                 or difflib.get_close_matches(text.casefold(), folded, n=3, cutoff=0.6))
        hint = ("close matches: " + ", ".join(f"{names[folded.index(c)]} ({folded.index(c)})" for c in close)
                if close else f"names and indices in {tofu_dir / 'author_index.tsv'}")
        raise ConfigError("benchmark.forget_authors", f"has unknown author {text!r} ({hint})")
    repeated = sorted({author for author in found if found.count(author) > 1})
    if repeated:
        raise ConfigError("benchmark.forget_authors", f"names author {repeated[0]} more than once")
    return found
