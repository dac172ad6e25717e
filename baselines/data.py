"""Paired forget/retain/refusal dataset of the baselines (docs/algorithm.md, "The baselines")."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from baselines.losses import PARTS
from unierase.token import refusal_for

Encode = Callable[[str, str], dict[str, Tensor]]
QA = tuple[str, str]


def pair_indices(i: int, n_retain: int, n_refusals: int) -> tuple[int, int]:
    """(retain index, refusal index) for forget index i, as closer-look's ``torch.manual_seed(i)`` draws.

    A local generator gives the same stream as the seeded global one without touching global RNG state.
    """
    g = torch.Generator().manual_seed(i)
    j = (i + int(torch.randint(0, n_retain, (1,), generator=g))) % n_retain
    return j, int(torch.randint(0, n_refusals, (1,), generator=g))


class PairedUnlearningDataset(Dataset):
    """Item i = {"forget": q_i→a_i, "retain": r_j→b_j, "forget_idk": q_i→c_i, "retain_idk": r_j→c_i}.

    ``encode(question, answer)`` returns 1-D ``input_ids``/``attention_mask``/``labels`` padded to a fixed
    length with answer-only labels; only the requested ``parts`` are encoded.
    """

    def __init__(self, forget: Sequence[QA], retain: Sequence[QA], refusals: Sequence[str], encode: Encode,
                 idk_assignment: Literal["reference", "stable_hash"] = "reference", salt: str = "",
                 parts: Sequence[str] = PARTS) -> None:
        if idk_assignment not in ("reference", "stable_hash"):
            raise ValueError(f"unknown idk_assignment {idk_assignment!r}")
        if unknown := set(parts) - set(PARTS):
            raise ValueError(f"unknown batch parts {sorted(unknown)}")
        self.forget, self.retain, self.refusals, self.encode = forget, retain, refusals, encode
        self.idk_assignment, self.salt, self.parts = idk_assignment, salt, tuple(parts)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, dict[str, Tensor]]:
        j, k = pair_indices(i, len(self.retain), len(self.refusals))  # draw always, so j is assignment-independent
        (q, a), (r, b) = self.forget[i], self.retain[j]
        c = self.refusals[k] if self.idk_assignment == "reference" else refusal_for(q, self.refusals, self.salt)
        texts = {"forget": (q, a), "retain": (r, b), "forget_idk": (q, c), "retain_idk": (r, c)}
        return {p: self.encode(*texts[p]) for p in self.parts}


def collate_paired(items: Sequence[dict[str, dict[str, Tensor]]]) -> dict[str, dict[str, Tensor]]:
    """Stack each part's tensors: {part: {key: Tensor[B, T]}}."""
    return {p: {k: torch.stack([it[p][k] for it in items]) for k in items[0][p]} for p in items[0]}
