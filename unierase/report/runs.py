"""Run directories and what the report reads from them: the Run record and the tables' columns.

A run directory is any directory holding both `metrics.json` and `config_resolved.yaml` (single runs
under `outputs/runs/`, sweep jobs under `outputs/multiruns/`). `load_run` reads one into a Run: its ID
columns, its metric values (METRIC_COLUMNS and every COLUMN_GROUPS column; flagging those taken from a
partial fallback), its rounds, and its settings (the flattened resolved config without the seed and IGNORED_KEYS).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import OmegaConf

from unierase.io import stable_hash

# Resolved-config keys (and everything under them) that cannot change a run's results, left out of its
# configuration: where the cache lives (entries are keyed by what produced them), logging and labels, the
# progress display, what a sweeper is told, and how the target is built (not part of its cache key: the
# same cached target either way), and whether finished results or unlearned models are reused (the same results
# either way, by their keys), whether the model is saved and the simulated failure of the resume test (as the
# results key: unierase.run.NOT_RESULT_SETTING_KEYS). Everything else counts, so an unknown key splits groups,
# never merges them.
IGNORED_KEYS: tuple[str, ...] = (
    "paths.cache_dir", "logger", "tags", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "optimized_metric", "objective_constraint", "target.build_in_subprocess", "target.gradient_checkpointing",
    "reuse_results", "setting.reuse_unlearned", "setting.save_model", "setting.fail_after_round",
)
# Folders whose relative paths resolve against the directory `unierase` was started from.
DATA_DIR_KEYS: tuple[str, ...] = ("paths.data_dir", "benchmark.data_dir", "method.edit.mom2_corpus")
DIFFERS_SHOWN = 3  # settings named in a label; the CSV's config_diff has them all


@dataclass(frozen=True)
class Column:
    key: str  # CSV header
    header: str  # Markdown header
    metric: str  # metrics.json key
    fallback: str | None = None  # used (and flagged partial) when `metric` is null
    decimals: int = 3


ID_COLUMNS: tuple[tuple[str, str], ...] = (
    ("method", "Method"), ("benchmark", "Benchmark"), ("split", "Split"),
    ("setting", "Setting"), ("model", "Model"), ("seed", "Seed"),
)
FAMILY: tuple[str, ...] = ("method", "benchmark", "split", "setting", "model")  # the ID columns but the seed
# The settings that define what a run was scored on: runs that differ in one of them are not comparable.
PROTOCOL_PREFIXES: tuple[str, ...] = ("benchmark.", "eval.", "target.")
METRIC_COLUMNS: tuple[Column, ...] = (
    Column("forget_efficacy", "Forget Efficacy", "cl.forget_efficacy", "cl.forget_efficacy_partial"),
    Column("model_utility", "Model Utility", "cl.model_utility", "cl.model_utility_partial"),
    Column("ou_forget_quality", "OU Forget Quality", "ou.forget_quality"),
    Column("ou_model_utility", "OU Model Utility", "ou.model_utility"),
    # Each general-ability accuracy with its standard error: CPU subsets are small (conf/eval/fast.yaml).
    *(column for bench, header in (("mmlu", "MMLU"), ("triviaqa", "TriviaQA"), ("gsm8k", "GSM8K"),
                                   ("humaneval", "HumanEval"))
      for column in (Column(bench, header, f"ut.{bench}.acc"),
                     Column(f"{bench}_stderr", f"{header} SE", f"ut.{bench}.acc_stderr"))),
    Column("edited_fraction", "Edited Fraction", "unierase.edited_fraction"),  # UniErase: the edited down_proj share
    Column("trained_fraction", "Trained Fraction", "baseline.trainable_fraction"),  # a baseline: 1, or LoRA's share
    Column("wall_time_s", "Wall Time (s)", "time.total_s", decimals=0),
    Column("peak_rss_gb", "Peak RSS (GB)", "memory.peak_rss_gb", decimals=1),
)
FE, MU = METRIC_COLUMNS[0].key, METRIC_COLUMNS[1].key


class ColumnGroup(NamedTuple):
    """Columns shown as a table of their own after the main one (METRIC_COLUMNS), when a run has a value."""
    title: str
    columns: tuple[Column, ...]
    notes: tuple[str, ...]  # printed under its Markdown table


# Each TOFU split's generation, probability and truth-ratio scores (unierase/evaluation/classic.py).
_SPLITS: tuple[tuple[str, str], ...] = (
    ("forget", "Forget"), ("retain", "Retain"), ("real_authors", "Real authors"), ("world_facts", "World facts"))
SPLIT_GROUP = ColumnGroup("Per split: ROUGE-L recall, answer probability, truth ratio", tuple(
    Column(f"{split}_{score}", f"{header} {score_header}", f"cl.{split}.{score}")
    for split, header in _SPLITS
    for score, score_header in (("rouge", "ROUGE"), ("prob", "Prob"), ("truth_ratio", "TR"))), (
    "Prob: the answer's probability; on real authors and world facts normalised over the answer and its perturbed "
    "options. TR: on forget 1 − mean min(R, 1/R) (lower = forgotten), elsewhere mean max(0, 1 − 1/R) (higher = "
    "kept), R the truth ratio (SPEC-metrics).",))


# The robustness audit's columns (unierase/evaluation/audit.py), in two groups.
def _audit(header: str, metric: str, decimals: int = 3) -> Column:
    # CSV key: the metrics.json key with dots as underscores (`audit_plain_suppressed_forget_rouge`).
    return Column(metric.replace(".", "_"), header, metric, decimals=decimals)


_PROMPT_ATTACKS: tuple[tuple[str, str, str], ...] = (  # metrics.json name, header, header with +S
    ("plain", "Plain", "Plain +S"), ("paraphrase", "Paraphrase", "Paraphrase +S"),
    ("raw_format", "Raw format", "Raw +S"), ("few_shot", "Few-shot", "Few-shot +S"),
    ("system_prompt", "System prompt", "System +S"), ("ignore_instruction", "Ignore instr.", "Ignore +S"))
SUPPRESSED_NOTE = "+S = the method's added tokens banned from decoding."
ATTACK_GROUP = ColumnGroup("Robustness: forget ROUGE-L recall under attack (lower = still forgotten)", (
    *(_audit(header, f"audit.{attack}.forget_rouge") for attack, header, _ in _PROMPT_ATTACKS),
    *(_audit(header, f"audit.{attack}_suppressed.forget_rouge") for attack, _, header in _PROMPT_ATTACKS),
    _audit("8-bit", "audit.quant8.forget_rouge"), _audit("4-bit", "audit.quant4.forget_rouge"),
    _audit("Relearn before", "audit.relearn.forget_rouge_before"),
    _audit("Relearn after", "audit.relearn.forget_rouge"),
    _audit("Base relearned", "audit.relearn.base_forget_rouge"),
    _audit("Worst", "audit.worst.forget_rouge"),
), (SUPPRESSED_NOTE,))
MEMBERSHIP_GROUP = ColumnGroup("Robustness: retain cost and membership inference", (
    _audit("Retain plain", "audit.plain.retain_rouge"), _audit("Retain +S", "audit.plain_suppressed.retain_rouge"),
    _audit("Retain 4-bit", "audit.quant4.retain_rouge"), _audit("Retain relearn", "audit.relearn.retain_rouge"),
    _audit("Loss AUC", "audit.mia.loss_auc"), _audit("zlib AUC", "audit.mia.zlib_auc"),
    _audit("Min-K AUC", "audit.mia.min_k_auc"), _audit("Min-K++ AUC", "audit.mia.min_k_pp_auc"),
    _audit("Privleak", "audit.mia.privleak", decimals=1),
    _audit("Banned tokens", "audit.suppression.banned_tokens", decimals=0),
), (SUPPRESSED_NOTE,
    "AUC: of telling holdout rows (authors the target never saw) from forget rows; 1 = the forget rows still look "
    "seen, 0.5 = indistinguishable.",
    "Privleak (open-unlearning): ((1 − AUC) − (1 − AUC_retain)) / (1 − AUC_retain) · 100, with AUC_retain the "
    "retain-reference model's Min-K AUC on the same rows; ≈ 0 is ideal."))
COLUMN_GROUPS: tuple[ColumnGroup, ...] = (SPLIT_GROUP, ATTACK_GROUP, MEMBERSHIP_GROUP)
GROUP_COLUMNS: tuple[Column, ...] = tuple(col for group in COLUMN_GROUPS for col in group.columns)


@dataclass
class Run:
    path: Path
    ids: dict[str, Any]  # the ID_COLUMNS values (None where the config lacks them)
    values: dict[str, float | None]  # METRIC_COLUMNS and GROUP_COLUMNS values by key
    partial: set[str] = field(default_factory=set)  # keys whose value came from the fallback
    rounds: list[dict[str, Any]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # dotted path -> value, without `seed` and IGNORED_KEYS
    config: str = ""  # short hash of the configuration: `settings` less those that follow the seed (group_runs)
    # What tells `config` from its family's other configurations: "path=value", or "path=path=value" for
    # settings that always agree there.
    differs: dict[str, Any] = field(default_factory=dict)
    # The model the run started from (its cache entry or path) and the sha256 of its weights (one file's, or a hash
    # of several files'); None where the run directory has no starting_model.json (runs from before it was written),
    # and the digest None where the model had no local files.
    starting_model: str | None = None
    starting_weights: str | None = None

    def family(self) -> tuple[Any, ...]:
        return tuple(self.ids[k] for k in FAMILY)

    def protocol(self) -> dict[str, Any]:
        """The settings that define what this run was scored on (PROTOCOL_PREFIXES)."""
        return {path: value for path, value in sorted(self.settings.items()) if path.startswith(PROTOCOL_PREFIXES)}

    def sort_key(self) -> tuple:
        return tuple(_none_last(v) for v in (self.ids["benchmark"], self.ids["setting"], self.ids["method"],
                                             self.ids["split"], self.ids["model"], _differs_text(self.differs),
                                             self.config, self.ids["seed"], str(self.path)))


def _none_last(value: Any) -> tuple[bool, Any]:
    # None sorts last without comparing None to str/int.
    return value is None, value if value is not None else ""


def any_value(runs: list[Run], columns: tuple[Column, ...]) -> bool:
    """Whether some run has a value in one of `columns`."""
    return any(run.values[col.key] is not None for run in runs for col in columns)


def _number(value: Any) -> float | None:
    """A finite number, or None (null, NaN, strings and booleans count as missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted path -> value; lists and empty dicts are values."""
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix.removesuffix("."): node}


def _value_text(value: Any) -> str:
    """Comparable text of a setting: tells 1 from "1" and works for lists."""
    return json.dumps(value, sort_keys=True, default=str)


def _differs_text(differs: dict[str, Any], width: int = 32) -> str:
    """`path=value` for the first DIFFERS_SHOWN settings; long values keep their end (a folder's last parts)."""
    shown = []
    for path, value in list(differs.items())[:DIFFERS_SHOWN]:
        text = value if isinstance(value, str) else _value_text(value)
        shown.append(f"{path}={text if len(text) <= width else '…' + text[1 - width:]}")
    more = len(differs) - DIFFERS_SHOWN
    return ", ".join(shown) + (f", +{more} more" if more > 0 else "")


def find_run_dirs(paths: list[Path]) -> list[Path]:
    found: set[Path] = set()
    for root in paths:
        if not root.is_dir():
            raise SystemExit(f"unierase-table: {root} is not a directory")
        for metrics in root.rglob("metrics.json"):  # includes root/metrics.json
            run_dir = metrics.parent
            # Hidden directories are atomic-write temporaries (unierase.io.atomic_dir): never finished runs.
            hidden = any(part.startswith(".") for part in run_dir.relative_to(root).parts)
            if not hidden and metrics.is_file() and (run_dir / "config_resolved.yaml").is_file():
                found.add(run_dir.resolve())
    return sorted(found)


def _launch_dir(run_dir: Path) -> Path | None:
    """The directory `unierase` was started from, as Hydra recorded it (None without `.hydra/hydra.yaml`)."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd")
    return Path(cwd) if cwd else None


def _settings(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The flattened config without the seed and IGNORED_KEYS; data folders absolute where the launch
    directory is known, so `../shared/data` started from two checkouts names two folders."""
    settings = {path: value for path, value in _flatten(cfg).items()
                if path != "seed" and not any(path == k or path.startswith(k + ".") for k in IGNORED_KEYS)}
    launch = _launch_dir(run_dir)
    for key in DATA_DIR_KEYS:
        value = settings.get(key)
        if launch is not None and isinstance(value, str) and not Path(value).is_absolute():
            settings[key] = os.path.normpath(launch / value)
    return settings


def evaluated_model_name(model_path: str) -> str:
    """A `stage=eval` run's row name: `eval:` and the model folder's name, less a cache hash (the cached
    `target-1f5cb0a071040d84` is `eval:target`)."""
    name = Path(model_path).name
    stem, _, suffix = name.rpartition("-")
    cache_hash = len(suffix) == 16 and all(c in "0123456789abcdef" for c in suffix)
    return f"eval:{stem if stem and cache_hash else name}"


def load_run(run_dir: Path) -> Run:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    if OmegaConf.select(cfg, "stage") == "eval":
        # The model was scored as given: the method group's defaults in its config did nothing, so they neither
        # name the row nor count it as UniErase or a baseline in the headline.
        cfg.method = {"name": evaluated_model_name(str(OmegaConf.select(cfg, "model.path")))}
    ids = {
        "method": OmegaConf.select(cfg, "method.name"),
        "benchmark": OmegaConf.select(cfg, "benchmark.name"),
        "split": OmegaConf.select(cfg, "benchmark.split"),
        "setting": OmegaConf.select(cfg, "setting.name"),
        "model": OmegaConf.select(cfg, "model.name"),
        "seed": OmegaConf.select(cfg, "seed"),
    }
    values: dict[str, float | None] = {}
    partial: set[str] = set()
    for col in METRIC_COLUMNS + GROUP_COLUMNS:
        value = _number(metrics.get(col.metric))
        if value is None and col.fallback:
            value = _number(metrics.get(col.fallback))
            if value is not None:
                partial.add(col.key)
        values[col.key] = value
    rounds_file = run_dir / "rounds.json"
    rounds = json.loads(rounds_file.read_text()) if rounds_file.is_file() else None
    started_from, weights = starting_model(run_dir)
    return Run(run_dir, ids, values, partial, rounds, _settings(OmegaConf.to_container(cfg), run_dir),
               starting_model=started_from, starting_weights=weights)


def starting_model(run_dir: Path) -> tuple[str | None, str | None]:
    """The identity and weights fingerprint in the run's starting_model.json (unierase.run.write_starting_model)."""
    record = run_dir / "starting_model.json"
    if not record.is_file():
        return None, None
    found = json.loads(record.read_text())
    digests = found["weights_sha256"]
    if not digests:
        return found["id"], None
    return found["id"], next(iter(digests.values())) if len(digests) == 1 else stable_hash(digests, 64)
