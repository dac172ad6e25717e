"""Worked examples of the audit metrics (unierase/evaluation/audit_metrics.py): membership-inference scores,
AUC, privleak, and round-to-nearest weight quantization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unierase.evaluation import audit_metrics as am

# ---------------------------------------------------------------- membership-inference scores


def test_loss_score():
    assert am.loss_score([-0.5, -1.0, -1.5]) == pytest.approx(1.0)


def test_zlib_score_divides_by_compressed_bytes():
    # zlib.compress(b"Paris") is 13 bytes; "Zürich" is 7 bytes in UTF-8 and compresses to 15.
    assert am.zlib_score([-0.5, -1.5], "Paris") == pytest.approx(1.0 / 13)
    assert am.zlib_score([-3.0], "Zürich") == pytest.approx(3.0 / 15)


def test_min_k_score_worked_example():
    # n = 5, k = 0.4 → floor(2.0) = 2 lowest: −3.0, −2.0 → 2.5
    assert am.min_k_score([-0.1, -2.0, -0.5, -3.0, -0.2], k=0.4) == pytest.approx(2.5)
    # floor(0.4 · 2) = 0 → at least one token is kept
    assert am.min_k_score([-0.1, -2.0], k=0.4) == pytest.approx(2.0)
    assert am.min_k_score([-0.1, -2.0], k=1.0) == pytest.approx(1.05)


def test_min_k_plus_plus_worked_example():
    logprobs = [-1.0, -2.0, -0.5, -3.0]
    mus = [-1.5, -1.0, -0.5, -1.0]
    sigmas = [0.5, 2.0, 0.25, 1.0]
    # z = [(−1 + 1.5)/0.5, (−2 + 1)/2, 0/0.25, (−3 + 1)/1] = [1.0, −0.5, 0.0, −2.0]
    # k = 0.5 → 2 lowest: −2.0, −0.5 → 1.25
    assert am.min_k_plus_plus_score(logprobs, mus, sigmas, k=0.5) == pytest.approx(1.25)
    # k = 0.4 → floor(1.6) = 1 → only −2.0
    assert am.min_k_plus_plus_score(logprobs, mus, sigmas, k=0.4) == pytest.approx(2.0)


def test_min_k_plus_plus_sigma_floor():
    # sigma = 0: a token at the mean scores 0, one below it scores 1e12 per unit, not nan / inf
    assert am.min_k_plus_plus_score([-1.0], [-1.0], [0.0]) == 0.0
    assert am.min_k_plus_plus_score([-1.5], [-1.0], [0.0]) == pytest.approx(0.5e12)


def test_next_token_moments_two_tokens():
    # p = [1/4, 3/4]: mu = ¼ log ¼ + ¾ log ¾, Var = p(1 − p)(log p1 − log p2)² = (3/16) log² 3
    mu, sigma = am.next_token_moments(torch.tensor([0.0, math.log(3.0)], dtype=torch.float64))
    assert mu.item() == pytest.approx(0.25 * math.log(0.25) + 0.75 * math.log(0.75), abs=1e-12)
    assert sigma.item() == pytest.approx(math.sqrt(3) / 4 * math.log(3), abs=1e-12)
    assert mu.dtype == torch.float64


def test_next_token_moments_uniform_batched_and_masked():
    logits = torch.zeros(2, 3, 5, dtype=torch.bfloat16)  # uniform over V = 5
    mu, sigma = am.next_token_moments(logits)
    assert mu.shape == sigma.shape == (2, 3)
    assert mu.dtype == torch.float32
    assert torch.allclose(mu, torch.full((2, 3), -math.log(5)), atol=1e-6)
    assert torch.allclose(sigma, torch.zeros(2, 3), atol=1e-3)
    # a −inf logit is a token of probability 0: uniform over the other 2
    mu, sigma = am.next_token_moments(torch.tensor([0.0, 0.0, float("-inf")]))
    assert mu.item() == pytest.approx(-math.log(2), abs=1e-6)
    assert sigma.item() == pytest.approx(0.0, abs=1e-3)


def test_score_errors():
    with pytest.raises(ValueError):
        am.loss_score([])
    with pytest.raises(ValueError):
        am.zlib_score([], "x")
    with pytest.raises(ValueError):
        am.min_k_score([])
    with pytest.raises(ValueError):
        am.min_k_score([-1.0], k=0.0)
    with pytest.raises(ValueError):
        am.min_k_plus_plus_score([], [], [])
    with pytest.raises(ValueError, match="mus"):
        am.min_k_plus_plus_score([-1.0, -2.0], [-1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="sigmas"):
        am.min_k_plus_plus_score([-1.0, -2.0], [-1.0, -1.0], [1.0])


# ---------------------------------------------------------------- AUC and privleak


def test_auc_worked_example():
    # pairs (holdout > forget): 0.35>0.1, 0.8>0.1, 0.8>0.4; 0.35<0.4 → 3/4
    assert am.auc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.75)
    assert am.auc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert am.auc([0.3, 0.4], [0.1, 0.2]) == 0.0


def test_auc_ties():
    assert am.auc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5
    # pairs: 1 vs 1 tie (0.5), 1 < 2 (1), 3 > 1 (0), 3 > 2 (0) → 1.5 / 4
    assert am.auc([1.0, 3.0], [1.0, 2.0]) == pytest.approx(0.375)


def test_auc_matches_brute_force():
    rng = np.random.default_rng(0)
    # rounded so that ties occur within and across the two sides
    f = np.round(rng.normal(0.0, 1.0, 57), 1)
    h = np.round(rng.normal(0.3, 1.0, 41), 1)
    brute = ((h[None, :] > f[:, None]).sum() + 0.5 * (h[None, :] == f[:, None]).sum()) / (f.size * h.size)
    assert am.auc(f.tolist(), h.tolist()) == pytest.approx(brute, abs=1e-12)


def test_auc_empty():
    with pytest.raises(ValueError):
        am.auc([], [1.0])
    with pytest.raises(ValueError):
        am.auc([1.0], [])


def test_privleak():
    assert am.privleak(0.7, 0.5) == pytest.approx(-40.0)
    assert am.privleak(0.5, 0.5) == 0.0
    assert am.privleak(0.4, 0.6) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="auc_reference"):
        am.privleak(0.7, 1.0)


# ---------------------------------------------------------------- round-to-nearest quantization


def _group_scales(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-element scale of its group, computed group by group (independently of quantize_rtn)."""
    scales = torch.empty_like(w)
    for start in range(0, w.shape[-1], group_size):
        g = w[..., start : start + group_size]
        s = (g.amax(dim=-1, keepdim=True) - g.amin(dim=-1, keepdim=True)) / (2**bits - 1)
        scales[..., start : start + group_size] = s
    return scales


@pytest.mark.parametrize("bits,group_size", [(2, 8), (4, 16), (8, 32), (4, 7)])
def test_quantize_rtn_error_bound(bits, group_size):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(bits + group_size))
    err = (w - am.quantize_rtn(w, bits, group_size)).abs()
    assert torch.all(err <= _group_scales(w, bits, group_size) / 2 + 1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rtn_exact_on_representable_weights(bits):
    levels = 2**bits - 1
    gen = torch.Generator().manual_seed(bits)
    rows, n_groups, group_size, s = 5, 4, 16, 0.125
    q = torch.randint(0, levels + 1, (rows, n_groups, group_size), generator=gen)
    q[..., 0] = 0  # every group spans the full range, so its min–max scale is exactly s
    q[..., 1] = levels
    z = torch.randint(0, levels + 1, (rows, n_groups, 1), generator=gen)
    w = ((q - z).float() * s).reshape(rows, n_groups * group_size)
    assert torch.equal(am.quantize_rtn(w, bits, group_size), w)


def test_quantize_rtn_more_bits_less_error():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    err4 = (w - am.quantize_rtn(w, 4, 32)).abs().mean()
    err8 = (w - am.quantize_rtn(w, 8, 32)).abs().mean()
    assert err8 < err4 / 8


def test_quantize_rtn_partial_last_group():
    # in = 10 with groups of 4: [0:4], [4:8] and the short [8:10]
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    out = am.quantize_rtn(w, 2, 4)
    assert out.shape == w.shape
    assert torch.all((w - out).abs() <= _group_scales(w, 2, 4) / 2 + 1e-6)
    # the short group is quantized on its own, as it would be with groups of its own length (no padding)
    assert torch.equal(out[:, 8:], am.quantize_rtn(w[:, 8:].contiguous(), 2, 2))
    assert torch.equal(out[:, :8], am.quantize_rtn(w[:, :8].contiguous(), 2, 4))


def test_quantize_rtn_constant_group_dtype_shape_and_validation():
    w = torch.tensor([[0.3, 0.3, 0.3, 0.3, -1.0, 1.0, 0.0, 0.5]])
    out = am.quantize_rtn(w, 4, 4)
    assert torch.equal(out[:, :4], w[:, :4])  # scale 0: unchanged, not nan
    w3 = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    out3 = am.quantize_rtn(w3, 4, 4)
    assert out3.dtype == torch.bfloat16 and out3.shape == w3.shape
    for bits, group_size in [(1, 4), (9, 4), (4, 0)]:
        with pytest.raises(ValueError):
            am.quantize_rtn(w, bits, group_size)


class _TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8, bias=False))
        self.lm_head = torch.nn.Linear(8, 11, bias=False)


def test_quantize_linear_layers_in_place():
    torch.manual_seed(3)
    model = _TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = am.quantize_linear_layers_(model, bits=2, group_size=4)
    assert n == 12 * 8 + 8 * 12
    after = model.state_dict()
    assert not torch.equal(after["body.0.weight"], before["body.0.weight"])
    assert not torch.equal(after["body.2.weight"], before["body.2.weight"])
    assert torch.equal(after["body.0.weight"], am.quantize_rtn(before["body.0.weight"], 2, 4))
    # skipped by name, not Linear, or not a weight: untouched
    for key in ["lm_head.weight", "embed.weight", "body.0.bias"]:
        assert torch.equal(after[key], before[key])
    assert not model.body[0].weight.grad_fn  # still a leaf parameter
    # with nothing skipped the lm_head is quantized too
    assert am.quantize_linear_layers_(model, bits=2, group_size=4, skip=()) == n + 8 * 11
