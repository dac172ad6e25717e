"""The data a method is scored on: TOFU, the real-world set, any forget set (custom) and the general-ability
sets."""
from __future__ import annotations

from omegaconf import DictConfig

from benchmarks.custom import CustomConfig, load_custom
from benchmarks.real_world import RealWorldConfig, load_real_world
from benchmarks.tofu import TofuConfig, load_tofu
from unierase.config import choose, typed
from unierase.records import Benchmark

BENCHMARKS = {"tofu": (TofuConfig, load_tofu), "real_world": (RealWorldConfig, load_real_world),
              "custom": (CustomConfig, load_custom)}


def load_benchmark(node: DictConfig) -> Benchmark:
    """The `benchmark` config node, checked against its benchmark's schema, loaded."""
    schema, loader = choose(BENCHMARKS, node.name, "benchmark")
    return loader(typed(node, schema, "benchmark"))
