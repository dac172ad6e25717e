"""The value a job returns to a Hydra sweeper (conf/hparams_search): one named metric, optionally
subject to a bound on another (`optimized_metric`, `objective_constraint` in conf/config.yaml)."""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unierase.config import ConfigError, check

log = logging.getLogger(__name__)


@dataclass
class ObjectiveConstraint:
    """Feasible when `min <= metrics[metric] <= max`; an infeasible job scores `penalty`."""

    metric: str | None = None  # a metrics.json key; None = unconstrained
    min: float | None = None
    max: float | None = None
    penalty: float = -1.0  # worse than any feasible objective (the sweeper's direction decides which way)

    def __post_init__(self) -> None:
        check(self, finite=("min", "max", "penalty"))
        bounded = self.min is not None or self.max is not None
        if self.metric is None and bounded:
            raise ConfigError("metric", "is null: the constraint sets min/max but no metric")
        if self.metric is not None and not bounded:
            raise ConfigError("metric", f"'{self.metric}' needs a min or a max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ConfigError("min", f"must be <= max: min={self.min} > max={self.max}")


def _value(metrics: Mapping[str, Any], name: str, role: str) -> float:
    value = metrics.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    available = ", ".join(sorted(k for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)))
    problem = "is not a metric of this run" if name not in metrics else f"has no numeric value in this run ({value!r})"
    raise ValueError(f"{role} '{name}' {problem}; metrics with a value: {available}")


def objective_value(metrics: Mapping[str, Any], metric: str,
                    constraint: ObjectiveConstraint | None = None) -> float:
    """`metrics[metric]`, or `constraint.penalty` when the constrained metric is out of bounds."""
    value = _value(metrics, metric, "optimized_metric")
    if constraint is None or constraint.metric is None:
        return value
    bound = _value(metrics, constraint.metric, "objective_constraint.metric")
    below = constraint.min is not None and bound < constraint.min
    above = constraint.max is not None and bound > constraint.max
    if below or above:
        log.warning("%s = %.4f is outside [%s, %s]: objective %s = %.4f scores the penalty %s",
                    constraint.metric, bound, constraint.min, constraint.max, metric, value, constraint.penalty)
        return constraint.penalty
    return value
