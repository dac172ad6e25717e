"""One LightningModule for all fine-tuning baselines: L = forget_coeff·L_f + regularization_coeff·L_r."""
from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from baselines.losses import FORGET_TERMS, REGULARISERS, LossContext, LossTerm, objective


def _terms(forget: str, regulariser: str | None) -> list[LossTerm]:
    if forget not in FORGET_TERMS:
        raise ValueError(f"unknown forget term {forget!r}; choose from {sorted(FORGET_TERMS)}")
    if regulariser is not None and regulariser not in REGULARISERS:
        raise ValueError(f"unknown regulariser {regulariser!r}; choose from {sorted(REGULARISERS)}")
    return [FORGET_TERMS[forget]] + ([REGULARISERS[regulariser]] if regulariser is not None else [])


def required_parts(forget: str, regulariser: str | None) -> tuple[str, ...]:
    """Batch parts the policy must see (use as the dataset's ``parts``)."""
    return tuple(dict.fromkeys(p for t in _terms(forget, regulariser) for p in t.parts))


def needs_reference(forget: str, regulariser: str | None) -> bool:
    """Whether the caller must build a frozen reference model (NPO, DPO, KL)."""
    return any(t.needs_reference for t in _terms(forget, regulariser))


def linear_warmup_decay(warmup_steps: int, max_steps: int):
    """LR factor: linear 0→1 over warm-up, then linear to 0 at max_steps (HF ``linear`` schedule)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))
    return factor


class UnlearningModule(L.LightningModule):
    """Trains ``model`` on a composed baseline objective; ``ref_model`` is frozen and never updated.

    The reference is kept (as a submodule, so it follows the device) only when a term needs it.
    """

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, *, forget: str = "ga",
                 regulariser: str | None = None, forget_coeff: float = 1.0, regularization_coeff: float = 1.0,
                 beta: float = 0.1, simnpo_beta: float = 2.5, simnpo_delta: float = 0.0, lr: float = 1e-5,
                 weight_decay: float = 0.01, warmup_steps: int = 0, max_steps: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "ref_model"])
        terms = _terms(forget, regulariser)
        self.forget_term, self.regulariser = terms[0], (terms[1] if len(terms) > 1 else None)
        self.parts = required_parts(forget, regulariser)
        self.ref_parts = tuple(dict.fromkeys(p for t in terms for p in t.ref_parts))
        if self.ref_parts and ref_model is None:
            raise ValueError(f"{forget}+{regulariser} needs a reference model")
        self.model = model.train()  # from_pretrained returns eval mode; HF gradient checkpointing needs train
        self.ref_model = ref_model.eval().requires_grad_(False) if self.ref_parts else None

    def train(self, mode: bool = True) -> UnlearningModule:
        super().train(mode)
        if self.ref_model is not None:  # a .train() on the whole module must not reach the reference
            self.ref_model.eval()
        return self

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        def forward(net: nn.Module, part: str) -> Tensor:
            return net(input_ids=batch[part]["input_ids"], attention_mask=batch[part]["attention_mask"]).logits

        logits = {p: forward(self.model, p) for p in self.parts}
        with torch.no_grad():
            ref_logits = {p: forward(self.ref_model, p) for p in self.ref_parts}
        hp = self.hparams
        ctx = LossContext(logits, {p: batch[p]["labels"] for p in self.parts}, ref_logits,
                          beta=hp.beta, simnpo_beta=hp.simnpo_beta, simnpo_delta=hp.simnpo_delta)
        loss, loss_f, loss_r = objective(self.forget_term, self.regulariser, ctx,
                                         hp.forget_coeff, hp.regularization_coeff)
        self.log_dict({"train/loss": loss, "train/forget_loss": loss_f, "train/reg_loss": loss_r},
                      on_step=True, on_epoch=False, batch_size=batch[self.parts[0]]["input_ids"].size(0))
        return loss

    def configure_optimizers(self):
        # As HF Trainer: no weight decay on biases and norm weights (the 1-D parameters).
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, linear_warmup_decay(self.hparams.warmup_steps, self.hparams.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
