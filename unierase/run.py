"""`unierase`: the Hydra main. Composes the config, then runs one stage:

- finetune: build (or reuse) the target and retain-reference models;
- unlearn:  target -> setting(method) -> evaluation, written to the run directory;
- eval:     evaluate the model at `model.path`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from baselines.method import BaselineConfig, FinetuneUnlearner
from unierase.records import QA, Benchmark
from benchmarks.real_world import with_answers
from unierase.context import RunContext, load_benchmark, typed
from unierase.evaluation.knowledge import EvalConfig, evaluate_knowledge, read_forget_truth_ratios
from unierase.evaluation.utility import evaluate_utility
from unierase.io import atomic_write_json
from unierase.loggers import finish, log_metrics, make_loggers
from unierase.method import Unlearner
from unierase.models import ModelConfig
from unierase.objective import ObjectiveConstraint, objective_value
from unierase.references import regenerate_references
from unierase.run_dir import peak_rss_gb, write_run_header
from unierase.settings import SETTINGS, Evaluator, SettingConfig
from unierase.training import TrainerConfig
from unierase.unierase import UniErase, UniEraseConfig

log = logging.getLogger(__name__)


def stage_finetune(ctx: RunContext) -> dict:
    base, tokenizer = ctx.load_base()
    benchmark = load_benchmark(ctx.cfg.benchmark)
    start = time.perf_counter()
    target, target_id = ctx.target(base, tokenizer, benchmark)
    reference = ctx.retain_reference(base, tokenizer, benchmark)
    return {"target": target_id, "retain_reference": reference[1].name if reference else None,
            "seconds": time.perf_counter() - start}


METHODS = {"unierase": (UniEraseConfig, UniErase), "finetune": (BaselineConfig, FinetuneUnlearner)}


def build_method(node: DictConfig) -> Unlearner:
    if node.get("kind") not in METHODS:
        raise ValueError(f"method '{node.get('name')}' has unknown kind '{node.get('kind')}' ({' | '.join(METHODS)})")
    schema, method = METHODS[node.kind]
    return method(typed(node, schema))


def make_evaluator(ctx: RunContext, benchmark: Benchmark, retain_reference_tr: list[float] | None) -> Evaluator:
    eval_cfg = typed(ctx.cfg.eval, EvalConfig)

    def evaluate(model, tokenizer, forget_splits: dict[str, list[QA]], out_dir: Path) -> dict:
        start = time.perf_counter()
        metrics = evaluate_knowledge(model, tokenizer, benchmark, eval_cfg, ctx.model_cfg, out_dir,
                                     retain_reference_tr, forget_splits)
        if "ut" in eval_cfg.families:
            metrics |= evaluate_utility(model, tokenizer, Path(ctx.cfg.paths.data_dir), eval_cfg, ctx.model_cfg,
                                        out_dir, benchmark.refusals)
        return metrics | {"time.eval_s": time.perf_counter() - start}

    return evaluate


def retain_reference_truth_ratios(ctx: RunContext, base, tokenizer, benchmark: Benchmark) -> list[float] | None:
    """Per-example forget truth ratios of the retain-reference model (for ou.forget_quality), cached."""
    built = ctx.retain_reference(base, tokenizer, benchmark)
    if built is None:
        return None
    reference, path = built
    eval_cfg = typed(ctx.cfg.eval, EvalConfig)
    eval_cfg.families, eval_cfg.generation = ["ou"], False  # truth ratios need no generation
    out_dir = path / "forget_truth_ratios" / ctx.cfg.benchmark.split
    if not (out_dir / "knowledge.forget_truth_ratios.json").is_file():
        evaluate_knowledge(reference, tokenizer, benchmark, eval_cfg, ctx.model_cfg, out_dir)
    return read_forget_truth_ratios(out_dir)


def model_references(ctx: RunContext, target, tokenizer, benchmark: Benchmark) -> Benchmark:
    """With `benchmark.regenerate_answers` (real-world), score against the target's own answers."""
    if not ctx.cfg.benchmark.get("regenerate_answers", False):
        return benchmark
    answers = regenerate_references(target, tokenizer, benchmark, ctx.model_id, ctx.model_cfg,
                                    ctx.cfg.benchmark.answer_max_new_tokens, ctx.cache_dir, ctx.run_dir)
    return with_answers(benchmark, answers)


def stage_unlearn(ctx: RunContext) -> dict:
    benchmark = load_benchmark(ctx.cfg.benchmark)
    ctx.build_in_children(benchmark, with_reference="ou" in ctx.cfg.eval.families)
    base, tokenizer = ctx.load_base()
    target, ctx.model_id = ctx.target(base, tokenizer, benchmark)
    benchmark = model_references(ctx, target, tokenizer, benchmark)
    retain_tr = retain_reference_truth_ratios(ctx, base, tokenizer, benchmark) if "ou" in ctx.cfg.eval.families else None
    setting = typed(ctx.cfg.setting, SettingConfig)
    if setting.name not in SETTINGS:
        raise ValueError(f"unknown setting '{setting.name}' ({' | '.join(SETTINGS)})")
    method = build_method(ctx.cfg.method)
    evaluate = make_evaluator(ctx, benchmark, retain_tr)
    metrics = SETTINGS[setting.name](method, target, tokenizer, benchmark, ctx, evaluate, setting)
    log_metrics(ctx.loggers, metrics)
    return metrics


def stage_eval(ctx: RunContext) -> dict:
    if not ctx.model_cfg.path:
        raise ValueError("stage=eval needs model.path=<a saved model directory or hub id>")
    base, tokenizer = ctx.load_base()
    benchmark = load_benchmark(ctx.cfg.benchmark)
    evaluate = make_evaluator(ctx, benchmark, None)
    metrics = evaluate(base, tokenizer, {"forget": benchmark.forget}, ctx.run_dir / "eval")
    log_metrics(ctx.loggers, metrics)
    return metrics


STAGES = {"finetune": stage_finetune, "unlearn": stage_unlearn, "eval": stage_eval}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage '{cfg.stage}' ({' | '.join(STAGES)})")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    write_run_header(run_dir, cfg)
    ctx = RunContext(
        cfg=cfg, run_dir=run_dir, cache_dir=Path(cfg.paths.cache_dir),
        model_cfg=typed(cfg.model, ModelConfig), trainer_cfg=typed(cfg.trainer, TrainerConfig),
        loggers=make_loggers(cfg, run_dir),
    )
    start = time.perf_counter()
    result = STAGES[cfg.stage](ctx)
    # The job's peak: this process's, or this process and a child building a model together.
    result |= {"time.total_s": time.perf_counter() - start,
               "memory.peak_rss_gb": max(peak_rss_gb(), ctx.build_peak_rss_gb),
               "memory.build_peak_rss_gb": ctx.build_peak_rss_gb}
    atomic_write_json(run_dir / "metrics.json", result)
    finish(ctx.loggers, result, run_dir)
    return result


# An absolute path: the console script runs this module by import, where a relative one resolves to a package.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; with `optimized_metric` set, return the objective to the sweeper (conf/hparams_search)."""
    constraint = typed(cfg.objective_constraint, ObjectiveConstraint)  # a bad constraint fails before the run
    metrics = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    if cfg.optimized_metric is None:
        return None
    return objective_value(metrics, cfg.optimized_metric, constraint)


if __name__ == "__main__":
    main()
