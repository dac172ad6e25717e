"""Phase 3's weight noise: each training step sees the MLP `down_proj` weights of the edit layers
perturbed, so the trained rows do not rely on those exact weights (Stage B edits them afterwards)."""
from __future__ import annotations

import torch


def perturbation_noise(
    weight: torch.Tensor, mode: str, alpha: float = 0.05, clip: float = 1.0, sigma_abs: float = 1e-3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The noise ε for one weight matrix (computed in fp32, returned in the weight's dtype).

    reference: k = mean(W); ε = clamp(k·Z, −k, k) — for k < 0 the bounds cross and PyTorch sets every
    entry to the upper bound, so ε is the constant k (the reference quirk, reproduced on purpose).
    relative_std: σ = α·std(W); ε = clamp(σ·Z, −cσ, cσ).  absolute: σ = sigma_abs, same clipping.
    """
    w = weight.detach().float()
    # Drawn on the CPU: the same noise on every device (a CUDA generator would give another stream).
    z = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.device)
    if mode == "reference":
        k = w.mean().item()
        eps = torch.clamp(k * z, min=-k, max=k)
    elif mode in ("relative_std", "absolute"):
        sigma = alpha * w.std().item() if mode == "relative_std" else sigma_abs
        eps = torch.clamp(sigma * z, min=-clip * sigma, max=clip * sigma)
    else:
        raise ValueError(f"no noise for perturb mode '{mode}'")
    return eps.to(weight.dtype)
