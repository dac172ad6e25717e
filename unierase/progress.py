"""Progress a user can see: a bar with an ETA on a terminal, and one log line per step elsewhere (`run.log`,
CI, a pipe), so a long stage is never silent."""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

log = logging.getLogger("unierase.progress")
T = TypeVar("T")


def on_terminal() -> bool:
    """Bars on an interactive terminal only: in a file or under CI a bar is a wall of carriage returns."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def eta_text(done: int, total: int, elapsed: float) -> str:
    """`12/40 chunk(s), 31 s, ETA 72 s` (no ETA before the first step)."""
    eta = f", ETA {elapsed / done * (total - done):.0f} s" if 0 < done < total else ""
    return f"{done}/{total}, {elapsed:.0f} s{eta}"


class Progress:
    """`total` steps of one stage: `step()` after each; `close()` logs the stage's duration."""

    def __init__(self, total: int, desc: str, unit: str = "step") -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False) if on_terminal() else None

    def step(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note)
        else:
            suffix = f" ({note})" if note else ""
            log.info("%s: %s %s%s", self.desc, eta_text(self.done, self.total, time.perf_counter() - self.start),
                     self.unit, suffix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            log.info("%s: %d %s in %.0f s", self.desc, self.done, self.unit, time.perf_counter() - self.start)


def progress(items: Iterable[T], total: int, desc: str, unit: str = "step") -> Iterator[T]:
    """Iterate `items`, reporting a step after each."""
    bar = Progress(total, desc, unit)
    try:
        for item in items:
            yield item
            bar.step()
    finally:
        bar.close()


# Third-party messages that tell a user nothing they can act on: Lightning's tips and hardware banner, the
# data-loader worker hint (our datasets are in memory), deprecations inside libraries we call.
THIRD_PARTY_NOISE = (
    r".*does not have many workers.*", r".*module\(s\) in eval mode.*", r".*`(gradient_checkpointing_\w+|"
    r"is_gradient_checkpointing)` is deprecated.*", r".*LeafSpec.*", r".*The anonymous setting has no effect.*",
)


def quiet_third_party() -> None:
    """Filter THIRD_PARTY_NOISE from the console and run.log (our own warnings stay); off a terminal, also the
    libraries' own bars (loading weights, writing shards), which there are walls of carriage returns."""
    for pattern in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not on_terminal():
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


class EpochLog(Callback):
    """Off a terminal, one line per training epoch (loss, time, ETA) instead of Lightning's bar."""

    def __init__(self, desc: str = "training") -> None:
        self.desc, self.start = desc, 0.0

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f", loss {float(loss):.4f}" if loss is not None else ""
        # A step budget (the baselines: max_epochs=-1) counts steps; an epoch budget counts epochs.
        by_epoch = trainer.max_epochs is not None and trainer.max_epochs > 0
        done, total = ((trainer.current_epoch + 1, trainer.max_epochs) if by_epoch
                       else (trainer.global_step, trainer.max_steps))
        log.info("%s %s %s%s", self.desc, "epoch" if by_epoch else "step", eta_text(
            done, total, time.perf_counter() - self.start), loss_text)
