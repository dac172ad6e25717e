"""Rows through the Hugging Face `datasets` library: a JSON Lines / JSON, CSV or Parquet file (the builder chosen
by its suffix), a local dataset folder in the hub layout (a README.md whose `configs` name the data files), or a
hub id (needs network). The custom benchmark reads every file this way, TOFU its hub source (`source=hub`).

Datasets are streamed, so reading writes no Arrow cache. `check_rows` then checks every row as
`unierase.io.read_jsonl` checks a JSON Lines file (required fields, types, repeated rows); its errors name the
source and the row (1-based, in file order).
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unierase.io import DataError, FieldType, _type_error, read_text

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # org/name


def _is_hub_id(source: str) -> bool:
    """`org/name` that is no local path: a name with a data-file suffix is a missing file, not a dataset."""
    return bool(HUB_ID.match(source)) and Path(source).suffix.lower() not in BUILDERS and not source.startswith(".")


def _file_arguments(path: Path) -> dict[str, Any]:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown data file type '{path.suffix}' (known: {' | '.join(BUILDERS)}, or a "
                        "dataset folder)")
    arguments: dict[str, Any] = {"path": builder, "data_files": str(path), "split": "train"}
    if builder == "parquet":
        return arguments
    text = read_text(path)  # UTF-8, or an error naming the line (the library's names neither)
    if not text.strip():
        raise DataError(f"{path}: empty file")
    if builder == "csv":
        from datasets import Features, Value

        # Every cell as the text it holds ("1912" stays a string, "NA" is not a missing value); an empty cell is
        # a missing value.
        header = next(csv.reader(io.StringIO(text)))
        arguments |= {"features": Features({name: Value("string") for name in header}), "keep_default_na": False,
                      "na_values": [""]}
    return arguments


def _one_split(source: str, splits: Mapping[str, Any]) -> Any:
    if "train" in splits:
        return splits["train"]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise DataError(f"{source}: several splits ({', '.join(splits)}) and none is 'train'")


def load_rows(source: str, config: str | None = None, list_fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every row of `source`, unchecked: a data file, a dataset folder or a hub id (`config`: the dataset's config
    name). In a CSV file a `list_fields` cell holds a JSON list (`["a", "b"]`)."""
    from datasets import load_dataset  # a slow import: only the benchmarks that read this way pay it

    path = Path(source).expanduser()
    if path.is_file():
        arguments = _file_arguments(path)
    elif path.is_dir() or _is_hub_id(source):
        arguments = {"path": str(path) if path.is_dir() else source, "name": config}
    else:
        raise DataError(f"data file not found: {source}")
    try:
        dataset = load_dataset(**arguments, streaming=True)
        if "split" not in arguments:
            dataset = _one_split(source, dataset)
        rows = [dict(row) for row in dataset]
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - the library raises many types: one error naming the source
        problem = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"{source}: cannot be read ({type(err).__name__}: {problem})") from None
    if not rows:
        raise DataError(f"{source}: no rows")
    if arguments.get("path") == "csv":
        for number, row in enumerate(rows, start=1):
            for name in list_fields:
                row[name] = _json_list(source, number, name, row.get(name))
    return rows


def _json_list(source: str, number: int, name: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise DataError(f"{source}: row {number}: field '{name}' must be a JSON list in a CSV cell "
                        f"(e.g. [\"one\", \"two\"]), got {value!r:.80}") from None


def check_rows(source: str, rows: list[dict[str, Any]], required: tuple[str, ...] = (),
               types: Mapping[str, FieldType] | None = None, unique: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """`rows`, checked as `read_jsonl` checks a file: the `required` fields present (not null), each field of
    `types` of its type (optional ones when not null), no two rows with the same `unique` fields."""
    seen: dict[tuple, int] = {}
    for number, row in enumerate(rows, start=1):
        missing = [key for key in required if row.get(key) is None]
        if missing:
            raise DataError(f"{source}: row {number}: missing field(s) {missing}")
        for key, expected in (types or {}).items():
            if row.get(key) is not None:
                problem = _type_error(row[key], expected)
                if problem:
                    raise DataError(f"{source}: row {number}: field '{key}' {problem}")
        if unique:
            key = tuple(json.dumps(row.get(field), sort_keys=True) for field in unique)
            if key in seen:
                raise DataError(f"{source}: row {number}: duplicate of row {seen[key]} (same {' and '.join(unique)})")
            seen[key] = number
    return rows

