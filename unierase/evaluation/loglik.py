"""Teacher-forced log-probability of a continuation after a context: lm-evaluation-harness's `loglikelihood`
request, which log-likelihood MMLU (docs/metrics.md, UT-1) scores each choice with.

Batched like the rest of the engine and equal to one full forward pass per pair (tests/test_evaluation.py):
contexts are left-padded with explicit position ids and run once; continuations longer than one token
run on top of their context's KV cache.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from unierase.chat import pad_rows
from unierase.evaluation.engine import autocast, length_sorted_batches
from unierase.models import kv_cache_name


class ContinuationLogprob(NamedTuple):
    logprob: float  # Σ log p(continuation token | context, earlier continuation tokens)
    is_greedy: bool  # every continuation token is the argmax (lm-eval's `is_greedy`)
    n_tokens: int


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: trailing spaces of the
    context move to the continuation, the whole string is encoded once and the continuation is what
    follows the context's own encoding (so a merge across the boundary is never scored twice).

    Special tokens: the tokenizer's default (lm-eval's HF wrapper), unless the text already starts with
    the BOS token (a rendered chat template), which must not get a second one."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    special = not (tokenizer.bos_token and context.startswith(tokenizer.bos_token))
    whole = tokenizer(context + continuation, add_special_tokens=special).input_ids
    context_ids = tokenizer(context, add_special_tokens=special).input_ids
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def _context_batch(model: PreTrainedModel, contexts: list[list[int]], continuations: list[list[list[int]]],
                   pad_id: int) -> list[list[torch.Tensor]]:
    """Per context, per continuation: the log-softmax rows that predict the continuation's tokens.

    Each context runs once (left-padded, with a KV cache); only continuations longer than one token need a
    second pass, over their own tokens on top of their context's cache."""
    dev = model.device
    tokens, mask = pad_rows(contexts, pad_id, left=True, device=dev)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
    cache_name = kv_cache_name(model)
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_name: None})
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts every continuation's first token
    windows = [[first[c, None] for _ in conts] for c, conts in enumerate(continuations)]
    longer = [(c, k) for c, conts in enumerate(continuations) for k, cont in enumerate(conts) if len(cont) > 1]
    if longer:
        owner = torch.tensor([c for c, _ in longer], device=dev)
        cache = getattr(out, cache_name)
        cache.reorder_cache(owner)  # one cache row per continuation, copied from its context's row
        inputs = [continuations[c][k][:-1] for c, k in longer]  # the last token is predicted, never fed
        ids, cont_mask = pad_rows(inputs, pad_id, device=dev)  # right padding: it follows every real token
        steps = torch.arange(ids.shape[1], device=dev)
        logits = model(input_ids=ids, attention_mask=torch.cat([mask[owner], cont_mask], dim=1),
                       position_ids=positions[owner, -1:] + 1 + steps, use_cache=True,
                       **{cache_name: cache}).logits.float()
        rest = F.log_softmax(logits, dim=-1)
        for row, ((c, k), fed) in enumerate(zip(longer, inputs)):
            windows[c][k] = torch.cat([windows[c][k], rest[row, : len(fed)]])
    return windows


@torch.no_grad()
def continuation_logprobs(
    model: PreTrainedModel,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 16,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> list[ContinuationLogprob]:
    """Teacher-forced log-probability of each continuation after its context (input order): lm-eval's
    `loglikelihood` request. Pairs that share a context share its forward pass, so MMLU's four choices
    cost one context pass per question (plus one short pass over the choice texts longer than a token)."""
    if len(contexts) != len(continuations):
        raise ValueError("one continuation per context")
    pairs = [encode_pair(tokenizer, c, x) for c, x in zip(contexts, continuations)]
    if any(not ctx or not cont for ctx, cont in pairs):
        raise ValueError("a context or a continuation encodes to no token")
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        by_context.setdefault(tuple(ctx), []).append(i)
    keys = list(by_context)
    results: list[ContinuationLogprob | None] = [None] * len(pairs)
    with autocast(model, autocast_dtype):
        for batch in length_sorted_batches([len(k) for k in keys], batch_size):
            members = [by_context[keys[j]] for j in batch]
            windows = _context_batch(model, [list(keys[j]) for j in batch],
                                     [[pairs[i][1] for i in group] for group in members], tokenizer.pad_token_id)
            for group, group_windows in zip(members, windows):
                for i, window in zip(group, group_windows):
                    target = torch.tensor(pairs[i][1], device=window.device)
                    scores = window.gather(-1, target[:, None]).squeeze(-1)
                    results[i] = ContinuationLogprob(float(scores.sum()),
                                                      bool((window.argmax(-1) == target).all()), len(target))
    return results  # type: ignore[return-value]
