"""Progress a user can see (unierase/progress.py): off a terminal, one log line per step with an ETA."""
from __future__ import annotations

import logging
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from unierase.progress import EpochLog, Progress, eta_text, on_terminal, progress, quiet_third_party
from unierase.training import TrainerConfig, make_trainer


def test_eta_text_worked_example():
    assert eta_text(10, 40, 20.0) == "10/40, 20 s, ETA 60 s"  # 2 s per step, 30 steps left
    assert eta_text(0, 40, 0.0) == "0/40, 0 s"
    assert eta_text(40, 40, 80.0) == "40/40, 80 s"


def test_off_a_terminal_every_step_is_one_log_line(caplog):
    assert not on_terminal()  # pytest captures stderr
    with caplog.at_level(logging.INFO, logger="unierase.progress"):
        assert list(progress(range(3), 3, "scoring", "batch")) == [0, 1, 2]
        bar = Progress(2, "audit", "attack")
        bar.step(note="plain: forget ROUGE 0.100")
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == [f"scoring: {k}/3, 0 s{', ETA 0 s' if k < 3 else ''} batch" for k in (1, 2, 3)]
    assert lines[3].startswith("audit: 1/2") and lines[3].endswith("attack (plain: forget ROUGE 0.100)")


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_logs_a_line_per_epoch_off_a_terminal(caplog):
    trainer = make_trainer(TrainerConfig(), desc="token phase 1", max_epochs=3)  # each stage names itself
    assert not trainer.progress_bar_callback and any(isinstance(c, EpochLog) for c in trainer.callbacks)
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
    with caplog.at_level(logging.INFO, logger="unierase.progress"):
        trainer.fit(_Regression(), data)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("token phase 1 epoch")]
    assert [line.split(",")[0] for line in lines] == [f"token phase 1 epoch {k}/3" for k in (1, 2, 3)]
    assert all("loss" in line for line in lines)


def test_third_party_noise_is_filtered_and_our_warnings_stay():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("The train_dataloader does not have many workers.", UserWarning, stacklevel=1)
        warnings.warn("Found 137 module(s) in eval mode at the start of training.", UserWarning, stacklevel=1)
        warnings.warn("subject not found for 3 of 40 requests", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["subject not found for 3 of 40 requests"]
    # Off a terminal the libraries' own bars (loading weights, writing shards) are switched off too.
    import datasets
    import transformers

    assert not transformers.utils.logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled() is False
