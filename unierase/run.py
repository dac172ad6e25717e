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

from unierase.context import RunContext, load_benchmark, typed
from unierase.io import atomic_write_json
from unierase.loggers import finish, make_loggers
from unierase.models import ModelConfig
from unierase.run_dir import write_run_header
from unierase.training import TrainerConfig

log = logging.getLogger(__name__)


def stage_finetune(ctx: RunContext) -> dict:
    base, tokenizer = ctx.load_base()
    benchmark = load_benchmark(ctx.cfg.benchmark)
    start = time.perf_counter()
    target, target_id = ctx.target(base, tokenizer, benchmark)
    reference = ctx.retain_reference(base, tokenizer, benchmark)
    return {"target": target_id, "retain_reference": reference is not None,
            "seconds": time.perf_counter() - start}


STAGES = {"finetune": stage_finetune}


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
    result = STAGES[cfg.stage](ctx)
    atomic_write_json(run_dir / "result.json", result)
    finish(ctx.loggers, result)
    return result


# An absolute path: the console script runs this module by import, where a relative one resolves to a package.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
