"""Every value a job uses, checked before any work starts: `run` calls `validate_job` before it writes
anything, so a bad input is one clear error (the field with its allowed values, or file:line), a non-zero
exit, and no run files, cache entries or models.

- the config: every node typed against its dataclass (`unierase.config.typed`: unknown keys, wrong types,
  `???` values) and each dataclass's own ranges and choices (its `__post_init__`), named by dotted path;
- the data: the benchmark loaded (its loader checks types, duplicates, split sizes and author blocks), the
  utility sets read when `ut` is evaluated, the UniErase corpus decoded;
- the config against the data and the model: row and round indices, the model's files and depth.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from baselines.method import RecipeConfig
from benchmarks import BENCHMARKS
from benchmarks.utility import load_utility
from unierase.config import SEED_MAX, ConfigError, UnknownChoice, typed
from unierase.edit.corpus import corpus_files
from unierase.evaluation.config import EvalConfig
from unierase.io import DataError, read_text
from unierase.models import ModelConfig, package_dir
from unierase.objective import ObjectiveConstraint
from unierase.records import Benchmark, UtilityItem
from unierase.registry import METHODS, STAGES
from unierase.settings import SettingConfig
from unierase.target import TargetConfig
from unierase.training import TrainerConfig

LOGGERS = ("csv", "none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "org/name" or a legacy bare "name"


class InvalidJob(ValueError):
    """A config value or data file the job cannot use, found before anything was written. The message is one
    line naming the field (with its allowed values) or the file and line."""


@dataclass
class CheckedJob:
    """The typed config nodes and the data a job was validated with."""

    stage: str
    model: ModelConfig
    benchmark_cfg: Any
    method: Any
    setting: SettingConfig
    eval: EvalConfig
    target: TargetConfig
    trainer: TrainerConfig
    objective_constraint: ObjectiveConstraint
    recipe: RecipeConfig | None = None
    benchmark: Benchmark | None = None
    utility: dict[str, list[UtilityItem]] = field(default_factory=dict)


def _choice(node: DictConfig, key: str, known: Any, path: str) -> Any:
    value = node.get(key)
    if value not in known:
        raise ConfigError(f"{path}.{key}", f"must be one of {' | '.join(known)}, got {value!r}")
    return value


def _top_level(cfg: DictConfig, stages: Any) -> str:
    stage = cfg.get("stage")
    if stage not in stages:
        raise ConfigError("stage", f"must be one of {' | '.join(stages)}, got {stage!r}")
    seed = cfg.get("seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX):
        raise ConfigError("seed", f"must be an integer seed in [0, {SEED_MAX}], got {seed!r}")
    metric = cfg.get("optimized_metric")
    if metric is not None and not (isinstance(metric, str) and metric.strip()):
        raise ConfigError("optimized_metric", f"must be null or a metrics.json key, got {metric!r}")
    tags = cfg.get("tags")
    if tags is not None and not (OmegaConf.is_list(tags) and all(isinstance(t, (str, int)) for t in tags)):
        raise ConfigError("tags", f"must be a list of strings, got {tags!r}")
    logger = _choice(cfg.logger, "name", LOGGERS, "logger")
    if logger == "wandb":
        _choice(cfg.logger, "mode", WANDB_MODES, "logger")
    for key in ("data_dir", "cache_dir"):
        value = cfg.paths.get(key)
        if not (isinstance(value, str) and value.strip()):
            raise ConfigError(f"paths.{key}", f"must be a directory path, got {value!r}")
    if Path(cfg.paths.cache_dir).exists() and not Path(cfg.paths.cache_dir).is_dir():
        raise ConfigError("paths.cache_dir", f"is a file, not a directory: {cfg.paths.cache_dir}")
    return stage


def validate_config(cfg: DictConfig) -> CheckedJob:
    """Type every node of the resolved config and check every value; a ConfigError names the first bad one."""
    stage = _top_level(cfg, STAGES)
    benchmark_schema = BENCHMARKS[_choice(cfg.benchmark, "name", BENCHMARKS, "benchmark")][0]
    method_schema = METHODS[_choice(cfg.method, "kind", METHODS, "method")][0]
    checked = CheckedJob(
        stage=stage,
        model=typed(cfg.model, ModelConfig, "model"),
        benchmark_cfg=typed(cfg.benchmark, benchmark_schema, "benchmark"),
        # before the method: a baseline's method.recipe is ${recipe}, and the error names what was set
        recipe=typed(cfg.recipe, RecipeConfig, "recipe") if cfg.get("recipe") is not None else None,
        method=typed(cfg.method, method_schema, "method"),
        setting=typed(cfg.setting, SettingConfig, "setting"),
        eval=typed(cfg.eval, EvalConfig, "eval"),
        target=typed(cfg.target, TargetConfig, "target"),
        trainer=typed(cfg.trainer, TrainerConfig, "trainer"),
        objective_constraint=typed(cfg.objective_constraint, ObjectiveConstraint, "objective_constraint"),
    )
    if stage == "eval" and not checked.model.path:
        raise ConfigError("model.path", "is required by stage=eval (a saved model directory or hub id)")
    if checked.setting.name == "sequential" and checked.setting.fail_after_round and checked.setting.rounds:
        if checked.setting.fail_after_round > checked.setting.rounds:
            raise ConfigError("setting.fail_after_round", f"must be <= setting.rounds={checked.setting.rounds}, "
                              f"got {checked.setting.fail_after_round}")
    return checked


# The model ----------------------------------------------------------------------------------------------


def _looks_local(path: str) -> bool:
    """A directory rather than a hub id: absolute, ./ ../ ~, more than one '/', not id-shaped, or existing."""
    return (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or not HUB_ID.match(path)
            or Path(path).expanduser().exists())


def _hub_offline() -> bool:
    return any(os.environ.get(flag, "").lower() in ("1", "true", "yes") for flag in ("HF_HUB_OFFLINE",
                                                                                       "TRANSFORMERS_OFFLINE"))


def _hub_config(path: str) -> Path | None:
    """The cached config.json of a hub model, without network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(path, "config.json")
    return Path(found) if isinstance(found, str) else None


def check_model(model: ModelConfig) -> int | None:
    """The model's files exist where the config says; returns its number of layers when it can be read
    without loading the model (None otherwise)."""
    if model.source == "hub":
        if not model.path:
            raise ConfigError("model.path", "is required by model.source=hub (a hub id or a local directory)")
        local = Path(model.path).expanduser()
        if _looks_local(model.path):
            if not local.is_dir():
                raise ConfigError("model.path", f"is not an existing directory: {model.path}")
            if not (local / "config.json").is_file():
                raise ConfigError("model.path", f"has no config.json (not a saved model directory): {model.path}")
            return _layers_from_json(local / "config.json")
        cached = _hub_config(model.path)
        if cached is None and _hub_offline():
            raise ConfigError("model.path", f"'{model.path}' is neither a local directory nor in the hub cache "
                              "(HF_HUB_OFFLINE is set)")
        return _layers_from_json(cached) if cached else None
    for key in ("package", "gguf_file"):
        if not getattr(model, key):
            raise ConfigError(f"model.{key}", f"is required by model.source={model.source}")
    try:
        gguf = package_dir(model.package) / model.gguf_file
    except FileNotFoundError:
        raise ConfigError("model.package", f"'{model.package}' is not an installed package") from None
    if not gguf.is_file():
        raise ConfigError("model.gguf_file", f"{model.gguf_file} is not in package '{model.package}' ({gguf})")
    if model.source == "tiny_random":
        return int(model.tiny.get("num_hidden_layers", 4))  # unierase.models._tiny_random's default
    return _layers_from_gguf(gguf)


def _layers_from_json(path: Path) -> int | None:
    try:
        config = json.loads(read_text(path))
    except (DataError, json.JSONDecodeError) as err:
        raise ConfigError("model.path", f"has an unreadable config.json: {err}") from None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    layers = config.get("num_hidden_layers")
    return layers if isinstance(layers, int) else None


def _layers_from_gguf(path: Path) -> int | None:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        count = reader.fields[f"{arch}.block_count"]
        return int(count.parts[count.data[0]][0])
    except Exception:  # noqa: BLE001 - the depth is a bonus check: unknown is fine
        return None


def _check_layers(method: Any, layers: int | None) -> None:
    """UniErase's edited and perturbed layers exist in the model (indices 0..layers-1)."""
    if layers is None or not hasattr(method, "edit"):
        return
    for name, values in (("method.edit.layers", method.edit.layers),
                         ("method.token.perturb.layers", method.token.perturb.layers or [])):
        for value in values:
            if value >= layers:
                raise ConfigError(name, f"has layer {value}, but the model has {layers} layers (0..{layers - 1})")


# The data -----------------------------------------------------------------------------------------------


def _check_against_data(checked: CheckedJob) -> None:
    benchmark, setting = checked.benchmark, checked.setting
    if setting.name == "precise":
        for i, item in enumerate(setting.item_ids):
            if item >= len(benchmark.forget):
                raise ConfigError(f"setting.item_ids[{i}]", f"must be < {len(benchmark.forget)} (the forget split's "
                                  f"rows), got {item}")
    if setting.name == "sequential":
        if not benchmark.rounds:
            raise ConfigError("setting.name", f"is sequential, but benchmark {benchmark.name} has no sequential "
                              "rounds here (hub TOFU and custom data define none)")
        if setting.rounds is not None and setting.rounds > len(benchmark.rounds):
            raise ConfigError("setting.rounds", f"must be <= {len(benchmark.rounds)} (the rounds of the "
                              f"benchmark's preset), got {setting.rounds}")
        if benchmark.target_train is not None:
            known = {(qa.question, qa.answer) for qa in benchmark.target_train}
            for number, round_ in enumerate(benchmark.rounds[: setting.rounds or None], start=1):
                if any((qa.question, qa.answer) not in known for qa in round_):
                    cfg = checked.benchmark_cfg
                    rounds = "null: all" if setting.rounds is None else setting.rounds
                    raise ConfigError("setting.rounds", f"(={rounds}) includes round {number}, whose QA pairs "
                                      f"the target never learned (benchmark.known_forget={cfg.known_forget}, "
                                      f"retain_authors={cfg.retain_authors}): use known_forget=forget10 for "
                                      "tofu_seq_10x40, retain_authors=null for tofu_seq_9x400, or fewer rounds")
    if checked.stage == "unlearn":
        _check_method_data(checked)
    for bench, items in checked.utility.items():
        if not items:
            fraction = getattr(checked.eval.utility, f"{bench}_fraction")
            raise ConfigError(f"eval.utility.{bench}_fraction", f"keeps no {bench} item at {fraction} (int(fraction "
                              f"x items) = 0): raise it or drop {bench} from eval.utility.benchmarks")


def _check_method_data(checked: CheckedJob) -> None:
    """What the method and the evaluation read exists in the benchmark (a custom one may lack a retain file)."""
    benchmark, method = checked.benchmark, checked.method
    retain = len(benchmark.retain_train)
    if hasattr(method, "forget_loss") and not retain:  # a baseline pairs every forget pair with a retain pair
        raise ConfigError("benchmark.retain_file", f"is required by method {method.name} (it trains on retain pairs "
                          f"too), but benchmark {benchmark.name} has none")
    if hasattr(method, "token"):
        if method.token.output_anchors > retain:
            raise ConfigError("method.token.output_anchors", f"must be <= {retain} (the benchmark's retain pairs, "
                              f"its anchors), got {method.token.output_anchors}")
        retain_kinds = [kind for kind in ("retain_keys", "retain_answer_keys") if kind in method.edit.protect]
        if retain_kinds and not benchmark.unscored_retain():
            raise ConfigError("method.edit.protect", f"lists {retain_kinds[0]}, but benchmark {benchmark.name} has no "
                              "retain pairs outside the evaluated splits (TOFU: benchmark.scored_retain_authors "
                              "below benchmark.retain_authors)")
        if method.token.train_on == "generic" and not benchmark.generic_questions:
            raise ConfigError("method.token.train_on", f"is generic, but benchmark {benchmark.name} has no generic "
                              "questions (custom: the retain and neighbour questions)")
    if benchmark.name == "custom" and "ou" in checked.eval.families and checked.target.build_retain_reference:
        raise ConfigError("eval.families", "includes ou, which is TOFU-only: for benchmark=custom it would only "
                          "build an unused retain-reference model; use eval.families=[cl,ut] (or "
                          "target.build_retain_reference=false)")


def _check_corpus(method: Any) -> None:
    """UniErase reads its statistics corpus after Stage A: every file is decoded now."""
    if not hasattr(method, "edit"):
        return
    for path in corpus_files(Path(method.edit.mom2_corpus)):
        read_text(path)


def validate_job(cfg: DictConfig) -> CheckedJob:
    """`validate_config`, then every data file the job reads and the model's files, checked against the config.
    Any problem is one InvalidJob; nothing is written."""
    try:
        checked = validate_config(cfg)
        layers = check_model(checked.model)
        _check_layers(checked.method, layers)
        checked.benchmark = BENCHMARKS[checked.benchmark_cfg.name][1](checked.benchmark_cfg)
        if checked.stage != "finetune" and "ut" in checked.eval.families:
            utility = checked.eval.utility
            checked.utility = load_utility(Path(cfg.paths.data_dir) / "utility", utility.benchmarks,
                                           utility.fractions(), checked.eval.seed)
        _check_against_data(checked)
        if checked.stage == "unlearn":
            _check_corpus(checked.method)
    except (ConfigError, DataError, UnknownChoice) as err:
        raise InvalidJob(str(err)) from err
    return checked
