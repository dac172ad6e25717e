"""Loss terms of the fine-tuning baselines (docs/algorithm.md, "The baselines"), pure torch.

A method is composed from one entry of ``FORGET_TERMS`` and an optional entry of
``REGULARISERS``.  Every term is a function of a :class:`LossContext` and declares the
batch parts it needs from the policy (``parts``) and from the frozen reference model
(``ref_parts``), so callers forward only what is used and build a reference model only
when some term needs one.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from unierase.chat import IGNORE_INDEX

PARTS = ("forget", "retain", "forget_idk", "retain_idk")


# ---------------------------------------------------------------- primitives
def _upcast(x: Tensor) -> Tensor:
    """At least float32: log-softmax over a large vocabulary is too coarse in bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _shifted_token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token NLL [B, T-1] with the causal shift; ignored positions are 0."""
    logits, labels = _upcast(logits[:, :-1]), labels[:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")


def sequence_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """NLL_sum per example [B] over the supervised positions (labels != -100)."""
    return _shifted_token_nll(logits, labels).sum(dim=1)


def sequence_nll_avg(logits: Tensor, labels: Tensor) -> Tensor:
    """NLL_avg per example [B] = NLL_sum / number of supervised positions."""
    return sequence_nll(logits, labels) / (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def token_mean_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean CE over all supervised positions of the batch (the HF causal-LM loss)."""
    return _shifted_token_nll(logits, labels).sum() / (labels[:, 1:] != IGNORE_INDEX).sum()


# ------------------------------------------------- formulas on given quantities
def npo_from_nll(nll: Tensor, ref_nll: Tensor, beta: float) -> Tensor:
    """−(2/β)·mean log σ(β·(NLL_θ − NLL_ref))."""
    return -(2.0 / beta) * F.logsigmoid(beta * (nll - ref_nll)).mean()


def dpo_from_logp(logp_c: Tensor, logp_a: Tensor, ref_logp_c: Tensor, ref_logp_a: Tensor, beta: float) -> Tensor:
    """−(2/β)·mean log σ(β·((ℓ_θ(c) − ℓ_θ(a)) − (ℓ_ref(c) − ℓ_ref(a)))); 2/β as in closer-look."""
    margin = (logp_c - logp_a) - (ref_logp_c - ref_logp_a)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def simnpo_from_nll(nll_avg: Tensor, beta: float, delta: float) -> Tensor:
    """−(2/β_s)·mean log σ(β_s·(NLL_avg − δ))."""
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_avg - delta)).mean()


def ap_from_nll(nll_refusal: Tensor, nll_answer: Tensor, beta: float) -> Tensor:
    """−(1/β)·mean log σ(β·(NLL_sum(c|r) − NLL_sum(b|r)))."""
    return -(1.0 / beta) * F.logsigmoid(beta * (nll_refusal - nll_answer)).mean()


def uniform_kl(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over supervised (shifted) positions of KL(U ‖ p_θ) = Σ_v (1/V)(log(1/V) − log(p_v + 1e-12))."""
    logits, mask = _upcast(logits[:, :-1]), labels[:, 1:] != IGNORE_INDEX
    log_p = torch.log(logits.softmax(dim=-1) + 1e-12)  # the +1e-12 follows closer-look
    kl = (-math.log(logits.size(-1)) - log_p).mean(dim=-1)  # Σ_v (1/V)(·) is a mean over v
    return kl[mask].sum() / mask.sum()


def reference_kl(ref_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(p_ref ‖ p_θ) averaged over all B·T positions, padding included (batchmean after flattening)."""
    vocab = logits.size(-1)
    log_p = F.log_softmax(_upcast(logits).reshape(-1, vocab), dim=-1)
    log_ref = F.log_softmax(_upcast(ref_logits).reshape(-1, vocab), dim=-1)
    return F.kl_div(log_p, log_ref, reduction="batchmean", log_target=True)


# ------------------------------------------------------------------- context
@dataclass
class LossContext:
    """Policy logits and labels per batch part, reference logits for the parts a term asked for."""

    logits: dict[str, Tensor]
    labels: dict[str, Tensor]
    ref_logits: dict[str, Tensor] = field(default_factory=dict)
    beta: float = 0.1
    simnpo_beta: float = 2.5
    simnpo_delta: float = 0.0

    def nll(self, part: str) -> Tensor:
        return sequence_nll(self.logits[part], self.labels[part])

    def ref_nll(self, part: str) -> Tensor:
        with torch.no_grad():
            return sequence_nll(self.ref_logits[part], self.labels[part])

    def ce(self, part: str) -> Tensor:
        return token_mean_ce(self.logits[part], self.labels[part])


@dataclass(frozen=True)
class LossTerm:
    """A named loss term: ``fn(ctx)`` reads ``parts`` of the policy and ``ref_parts`` of the reference."""

    name: str
    fn: Callable[[LossContext], Tensor]
    parts: tuple[str, ...]
    ref_parts: tuple[str, ...] = ()

    @property
    def needs_reference(self) -> bool:
        return bool(self.ref_parts)

    def __call__(self, ctx: LossContext) -> Tensor:
        return self.fn(ctx)


ForgetTerm = LossTerm
Regulariser = LossTerm


# -------------------------------------------------------------- forget terms
def ga(ctx: LossContext) -> Tensor:
    return -ctx.ce("forget")


def npo(ctx: LossContext) -> Tensor:
    return npo_from_nll(ctx.nll("forget"), ctx.ref_nll("forget"), ctx.beta)


def dpo(ctx: LossContext) -> Tensor:
    # ℓ = −NLL_sum; c = refusal (forget_idk), a = true answer (forget)
    return dpo_from_logp(-ctx.nll("forget_idk"), -ctx.nll("forget"),
                         -ctx.ref_nll("forget_idk"), -ctx.ref_nll("forget"), ctx.beta)


def me(ctx: LossContext) -> Tensor:
    return uniform_kl(ctx.logits["forget"], ctx.labels["forget"])


def idk(ctx: LossContext) -> Tensor:
    return ctx.ce("forget_idk")


def simnpo(ctx: LossContext) -> Tensor:
    nll_avg = sequence_nll_avg(ctx.logits["forget"], ctx.labels["forget"])
    return simnpo_from_nll(nll_avg, ctx.simnpo_beta, ctx.simnpo_delta)


# -------------------------------------------------------------- regularisers
def gd(ctx: LossContext) -> Tensor:
    return ctx.ce("retain")


def kl(ctx: LossContext) -> Tensor:
    return reference_kl(ctx.ref_logits["retain"], ctx.logits["retain"])


def ap(ctx: LossContext) -> Tensor:
    return ap_from_nll(ctx.nll("retain_idk"), ctx.nll("retain"), ctx.beta)


FORGET_TERMS: dict[str, ForgetTerm] = {t.name: t for t in (
    LossTerm("ga", ga, ("forget",)),
    LossTerm("npo", npo, ("forget",), ref_parts=("forget",)),
    LossTerm("dpo", dpo, ("forget", "forget_idk"), ref_parts=("forget", "forget_idk")),
    LossTerm("me", me, ("forget",)),
    LossTerm("idk", idk, ("forget_idk",)),
    LossTerm("simnpo", simnpo, ("forget",)),
)}

REGULARISERS: dict[str, Regulariser] = {t.name: t for t in (
    LossTerm("gd", gd, ("retain",)),
    LossTerm("kl", kl, ("retain",), ref_parts=("retain",)),
    LossTerm("ap", ap, ("retain", "retain_idk")),
)}


def objective(forget: ForgetTerm, regulariser: Regulariser | None, ctx: LossContext,
              forget_coeff: float = 1.0, regularization_coeff: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """L = forget_coeff·L_f + regularization_coeff·L_r; returns (L, L_f, L_r), L_r = 0 without a regulariser."""
    loss_f = forget(ctx)
    loss_r = regulariser(ctx) if regulariser is not None else torch.zeros_like(loss_f)
    return forget_coeff * loss_f + regularization_coeff * loss_r, loss_f, loss_r
