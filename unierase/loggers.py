"""Experiment loggers (the `logger` config group): csv, wandb (offline by default) or none.

Lightning training loops get these as Lightning loggers; run-level metrics go through `log_metrics`
so sequential rounds appear with the round as the step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from unierase.io import read_jsonl


def make_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    name = cfg.logger.name
    if name == "none":
        return []
    if name == "csv":
        return [CSVLogger(save_dir=run_dir, name="csv", version="")]
    if name == "wandb":
        logger = WandbLogger(
            project=cfg.logger.project, group=cfg.logger.group, tags=list(cfg.logger.tags),
            save_dir=str(run_dir), mode=cfg.logger.mode, name=run_dir.name,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        return [logger]
    raise ValueError(f"unknown logger '{name}' (csv | wandb | none)")


def log_metrics(loggers: list[Logger], metrics: dict[str, Any], step: int | None = None) -> None:
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in loggers:
        logger.log_metrics(numeric, step=step)


def example_table(path: Path) -> Any:
    """A per-example JSONL file (generations, scores) as a W&B Table of its scalar columns."""
    import wandb

    rows = read_jsonl(path)
    columns = [k for k, v in rows[0].items() if v is None or isinstance(v, (str, int, float, bool))] if rows else []
    return wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])


def finish(loggers: list[Logger], summary: dict[str, Any], run_dir: Path | None = None) -> None:
    """Final metrics into each logger's summary; with W&B also every per-example JSONL of `run_dir` as a Table."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({k: v for k, v in summary.items() if v is not None})
            for path in sorted(run_dir.rglob("*.jsonl")) if run_dir is not None else []:
                logger.experiment.log({f"examples/{path.relative_to(run_dir).with_suffix('').as_posix()}":
                                       example_table(path)})
        logger.finalize("success")
