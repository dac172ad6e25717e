"""`unierase`: the Hydra main. Composes the config, then runs one stage:

- finetune: build (or reuse) the target and retain-reference models;
- unlearn:  target -> setting(method) -> evaluation, written to the run directory;
- eval:     evaluate the model at `model.path`.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer, PreTrainedModel

from benchmarks.real_world import with_answers
from unierase.config import typed
from unierase.context import RunContext
from unierase.evaluation.aggregate import read_forget_truth_ratios
from unierase.evaluation.audit import AuditReferences, reference_audit, run_audit
from unierase.evaluation.knowledge import evaluate_knowledge
from unierase.evaluation.utility import evaluate_utility
from unierase.io import atomic_dir, atomic_write_json, atomic_write_text, file_digest, stable_hash
from unierase.loggers import finish, log_metrics, make_loggers
from unierase.models import base_identity, load_model
from unierase.objective import ObjectiveConstraint, objective_value
from unierase.progress import quiet_third_party
from unierase.records import Benchmark, EvalSplit
from unierase.references import regenerate_references
from unierase.registry import METHODS
from unierase.run_dir import peak_rss_gb, unique_dir, write_run_header
from unierase.settings import SETTINGS, Evaluator, forget_like
from unierase.target import Targets
from unierase.validate import CheckedJob, InvalidJob, validate_job

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One `unierase` invocation: the resolved config, what validation typed and loaded, the run context and
    the model builders."""

    cfg: DictConfig
    checked: CheckedJob
    ctx: RunContext
    targets: Targets

    def load_base(self) -> tuple[PreTrainedModel, Any]:
        return load_model(self.ctx.model_cfg, self.ctx.cache_dir, seed=self.ctx.seed)


def stage_finetune(job: Job) -> dict:
    base, tokenizer = job.load_base()
    start = time.perf_counter()
    _, target_id = job.targets.target(base, tokenizer, job.checked.benchmark)
    reference = job.targets.retain_reference(base, tokenizer, job.checked.benchmark)
    return {"target": target_id, "retain_reference": reference[1].name if reference else None,
            "seconds": time.perf_counter() - start}


STARTING_MODEL_FILE = "starting_model.json"  # in a run directory: the weights the job started from


def write_starting_model(run_dir: Path, identity: str, directory: Path | None) -> None:
    """Record the model a job started from: its identity and the sha256 of each of its safetensors files.

    Two builds of one cached target (same key, other machine or thread count) can differ in their weights; the
    digests let the report refuse to put rows started from two builds in one comparison. A model without local
    safetensors (a hub id, the base model) is named by its identity alone."""
    files = sorted(directory.glob("*.safetensors")) if directory is not None and directory.is_dir() else []
    atomic_write_json(run_dir / STARTING_MODEL_FILE,
                      {"id": identity, "weights_sha256": {file.name: file_digest(file) for file in files}})


def make_evaluator(job: Job, benchmark: Benchmark, retain_reference_tr: list[float] | None,
                   audit_references: AuditReferences | None = None) -> Evaluator:
    eval_cfg, utility_items = job.checked.eval, job.checked.utility

    def evaluate(model, tokenizer, forget_splits: dict[str, EvalSplit], out_dir: Path) -> dict:
        start = time.perf_counter()
        metrics: dict = {}
        if {"cl", "ou"} & set(eval_cfg.families):  # `eval.families=[ut]` scores general ability alone
            metrics = evaluate_knowledge(model, tokenizer, benchmark, eval_cfg, job.ctx.model_cfg, out_dir,
                                         retain_reference_tr, forget_splits)
        if utility_items:
            metrics |= evaluate_utility(model, tokenizer, utility_items, eval_cfg, job.ctx.model_cfg, out_dir,
                                        benchmark.refusals)
        if "audit" in eval_cfg.families:
            metrics |= run_audit(model, tokenizer, benchmark, forget_splits["forget"].rows, eval_cfg,
                                 job.ctx.model_cfg, job.ctx.trainer_cfg, out_dir,
                                 audit_references or AuditReferences())
        return metrics | {"time.eval_s": time.perf_counter() - start}

    return evaluate


def retain_reference_truth_ratios(job: Job, base, tokenizer, benchmark: Benchmark) -> list[float] | None:
    """Per-example forget truth ratios of the retain-reference model (for ou.forget_quality), cached."""
    built = job.targets.retain_reference(base, tokenizer, benchmark)
    if built is None:
        return None
    reference, path = built
    eval_cfg = replace(job.checked.eval, families=["ou"], generation=False)  # truth ratios need no generation
    # Keyed by what changes the values besides the model: the forget rows (a split name is not enough:
    # `benchmark.forget_authors` picks others), the rows scored and the NLL cut (a parity preset scores the full
    # split at 512 tokens, `fast` 50 rows at 200).
    cap = eval_cfg.row_cap(benchmark.name)
    forget = stable_hash([qa.uid for qa in benchmark.forget], 16)
    out_dir = (path / "forget_truth_ratios" / f"forget-{forget}" / f"rows-{cap or 'all'}_nll-{eval_cfg.nll_max_length}")
    if not (out_dir / "knowledge.forget_truth_ratios.json").is_file():
        evaluate_knowledge(reference, tokenizer, benchmark, eval_cfg, job.ctx.model_cfg, out_dir)
    return read_forget_truth_ratios(out_dir)


def audit_references(job: Job, base, target, tokenizer, benchmark: Benchmark) -> AuditReferences:
    """What the audit compares with (`AuditReferences`), computed before the method changes the target and
    cached under the target's identity, the audit config and the rows it scores."""
    cfg = job.checked.eval
    forget = benchmark.forget[: cfg.row_cap(benchmark.name)]
    rows = [qa.uid for qa in forget + benchmark.holdout] + [qa.uid for split in benchmark.eval_splits.values()
                                                            for qa in split]
    key = stable_hash({"target": job.ctx.model_id, "audit": asdict(cfg.audit), "rows": rows,
                       "nll_max_length": cfg.nll_max_length, "model": asdict(job.ctx.model_cfg),
                       "version": version("unierase")}, 16)
    directory = job.ctx.cache_dir / "audit" / f"references-{key}"
    vocabulary = set(tokenizer.get_vocab())
    if not (directory / "references.json").is_file():
        built = job.targets.retain_reference(base, tokenizer, benchmark) if benchmark.holdout else None
        with atomic_dir(directory) as tmp:
            found = reference_audit(target, base, built[0] if built else None, tokenizer, benchmark, forget, cfg,
                                    job.ctx.model_cfg, job.ctx.trainer_cfg, tmp)
            atomic_write_json(tmp / "references.json", found)
    else:
        log.info("audit references: cache hit %s", directory)
    found = json.loads((directory / "references.json").read_text())
    return AuditReferences(vocabulary=vocabulary, **found)


def model_references(job: Job, target, tokenizer, benchmark: Benchmark) -> Benchmark:
    """With `benchmark.regenerate_answers` (real-world), score against the target's own answers."""
    if not job.cfg.benchmark.get("regenerate_answers", False):
        return benchmark
    answers = regenerate_references(target, tokenizer, benchmark, job.ctx.model_id, job.ctx.model_cfg,
                                    job.cfg.benchmark.answer_max_new_tokens, job.ctx.cache_dir, job.ctx.run_dir)
    return with_answers(benchmark, answers)


def stage_unlearn(job: Job) -> dict:
    benchmark, setting = job.checked.benchmark, job.checked.setting
    method = METHODS[job.cfg.method.kind][1](job.checked.method)
    with_reference = "ou" in job.checked.eval.families and benchmark.name == "tofu"  # ou.* is TOFU-only
    job.targets.build_missing_in_children(benchmark, with_reference)
    base, tokenizer = job.load_base()
    target, job.ctx.model_id = job.targets.target(base, tokenizer, benchmark)
    write_starting_model(job.ctx.run_dir, job.ctx.model_id, job.targets.target_dir(benchmark))
    benchmark = model_references(job, target, tokenizer, benchmark)
    job.ctx.unlearned_key = unlearned_key(job.cfg, benchmark, job.ctx.model_id)
    retain_tr = retain_reference_truth_ratios(job, base, tokenizer, benchmark) if with_reference else None
    audit = audit_references(job, base, target, tokenizer, benchmark) if "audit" in job.checked.eval.families else None
    evaluate = make_evaluator(job, benchmark, retain_tr, audit)
    metrics = SETTINGS[setting.name](method, target, tokenizer, benchmark, job.ctx, evaluate, setting)
    log_metrics(job.ctx.loggers, metrics)
    return metrics


def stage_eval(job: Job) -> dict:
    base, tokenizer = job.load_base()
    evaluated = str(job.ctx.model_cfg.path)
    write_starting_model(job.ctx.run_dir, evaluated, Path(evaluated).expanduser())
    benchmark = job.checked.benchmark
    reference = job.checked.eval.audit.reference_tokenizer
    vocabulary = set(AutoTokenizer.from_pretrained(reference).get_vocab()) if reference else None
    evaluate = make_evaluator(job, benchmark, None, AuditReferences(vocabulary=vocabulary))
    metrics = evaluate(base, tokenizer, {"forget": forget_like(benchmark.forget)}, job.ctx.run_dir / "eval")
    log_metrics(job.ctx.loggers, metrics)
    return metrics


STAGE_FUNCTIONS = {"finetune": stage_finetune, "unlearn": stage_unlearn, "eval": stage_eval}
# Config nodes that never change a result: where files go and how progress is logged. The trainer's precision,
# clipping and devices do change one.
NOT_RESULT_KEYS = ("hydra", "paths", "logger", "tags", "reuse_results")
NOT_RESULT_TRAINER_KEYS = ("enable_progress_bar", "log_every_n_steps")
NOT_RESULT_SETTING_KEYS = ("fail_after_round", "reuse_unlearned", "save_model")


def results_key(cfg: DictConfig, benchmark: Benchmark | None, ignored_setting: tuple[str, ...] = ()) -> str:
    """Hash of what determines a job's results: the config minus what does not change them (and the setting's
    `ignored_setting` keys), every record of the benchmark (so another data folder is another job), and the
    code version."""
    relevant = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in NOT_RESULT_KEYS}
    ignored = (*NOT_RESULT_SETTING_KEYS, *ignored_setting)
    relevant["setting"] = {k: v for k, v in relevant["setting"].items() if k not in ignored}
    relevant["trainer"] = {k: v for k, v in relevant["trainer"].items() if k not in NOT_RESULT_TRAINER_KEYS}
    data = None if benchmark is None else stable_hash(asdict(benchmark), 32)
    return stable_hash({"config": relevant, "data": data, "version": version("unierase")})


def unlearned_key(cfg: DictConfig, benchmark: Benchmark, target_id: str) -> str:
    """Hash of what determines a batch job's unlearned model (`setting.reuse_unlearned`): the method, recipe,
    setting, trainer and seed, the target model's identity, every benchmark record a method may read (not the
    evaluation-only `eval_splits` and `holdout`) and the code version; not the evaluation config."""
    container = OmegaConf.to_container(cfg, resolve=True)
    setting = {k: v for k, v in container["setting"].items() if k not in NOT_RESULT_SETTING_KEYS}
    rows = {k: v for k, v in asdict(benchmark).items() if k not in ("eval_splits", "holdout")}
    trainer = {k: v for k, v in container["trainer"].items() if k not in NOT_RESULT_TRAINER_KEYS}
    return stable_hash({"method": container["method"], "recipe": container["recipe"], "setting": setting,
                        "trainer": trainer, "seed": cfg.seed, "target": target_id, "rows": stable_hash(rows, 32),
                        "version": version("unierase")})


# A finished job's files that a reusing job copies (not its model, its own header or its log).
REUSED_FILES = ("eval", "rounds.json", "precise.json", STARTING_MODEL_FILE)


def finished_record(cache_dir: Path, key: str) -> Path:
    """Where a finished unlearn job of results key `key` records its run directory."""
    return cache_dir / "results" / f"{key}.json"


RESULTS_KEY_FILE = "results_key"  # in a finished unlearn job's run directory: the key its metrics answer


def clear_results(run_dir: Path) -> None:
    """Remove an earlier job's results from a directory a job is about to run in (a sweep re-run with another grid
    numbers its jobs anew), so that while it runs, or if it fails, no table reads them as this job's. Per-example
    `eval/` files stay: a resumed sequential run keeps its earlier rounds' there, and a new job overwrites them."""
    for name in (RESULTS_KEY_FILE, "metrics.json", "rounds.json", "precise.json", STARTING_MODEL_FILE):
        (run_dir / name).unlink(missing_ok=True)


def holds_results(run_dir: Path, key: str) -> bool:
    """Whether `run_dir` holds the metrics of the job of results key `key`."""
    stored = run_dir / RESULTS_KEY_FILE
    return ((run_dir / "metrics.json").is_file() and stored.is_file() and stored.read_text().strip() == key)


def reuse_finished(cache_dir: Path, key: str, run_dir: Path) -> dict | None:
    """A finished job with the same results key: its result files copied into `run_dir` and its metrics
    (with `reused_from`); None when there is none, its run directory is gone, or the directory now holds another
    job's results (a sweep re-run with another grid numbers its job directories anew). A job that finished in
    `run_dir` itself is found there even without the cache's record: a sweep restored from committed run records
    (another machine, an emptied cache) resumes without rerunning it."""
    if holds_results(run_dir, key):
        log.info("job already finished in %s (results key %s)", run_dir, key)
        return json.loads((run_dir / "metrics.json").read_text())
    record = finished_record(cache_dir, key)
    if not record.is_file():
        return None
    source = Path(json.loads(record.read_text())["run_dir"])
    if not holds_results(source, key):
        return None
    metrics = json.loads((source / "metrics.json").read_text())
    log.info("reusing the finished job %s (same results key %s)", source, key)
    for name in REUSED_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, run_dir / name, dirs_exist_ok=True)
        elif (source / name).is_file():
            shutil.copy2(source / name, run_dir / name)
    return metrics | {"reused_from": str(source)}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    checked = validate_job(cfg)  # every value and data file, before anything is written (InvalidJob)
    stage = STAGE_FUNCTIONS[checked.stage]
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    write_run_header(run_dir, cfg)
    model_cfg, trainer_cfg = checked.model, checked.trainer
    unlearn = checked.stage == "unlearn"
    ctx = RunContext(run_dir=run_dir, cache_dir=Path(cfg.paths.cache_dir), model_cfg=model_cfg,
                     trainer_cfg=trainer_cfg, seed=int(cfg.seed),
                     results_key=results_key(cfg, checked.benchmark if unlearn else None),
                     # Round k's state does not depend on how many rounds were asked for: more rounds extend it.
                     sequential_key=results_key(cfg, checked.benchmark if unlearn else None, ("rounds",)),
                     loggers=make_loggers(cfg, run_dir))
    result = reuse_finished(ctx.cache_dir, ctx.results_key, run_dir) if unlearn and cfg.reuse_results else None
    if result is None:
        clear_results(run_dir)
        targets = Targets(checked.target, model_cfg, trainer_cfg, ctx.cache_dir, base_identity(model_cfg, ctx.seed),
                          ctx.seed)
        start = time.perf_counter()
        result = stage(Job(cfg, checked, ctx, targets))
        # The job's peak: this process's, or this process and a child building a model together.
        result |= {"time.total_s": time.perf_counter() - start,
                   "memory.peak_rss_gb": max(peak_rss_gb(), targets.build_peak_rss_gb),
                   "memory.build_peak_rss_gb": targets.build_peak_rss_gb}
    atomic_write_json(run_dir / "metrics.json", result)
    if unlearn:
        atomic_write_text(run_dir / RESULTS_KEY_FILE, ctx.results_key + "\n")
    if unlearn and "reused_from" not in result:
        atomic_write_json(finished_record(ctx.cache_dir, ctx.results_key), {"run_dir": str(run_dir.resolve())})
    finish(ctx.loggers, result, run_dir)
    return result


# An absolute path: the console script runs this module by import, where a relative one resolves to a package.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# use_cache: the created path travels with the config (pickled to launcher jobs), never re-resolved there
OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)  # conf/hydra/default.yaml


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; with `optimized_metric` set, return the objective to the sweeper (conf/hparams_search)."""
    quiet_third_party()
    try:
        metrics = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except InvalidJob as err:  # one line, exit status 1; the run directory holds only Hydra's own files
        raise SystemExit(f"error: {err}") from None
    if cfg.optimized_metric is None:
        return None
    return objective_value(metrics, cfg.optimized_metric, typed(cfg.objective_constraint, ObjectiveConstraint))


if __name__ == "__main__":
    main()
