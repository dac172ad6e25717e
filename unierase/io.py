"""Atomic writes, content hashes and strict JSON Lines reading.

Everything a run leaves on disk goes through here, so an interrupted run never leaves a
half-written file or directory behind.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order and process."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


TEMP_TAG = ".tmp-"


def _temp_prefix(target: Path) -> str:
    """Hidden sibling names that say who writes them (host, pid), so a later run can tell a dead writer's."""
    return f".{target.name}{TEMP_TAG}{socket.gethostname()}-{os.getpid()}-"


def _writer_is_dead(name: str, target: Path) -> bool:
    host_pid = name[len(f".{target.name}{TEMP_TAG}"):].rsplit("-", 2)
    if len(host_pid) != 3 or host_pid[0] != socket.gethostname() or not host_pid[1].isdigit():
        return False  # another machine's writer (a shared filesystem) or not ours: leave it
    try:
        os.kill(int(host_pid[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def remove_stale_temporaries(target: Path) -> None:
    """Remove hidden temporaries of `target` left by writers on this machine that were killed."""
    if not target.parent.is_dir():
        return
    for path in target.parent.glob(f".{glob.escape(target.name)}{TEMP_TAG}*"):
        if _writer_is_dead(path.name, target):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; it becomes `target` only if the block succeeds.

    Safe with concurrent writers of one target (parallel sweep jobs building the same cached model):
    each replaces the previous version whole, so `target` is always one complete version. Temporaries
    of killed writers are removed on the next write of the same target.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target)))
    try:
        yield tmp
        for _ in range(100):
            try:
                os.replace(tmp, target)  # atomic; refused while `target` is a non-empty directory
                return
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            # Move the previous version aside (a rename onto an empty directory), then retry.
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target) + "old-"))
            try:
                os.replace(target, old)
            except FileNotFoundError:
                pass  # another writer moved it first
            shutil.rmtree(old, ignore_errors=True)
        raise OSError(f"could not replace {target}: other writers kept replacing it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"data file not found: {path} (set UNIERASE_DATA or paths.data_dir)")


def _decode(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{number}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})") from None


def read_text(path: Path) -> str:
    """A whole UTF-8 text file; a byte that is not UTF-8 is a DataError naming the file and line."""
    _require_file(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        number = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{number}: not UTF-8 (byte {raw[err.start]:#04x})") from None


# A field's expected JSON type: `str` (non-empty), `list[str]` (a non-empty list of strings), or a tuple of types.
FieldType = Any


def _type_error(value: Any, expected: FieldType) -> str | None:
    """Why `value` is not of `expected` (None when it is)."""
    if expected == list[str]:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            return f"must be a non-empty list of non-empty strings, got {value!r:.80}"
        return None
    if not isinstance(value, expected) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        return f"must be a {names}, got {type(value).__name__} {value!r:.80}"
    if isinstance(value, str) and not value.strip():
        return "must be a non-empty string"
    return None


def read_jsonl(path: Path, required: tuple[str, ...] = (), types: Mapping[str, FieldType] | None = None,
               unique: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every line of a JSON Lines file, checked: each a JSON object in UTF-8 with the `required` fields, each
    field of `types` of its type (required ones always; optional ones when present and not null), and no two
    lines with the same `unique` fields. Any problem is a DataError naming file:line."""
    _require_file(path)
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, int] = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                row = json.loads(_decode(path, number, raw))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            missing = [key for key in required if key not in row]
            if missing:
                raise DataError(f"{path}:{number}: missing field(s) {missing}")
            for key, expected in (types or {}).items():
                if key in row and (key in required or row[key] is not None):
                    problem = _type_error(row[key], expected)
                    if problem:
                        raise DataError(f"{path}:{number}: field '{key}' {problem}")
            if unique:
                key = tuple(row.get(field) for field in unique)
                if not all(isinstance(value, (str, int, float, type(None))) for value in key):
                    key = tuple(json.dumps(value, sort_keys=True) for value in key)
                if key in seen:
                    raise DataError(f"{path}:{number}: duplicate of line {seen[key]} (same {' and '.join(unique)})")
                seen[key] = number
            rows.append(row)
    return rows


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped."""
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]
