"""The update: the closed-form change Delta W_l of each edited down_proj, restricted to the null space.

Per layer, Delta = R K^T P (K K^T P + C P + L2 I)^-1 (written as a linear solve): K the requests' keys,
R the layer's share of the missing residual z* - h_L, C the past and protected keys' K'K'^T and P the
null-space projector of preserved knowledge (docs/algorithm.md, "Stage B: the unlearning edit").
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from unierase.edit.keys import EditRun, request_keys


def layer_update(P: Tensor, K: Tensor, R: Tensor, C: Tensor, L2: float) -> Tensor:
    """Delta (d x m) = X^T with (P (K K^T + C) + L2 I) X = P K R^T, solved in float32."""
    P, K, R, C = (t.float() for t in (P, K, R, C))
    A = P @ (K @ K.T + C) + L2 * torch.eye(P.shape[0], device=P.device)
    return torch.linalg.solve(A, P @ K @ R.T).T


def update_layers(run: EditRun, requests: Sequence[tuple[str, str | None]], Z: Tensor,
                  protected: Callable[[int], Tensor], write: Callable[[int, Tensor], None]) -> None:
    """Spread z* - h_L (Z: d x n) over the edited layers, lowest first, one closed-form update each.

    A layer takes an equal share of what is still missing after the layers below it: `write(layer,
    delta)` must change that layer's weight, so the next layer's keys and h_L are read on the updated
    model. `protected(layer)` is the C of `layer_update`.
    """
    layers = run.cfg.layers
    for i, layer in enumerate(layers):
        keys, current = request_keys(run, requests, [layer], with_values=True)
        R = (Z - current) / (len(layers) - i)  # this layer's share of what is still missing
        write(layer, layer_update(run.projectors[layer], keys[layer], R, protected(layer), run.cfg.L2))
