"""Config helpers every layer uses: a node checked against its dataclass, one error for a name that is not
in a registry, and the range checks each config dataclass runs in its `__post_init__`."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")
V = TypeVar("V")

SEED_MAX = 2**32 - 1  # Lightning's and numpy's seed range: [0, 2**32 - 1]


class UnknownChoice(ValueError):
    """A config value that names something that does not exist (a method kind, a setting, a benchmark...)."""

    def __init__(self, what: str, name: Any, known: Iterable[str]):
        super().__init__(f"unknown {what} '{name}' (known: {' | '.join(known)})")


class ConfigError(ValueError):
    """One config value the code does not accept; the message names the field ("target.epochs must be >= 1,
    got -1"). A dataclass names its own fields; `typed(node, schema, path)` adds the node's path."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field} {problem}" if field else problem)

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(_join(prefix, self.field), self.problem)


def choose(registry: Mapping[str, V], name: str, what: str) -> V:
    """`registry[name]`, or an UnknownChoice that lists the known names."""
    if name not in registry:
        raise UnknownChoice(what, name, registry)
    return registry[name]


def _join(prefix: str, key: str) -> str:
    if not prefix or not key:
        return prefix or key
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def _problem(err: OmegaConfBaseException) -> str:
    if isinstance(err, ConfigKeyError) and dataclasses.is_dataclass(err.object_type):
        known = ", ".join(f.name for f in dataclasses.fields(err.object_type))
        return f"is not a known key (known: {known})"
    return f"is invalid: {str(err).splitlines()[0]}"


def _failing_child(node: DictConfig) -> str:
    """The dotted path (from `node`) of the deepest nested dataclass whose `__post_init__` rejects its values."""
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            try:
                OmegaConf.to_object(child)
            except Exception:  # noqa: BLE001 - any rejection: look deeper
                return _join(str(key), _failing_child(child))
    return ""


def _missing(values: Any, key: str = "") -> str:
    """The first key (from the top of `values`) whose value is Hydra's mandatory-value marker `???`."""
    if values == "???":
        return key or "?"
    items = values.items() if isinstance(values, dict) else enumerate(values) if isinstance(values, list) else ()
    for child, value in items:
        found = _missing(value, _join(key, f"[{child}]" if isinstance(child, int) else str(child)))
        if found:
            return found
    return ""


def typed(node: DictConfig | Mapping[str, Any], schema: type[T], path: str = "") -> T:
    """Validate a config node against a dataclass: unknown keys, wrong types, missing (`???`) values and the
    dataclass's own range checks fail here, early, as one ConfigError that names the field under `path`."""
    if isinstance(node, DictConfig):
        missing = _missing(OmegaConf.to_container(node, resolve=False))
        if missing:
            raise ConfigError(_join(path, missing), "is required: set it on the command line (it is ??? here)")
        try:
            values = OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as err:  # an interpolation: its full key is already absolute
            raise ConfigError(err.full_key or path, _problem(err)) from None
    else:
        values = node
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as err:
        raise ConfigError(_join(path, err.full_key), _problem(err)) from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_join(path, err.full_key), _problem(err)) from None
    except ConfigError as err:
        raise err.under(_join(path, _failing_child(merged))) from None
    except (ValueError, TypeError) as err:  # a check that raised something else: still name the node
        raise ConfigError(_join(path, _failing_child(merged)) or schema.__name__, f"is invalid: {err}") from None


# Range checks -------------------------------------------------------------------------------------------


def _values(cfg: Any, name: str) -> Iterator[tuple[str, Any]]:
    """(field, value) of `cfg.name`, or of each element of a list field (`item_ids[2]`); None is skipped."""
    value = getattr(cfg, name)
    if isinstance(value, (list, tuple)):
        yield from ((f"{name}[{i}]", item) for i, item in enumerate(value))
    elif value is not None:
        yield name, value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check(
    cfg: Any,
    *,
    at_least: Mapping[str, float] | None = None,
    positive: Iterable[str] = (),
    between: Mapping[str, tuple[float, float]] | None = None,
    choices: Mapping[str, Iterable[Any]] | None = None,
    seeds: Iterable[str] = (),
    finite: Iterable[str] = (),
) -> None:
    """Raise a ConfigError naming the first field of `cfg` out of its range. None values pass (the schema
    says which fields may be null); a list field is checked element by element; numbers must be finite.

    at_least: field -> minimum (inclusive); positive: fields > 0; between: field -> (low, high), inclusive;
    choices: field -> allowed values; seeds: integer seeds in [0, 2**32 - 1]; finite: any finite number.
    """
    for name, low in (at_least or {}).items():
        for field, value in _values(cfg, name):
            if not (_is_number(value) and value >= low):
                raise ConfigError(field, f"must be >= {low}, got {value!r}")
    for name in positive:
        for field, value in _values(cfg, name):
            if not (_is_number(value) and value > 0):
                raise ConfigError(field, f"must be > 0, got {value!r}")
    for name, (low, high) in (between or {}).items():
        for field, value in _values(cfg, name):
            if not (_is_number(value) and low <= value <= high):
                raise ConfigError(field, f"must be in [{low}, {high}], got {value!r}")
    for name, allowed in (choices or {}).items():
        allowed = tuple(allowed)
        for field, value in _values(cfg, name):
            if value not in allowed:
                raise ConfigError(field, f"must be one of {' | '.join(map(str, allowed))}, got {value!r}")
    for name in finite:
        for field, value in _values(cfg, name):
            if not _is_number(value):
                raise ConfigError(field, f"must be a finite number, got {value!r}")
    for name in seeds:
        for field, value in _values(cfg, name):
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX):
                raise ConfigError(field, f"must be an integer seed in [0, {SEED_MAX}], got {value!r}")
