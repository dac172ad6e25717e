"""Config helpers every layer uses: a node checked against its dataclass, and one error for a name
that is not in a registry."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")
V = TypeVar("V")


class UnknownChoice(ValueError):
    """A config value that names something that does not exist (a method kind, a setting, a benchmark...)."""

    def __init__(self, what: str, name: Any, known: Iterable[str]):
        super().__init__(f"unknown {what} '{name}' (known: {' | '.join(known)})")


def choose(registry: Mapping[str, V], name: str, what: str) -> V:
    """`registry[name]`, or an UnknownChoice that lists the known names."""
    if name not in registry:
        raise UnknownChoice(what, name, registry)
    return registry[name]


def typed(node: DictConfig | Mapping[str, Any], schema: type[T]) -> T:
    """Validate a config node against a dataclass: unknown keys and wrong types fail here, early."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
