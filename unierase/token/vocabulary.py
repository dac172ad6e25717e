"""The unlearning tokens in the vocabulary: their strings, how many, which item trains which token,
adding them to tokenizer and model, and writing embedding rows."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AddedToken, PreTrainedModel

TOKEN_TEMPLATE = "<unlearn_{}>"


def token_string(index: int) -> str:
    return TOKEN_TEMPLATE.format(index)


def num_tokens(n_items: int, samples_per_token: int) -> int:
    """K = ceil(n / samples_per_token): 400 items -> 1 token, 3,600 -> 9."""
    return math.ceil(n_items / samples_per_token)


def token_for_item(index: int, samples_per_token: int) -> int:
    """Items go to tokens in contiguous chunks of `samples_per_token`, in dataset order."""
    return index // samples_per_token


def is_tied(model: PreTrainedModel) -> bool:
    """Whether the output layer shares the input embedding matrix."""
    out = model.get_output_embeddings()
    return out is None or out.weight is model.get_input_embeddings().weight


def register_tokens(model: PreTrainedModel, tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add `tokens` as atomic special tokens and grow the embeddings to cover them."""
    vocab = tokenizer.get_vocab()
    present = [t for t in tokens if t in vocab]
    if present:
        raise ValueError(f"tokenizer already has {present}; use TokenArtifact.apply or a fresh tokenizer")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    rows = model.get_input_embeddings().weight.shape[0]
    # Never shrink: some models carry padding rows beyond len(tokenizer).
    size = max(rows, len(tokenizer), max(ids) + 1)
    if size != rows:
        model.resize_token_embeddings(size, mean_resizing=False)
    return list(ids)


@torch.no_grad()
def write_embedding_rows(weight: torch.Tensor, ids: Sequence[int], rows: torch.Tensor) -> None:
    """Overwrite the rows `ids` of an embedding matrix (cast to its device and dtype)."""
    weight[torch.as_tensor(list(ids), device=weight.device)] = rows.to(weight.device, weight.dtype)


def add_unlearning_tokens(
    model: PreTrainedModel, tokenizer: Any, count: int, init_std: float | None = None, seed: int = 0,
    share: bool = True,
) -> list[int]:
    """Add `<unlearn_0..count-1>`, resize, and draw the new rows from N(0, init_std²).

    The draw uses a private generator seeded with `seed` (global RNG untouched). On an untied model
    the new lm_head rows are a copy of the new input rows when `share` (the reference) and an
    independent draw from the same generator otherwise. Returns the new token ids.
    """
    if count < 1:
        raise ValueError("need at least one unlearning token")
    std = init_std if init_std is not None else getattr(model.config, "initializer_range", 0.02)
    ids = register_tokens(model, tokenizer, [token_string(j) for j in range(count)])
    emb = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, emb.shape[1], generator=generator) * std
    write_embedding_rows(emb, ids, rows)
    if not is_tied(model):
        out = rows if share else torch.randn(count, emb.shape[1], generator=generator) * std
        write_embedding_rows(model.get_output_embeddings().weight, ids, out)
    return ids
