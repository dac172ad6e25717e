"""The three settings. They orchestrate requests and evaluations; the method is a black box.

- batch:      one request with the whole forget split;
- sequential: K rounds, each on top of the previous round's model; state is saved atomically after
              every round, so the same command resumes at the first unfinished round;
- precise:    one QA pair per request, each unlearned from the same starting model.

Each setting declares the role of every split it asks to evaluate (`SplitRole`); the benchmark's own
evaluation splits are always utility.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from unierase.config import ConfigError, check
from unierase.context import RunContext
from unierase.io import atomic_dir, atomic_write_json
from unierase.loggers import log_metrics
from unierase.method import Unlearner
from unierase.models import copy_model, load_saved, load_tokenizer, save_model
from unierase.records import QA, Benchmark, EvalSplit, SplitRole

log = logging.getLogger(__name__)

# evaluate(model, tokenizer, forget_splits, out_dir) -> metrics; forget_splits: name -> rows and role
Evaluator = Callable[[PreTrainedModel, Any, dict[str, EvalSplit], Path], dict[str, Any]]


def forget_like(rows: list[QA]) -> EvalSplit:
    """A split scored with the forget forms and kept out of model utility: the request itself, what earlier
    rounds forgot, or the request's siblings."""
    return EvalSplit(SplitRole.FORGET, rows)


@dataclass
class SettingConfig:
    name: str = "batch"
    rounds: int | None = None  # sequential: run the first n rounds (None = all)
    item_ids: list[int] = field(default_factory=lambda: [1])  # precise: forget-split row indices
    fail_after_round: int | None = None  # sequential: raise after this round (tests resumability)
    # sequential: evaluate the model before the first request as round 0 (the target; for UniErase with its token
    # added), on round 1's request, so every per-round curve starts from where it began.
    evaluate_start: bool = True
    # batch: keep the unlearned model in the cache, keyed by everything but the evaluation config, and reuse it;
    # re-scoring a sweep with another `eval` then costs no training. Off by default: the key holds the package
    # version, not uncommitted code edits.
    reuse_unlearned: bool = False
    # batch, sequential: write the unlearned model to <run dir>/model (625 MB for SmolLM2-135M). A selection
    # sweep that only reads the metrics turns it off; results do not depend on it.
    save_model: bool = True

    def __post_init__(self) -> None:
        # Bounds that need the benchmark (item_ids < forget rows, rounds <= its rounds): unierase/validate.py.
        check(self, choices={"name": SETTINGS}, at_least={"rounds": 1, "item_ids": 0, "fail_after_round": 1})
        if not self.item_ids:
            raise ConfigError("item_ids", "must list at least one forget-split row")
        repeated = sorted({i for i in self.item_ids if self.item_ids.count(i) > 1})
        if repeated:
            raise ConfigError("item_ids", f"lists row(s) {repeated} more than once")


def _unlearned_dir(ctx: RunContext) -> Path:
    return ctx.cache_dir / "unlearned" / ctx.unlearned_key


def run_batch(method: Unlearner, model: PreTrainedModel, tokenizer: Any, benchmark: Benchmark,
              ctx: RunContext, evaluate: Evaluator, cfg: SettingConfig) -> dict[str, Any]:
    cached = _unlearned_dir(ctx)
    if cfg.reuse_unlearned and (cached / "unlearn.json").is_file():
        model, tokenizer = load_saved(cached / "model", like=model), load_tokenizer(cached / "model")
        metrics = json.loads((cached / "unlearn.json").read_text()) | {"reused_unlearned": str(cached)}
        log.info("reusing the unlearned model in %s", cached)
    else:
        start = time.perf_counter()
        model = method.prepare(model, tokenizer, benchmark.forget, benchmark, ctx)
        model = method.unlearn(model, tokenizer, benchmark.forget, benchmark, ctx)
        metrics = {"time.unlearn_s": time.perf_counter() - start, **method.metrics(model)}
        if cfg.reuse_unlearned:
            with atomic_dir(cached) as tmp:
                save_model(model, tokenizer, tmp / "model")
                atomic_write_json(tmp / "unlearn.json", metrics)
    if cfg.save_model:  # before evaluation, so a failing evaluation never loses it (`stage=eval` on it finishes)
        save_model(model, tokenizer, ctx.run_dir / "model")
    metrics.update(evaluate(model, tokenizer, {"forget": forget_like(benchmark.forget)}, ctx.run_dir / "eval"))
    return metrics


def _state_dir(ctx: RunContext) -> Path:
    """Keyed by what determines the results (config but the number of rounds, data, code version; not the
    timestamped run directory), so a rerun of the same job, or one asking for more rounds, finds it and any
    other job does not."""
    if not ctx.sequential_key:
        raise ValueError("RunContext.sequential_key is empty: the sequential state needs its own key")
    return ctx.cache_dir / "sequential" / ctx.sequential_key


def run_sequential(method: Unlearner, model: PreTrainedModel, tokenizer: Any, benchmark: Benchmark,
                   ctx: RunContext, evaluate: Evaluator, cfg: SettingConfig) -> dict[str, Any]:
    rounds = benchmark.rounds[: cfg.rounds] if cfg.rounds else benchmark.rounds
    if not rounds:
        raise ValueError(f"benchmark {benchmark.name} defines no sequential rounds")
    state = _state_dir(ctx)
    history: list[dict[str, Any]] = []
    all_questions = [qa for round_ in rounds for qa in round_]
    model = method.prepare(model, tokenizer, all_questions, benchmark, ctx)
    if (state / "progress.json").is_file():
        history = json.loads((state / "progress.json").read_text())["history"]
        model = method.load_state(state / "method", model, tokenizer)
        log.info("resuming sequential run from %s after round %d", state, history[-1]["round"])
        if history[-1]["round"] > len(rounds):
            log.warning("the saved state has %d rounds, more than the %d asked for: reporting all of them",
                        history[-1]["round"], len(rounds))
    elif cfg.evaluate_start:  # kept in memory and saved with round 1: there is no method state to save before it
        start = evaluate(model, tokenizer, {"forget": forget_like(rounds[0])}, ctx.run_dir / "eval" / "round_00")
        history.append({"round": 0, **start})
        log_metrics(ctx.loggers, history[0], step=0)
    for number in range(history[-1]["round"] + 1 if history else 1, len(rounds) + 1):
        start = time.perf_counter()
        model = method.unlearn(model, tokenizer, rounds[number - 1], benchmark, ctx)
        seconds = time.perf_counter() - start
        forgotten = [qa for round_ in rounds[:number] for qa in round_]
        metrics = {"round": number, "time.unlearn_s": seconds, **method.metrics(model)}
        # `forgotten` (every round so far) is forget-like: it must stay forgotten, so it is no utility input.
        splits = {"forget": forget_like(rounds[number - 1]), "forgotten": forget_like(forgotten)}
        metrics.update(evaluate(model, tokenizer, splits, ctx.run_dir / "eval" / f"round_{number:02d}"))
        history.append(metrics)
        log.info("round %d/%d: forget ROUGE %s, retain ROUGE %s, %.0f s", number, len(rounds),
                 metrics.get("cl.forget.rouge"), metrics.get("cl.retain.rouge"), time.perf_counter() - start)
        log_metrics(ctx.loggers, metrics, step=number)
        with atomic_dir(state) as tmp:
            method.save_state(tmp / "method", model, tokenizer)
            atomic_write_json(tmp / "progress.json", {"history": history})
        if cfg.fail_after_round == number:
            raise RuntimeError(f"setting.fail_after_round={number}: simulated failure")
    atomic_write_json(ctx.run_dir / "rounds.json", history)
    if cfg.save_model:
        save_model(model, tokenizer, ctx.run_dir / "model")
    return {**history[-1], "rounds": history[-1]["round"]}


def siblings(benchmark: Benchmark, item: QA) -> list[QA]:
    """The same author's (person's) other QA pairs: what precise unlearning must leave intact."""
    return [qa for qa in benchmark.forget if qa.group == item.group and qa.uid != item.uid]


def run_precise(method: Unlearner, model: PreTrainedModel, tokenizer: Any, benchmark: Benchmark,
                ctx: RunContext, evaluate: Evaluator, cfg: SettingConfig) -> dict[str, Any]:
    items = [benchmark.forget[i] for i in cfg.item_ids]
    start_model = method.prepare(model, tokenizer, items, benchmark, ctx)
    # Siblings are rows of the forget split (same author): forget-like, compared with their own start values
    # (`siblings.*_vs_start`) rather than averaged into model utility.
    start_splits = {"forget": forget_like(items)} | {f"siblings_{i}": forget_like(siblings(benchmark, qa))
                                                     for i, qa in zip(cfg.item_ids, items)}
    target_scores = evaluate(start_model, tokenizer, start_splits, ctx.run_dir / "eval" / "start")
    per_item = []
    for index, item in zip(cfg.item_ids, items):
        edited = method.unlearn(copy_model(start_model), tokenizer, [item], benchmark, ctx)
        scores = evaluate(edited, tokenizer,
                          {"forget": forget_like([item]), "siblings": forget_like(siblings(benchmark, item))},
                          ctx.run_dir / "eval" / f"item_{index}")
        scores["siblings.rouge_vs_start"] = _ratio(scores.get("cl.siblings.rouge"),
                                                   target_scores.get(f"cl.siblings_{index}.rouge"))
        scores["siblings.prob_vs_start"] = _ratio(scores.get("cl.siblings.prob"),
                                                  target_scores.get(f"cl.siblings_{index}.prob"))
        per_item.append({"item": index, "uid": item.uid, **scores})
    atomic_write_json(ctx.run_dir / "precise.json", per_item)
    numeric = [k for k, v in per_item[0].items() if isinstance(v, (int, float)) and k != "item"]
    return {f"mean.{k}": sum(row[k] for row in per_item if row[k] is not None) / len(per_item) for k in numeric
            if all(row[k] is not None for row in per_item)} | {"items": len(per_item)}


def _ratio(value: float | None, reference: float | None) -> float | None:
    """How much of the starting model's score survives (1.0 = untouched)."""
    if value is None or not reference:
        return None
    return value / reference


SETTINGS = {"batch": run_batch, "sequential": run_sequential, "precise": run_precise}
