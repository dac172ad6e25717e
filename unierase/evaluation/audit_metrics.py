"""Pure functions for auditing an unlearned model: membership-inference scores on the forget and holdout
rows (loss, zlib, Min-K%, Min-K%++), their ROC AUC and open-unlearning's `privleak`, and round-to-nearest
weight quantization (a model that only looks unlearned in full precision can recover the forgotten
answers once quantized).

Score convention: higher = looks more like a NON-member (data the model has not seen)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

SIGMA_FLOOR = 1e-12

# ---------------------------------------------------------------- membership-inference scores


def _as_logprobs(logprobs: Sequence[float]) -> np.ndarray:
    lp = np.asarray(logprobs, dtype=float)
    if lp.ndim != 1 or lp.size == 0:
        raise ValueError("logprobs must be a non-empty 1-D sequence")
    return lp


def _mean_of_lowest(values: np.ndarray, k: float) -> float:
    """−mean of the max(1, floor(k·n)) lowest values: the tokens the model finds least likely carry the
    membership signal, the easy ones are predicted well whether the text was seen or not."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    m = max(1, math.floor(k * values.size))
    return float(-np.sort(values)[:m].mean())


def loss_score(logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood of the answer tokens."""
    return float(-_as_logprobs(logprobs).mean())


def zlib_score(logprobs: Sequence[float], text: str) -> float:
    """Loss divided by the zlib-compressed length (bytes) of the answer text: calibrates the loss by how
    predictable the text is in itself (open-unlearning's zlib attack)."""
    return loss_score(logprobs) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(logprobs: Sequence[float], k: float = 0.4) -> float:
    """Min-K%: −mean of the k·n lowest token log-probs."""
    return _mean_of_lowest(_as_logprobs(logprobs), k)


def min_k_plus_plus_score(
    logprobs: Sequence[float], mus: Sequence[float], sigmas: Sequence[float], k: float = 0.4
) -> float:
    """Min-K%++ (Zhang et al. 2024): each token's log-prob standardized by the mean and standard deviation
    of log p over the model's next-token distribution at that position (`next_token_moments`), then
    −mean of the k·n lowest."""
    lp = _as_logprobs(logprobs)
    mu = np.asarray(mus, dtype=float)
    sigma = np.asarray(sigmas, dtype=float)
    if mu.shape != lp.shape or sigma.shape != lp.shape:
        raise ValueError(f"{lp.size} logprobs but {mu.size} mus and {sigma.size} sigmas")
    # A one-hot next-token distribution has sigma = 0; the floor avoids dividing by zero.
    z = (lp - mu) / np.maximum(sigma, SIGMA_FLOOR)
    return _mean_of_lowest(z, k)


def next_token_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of log p(v) for v ~ p = softmax(logits) over the last dim: mu = E[log p], sigma =
    sqrt(Var[log p]). Computed in float32 (float64 if given)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    p = logp.exp()
    # A −inf logit has p = 0 and log p = −inf: 0 · inf would be nan, its term is 0.
    seen = p > 0
    mu = torch.where(seen, p * logp, 0.0).sum(dim=-1)
    var = torch.where(seen, p * (logp - mu.unsqueeze(-1)) ** 2, 0.0).sum(dim=-1)
    return mu, var.sqrt()


# ---------------------------------------------------------------- AUC and privleak


def auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC with holdout = positive class: P(holdout score > forget score) + 0.5·P(tie) over all pairs
    (Mann–Whitney U from midranks). → 1: the forget rows look seen; 0.5: indistinguishable."""
    f = np.asarray(forget_scores, dtype=float).ravel()
    h = np.asarray(holdout_scores, dtype=float).ravel()
    if f.size == 0 or h.size == 0:
        raise ValueError(f"both sides need scores, got {f.size} forget and {h.size} holdout")
    ranks = rankdata(np.concatenate([f, h]))  # ties get their average rank, which counts them 0.5
    u = ranks[f.size :].sum() - h.size * (h.size + 1) / 2
    return float(u / (f.size * h.size))


def privleak(auc_model: float, auc_reference: float) -> float:
    """open-unlearning's privleak: relative gap (%) of 1 − AUC between the model and the retain-reference
    model on the same rows; 0 = as private as retraining, negative = the forget set still looks seen."""
    if auc_reference == 1:
        raise ValueError("auc_reference == 1: privleak divides by 1 − auc_reference")
    return ((1 - auc_model) - (1 - auc_reference)) / (1 - auc_reference) * 100


# ---------------------------------------------------------------- round-to-nearest quantization


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric min–max round-to-nearest quantization (quantize then dequantize) per group of
    `group_size` consecutive elements of the last dimension; the last group is shorter when that
    dimension is not a multiple of `group_size`. Constant groups are returned unchanged."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be ≥ 1, got {group_size}")
    n = weight.shape[-1]
    w = weight.detach().to(torch.float32).reshape(-1, n)
    n_groups = -(-n // group_size)
    pad = n_groups * group_size - n
    if pad:
        # Repeating the last element leaves the short group's min and max as they are.
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    g = w.reshape(w.shape[0], n_groups, group_size)
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    nonconstant = scale > 0
    safe = torch.where(nonconstant, scale, torch.ones_like(scale))
    zero = torch.round(-lo / safe)
    q = torch.clamp(torch.round(g / safe) + zero, 0, levels)
    out = torch.where(nonconstant, (q - zero) * safe, g)
    return out.reshape(w.shape[0], -1)[:, :n].reshape(weight.shape).to(weight.dtype)


def quantize_linear_layers_(
    model: torch.nn.Module, bits: int, group_size: int, skip: Collection[str] = ("lm_head",)
) -> int:
    """In place, `quantize_rtn` the weight of every nn.Linear whose name's last component is not in
    `skip`; returns the number of weight elements quantized. Embeddings are not nn.Linear and stay."""
    done: set[int] = set()
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] in skip:
                continue
            # A weight shared by two layers is quantized (and counted) once.
            if id(module.weight) in done:
                continue
            done.add(id(module.weight))
            module.weight.copy_(quantize_rtn(module.weight, bits, group_size))
            count += module.weight.numel()
    return count
