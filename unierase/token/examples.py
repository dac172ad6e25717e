"""The training examples: question + U + refusal + U in the plain and chat formats, their label
masks, and the batch order that keeps each batch to one token's items."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from unierase.chat import IGNORE_INDEX, chat_text
from unierase.models import ModelConfig

FORMATS = ("plain", "chat")


class TruncationError(ValueError):
    """Fewer than two occurrences of the unlearning token survived truncation."""


def mask_labels(input_ids: Sequence[int], token_id: int) -> list[int]:
    """Supervise after the first U up to and including one token after the second U."""
    positions = [i for i, t in enumerate(input_ids) if t == token_id]
    if len(positions) < 2:
        raise TruncationError(f"found {len(positions)} occurrence(s) of token id {token_id}, need 2")
    p0, p1 = positions[0], positions[1]
    labels = list(input_ids)
    for i in range(len(labels)):
        if i <= p0 or i >= p1 + 2:
            labels[i] = IGNORE_INDEX
    return labels


def token_example(
    tokenizer: Any, question: str, refusal: str, token: str, fmt: str, max_length: int,
    model_cfg: ModelConfig, group: int = 0,
) -> dict[str, torch.Tensor]:
    """One training item as tensors `input_ids`, `attention_mask`, `labels` and `group`
    (the index of the token whose rows the item trains).

    plain: `q + U + r + U`, the tokenizer's default special tokens (BOS where the tokenizer adds one);
    chat: the chat template with assistant `U + r + U`, tokenised with add_special_tokens=False.
    Truncated and right-padded to `max_length` with EOS. Raises TruncationError when fewer than two
    U survive.
    """
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"'{token}' is not in the tokenizer vocabulary")
    if fmt == "plain":
        ids = tokenizer(question + token + refusal + token, add_special_tokens=True).input_ids
    elif fmt == "chat":
        text = chat_text(tokenizer, question, token + refusal + token, model_cfg)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        raise ValueError(f"unknown format '{fmt}' ({' | '.join(FORMATS)})")
    ids = ids[:max_length]
    pad = max_length - len(ids)
    padded = ids + [tokenizer.eos_token_id] * pad
    # Labels are masked on the padded sequence: in the plain format the one supervised token after
    # the closing U is the first EOS pad (docs/algorithm.md, "Stage A: the unlearning token").
    labels = mask_labels(padded, token_id)
    return {
        "input_ids": torch.tensor(padded),
        "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
        "labels": torch.tensor(labels),
        "group": torch.tensor([group]),
    }


class GroupBatchSampler(Sampler[list[int]]):
    """Batches that never mix token groups; groups in order; optional seeded shuffle within a group."""

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, shuffle: bool = False, seed: int = 0):
        self.groups = [list(g) for g in groups if len(g)]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self._epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self._epoch)
        self._epoch += 1
        for group in self.groups:
            order = group
            if self.shuffle:
                order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            for start in range(0, len(order), self.batch_size):
                yield order[start:start + self.batch_size]

    def __len__(self) -> int:
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups)
