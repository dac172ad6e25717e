"""Lightning plumbing shared by every training loop: trainer construction and QA batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry
from torch.utils.data import DataLoader, Dataset

from unierase.chat import IGNORE_INDEX
from unierase.config import ConfigError, check
from unierase.progress import EpochLog, on_terminal

# Lightning's `precision` values (lightning.fabric.connector._PRECISION_INPUT, as strings).
PRECISIONS = ("64", "32", "16", "bf16", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true",
              "transformer-engine", "transformer-engine-float16")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "bf16-mixed"  # bf16 autocast on CPU and CUDA
    enable_progress_bar: bool = True
    log_every_n_steps: int = 1
    gradient_clip_val: float | None = None

    def __post_init__(self) -> None:
        check(self, at_least={"log_every_n_steps": 1}, positive=("gradient_clip_val",),
              choices={"accelerator": ("auto", "gpu", *AcceleratorRegistry.available_accelerators()),
                       "strategy": ("auto", *StrategyRegistry.available_strategies()), "precision": PRECISIONS})
        devices = self.devices
        if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
            devices = int(devices)
        valid = (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool)
                                       and (devices == -1 or devices >= 1))
                 or (isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices))
                 or (isinstance(devices, str) and all(p.strip().isdigit() for p in devices.split(","))))
        if not valid:
            raise ConfigError("devices", f"must be auto, -1 (all), a count >= 1, or a list of device indices, "
                              f"got {self.devices!r}")


class TensorDictDataset(Dataset):
    """A list of tensor dicts (one example each)."""

    def __init__(self, items: list[dict[str, torch.Tensor]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def make_trainer(cfg: TrainerConfig, loggers: list | bool = False, desc: str = "training",
                 **limits: Any) -> L.Trainer:
    """A Trainer that saves nothing by itself: runs write their own artifacts atomically. Its progress: the bar
    on a terminal, a line per epoch elsewhere, starting with `desc` (which stage is training)."""
    bar = cfg.enable_progress_bar and on_terminal()
    return L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
        precision=cfg.precision, logger=loggers, enable_checkpointing=False,
        enable_progress_bar=bar, callbacks=[] if bar or not cfg.enable_progress_bar else [EpochLog(desc)],
        enable_model_summary=False,
        log_every_n_steps=cfg.log_every_n_steps, gradient_clip_val=cfg.gradient_clip_val,
        num_sanity_val_steps=0, **limits,
    )


def fit(trainer: L.Trainer, module: L.LightningModule, batches: DataLoader) -> None:
    """`trainer.fit`, then the module back on the device it started on: Lightning's teardown moves it
    to the CPU, which on a GPU machine would leave every later stage (edit, evaluation) on the CPU.
    The last step's gradients are dropped: held, they cost a model's worth of memory in every later stage."""
    start = next(module.parameters()).device
    try:
        trainer.fit(module, batches)
    finally:
        module.zero_grad(set_to_none=True)
        module.to(start)


PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


def pad_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example (padding ids are masked out, so their value is moot)."""
    width = max(item["input_ids"].shape[0] for item in items)
    return {
        key: torch.stack([torch.nn.functional.pad(item[key], (0, width - item[key].shape[0]), value=PAD_VALUES[key])
                          for item in items])
        for key in items[0]
    }


def loader(items: list[dict[str, torch.Tensor]], batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDictDataset(items), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=pad_batch)
