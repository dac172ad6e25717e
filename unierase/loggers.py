"""Experiment loggers (the `logger` config group): csv, wandb (offline by default) or none.

Lightning training loops get these as Lightning loggers; run-level metrics go through `log_metrics`
so sequential rounds appear with the round as the step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf


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


def finish(loggers: list[Logger], summary: dict[str, Any]) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({k: v for k, v in summary.items() if v is not None})
        logger.finalize("success")
