"""The texts the edit reads the model on: rewriting prompts, subject positions, context templates.

A request's key and value are measured on its chat prompt T_0 and on T_1..T_n, the prompt behind short
generated prefixes (the context templates); the key position is the subject's last token, or the last
prompt token when the subject is not in the question (docs/algorithm.md, "Stage B: the unlearning edit").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unierase.chat import chat_prompt, pad_rows
from unierase.edit.config import EditConfig, EditRequest
from unierase.models import ModelConfig

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass
class Encoded:
    """Right-padded inputs with, per row, the lookup (subject-last) and last real token index."""
    input_ids: Tensor
    attention_mask: Tensor
    lookup: Tensor
    last: Tensor

    def rows(self, start: int, stop: int) -> Encoded:
        width = int(self.last[start:stop].max()) + 1
        return Encoded(self.input_ids[start:stop, :width], self.attention_mask[start:stop, :width],
                       self.lookup[start:stop], self.last[start:stop])


def subject_span(text: str, question: str, subject: str | None) -> tuple[int, int] | None:
    """Characters of the first occurrence of the subject inside the question's last occurrence in text."""
    if not subject or not subject.strip():
        return None
    question, subject = question.strip(), subject.strip()  # templates may trim the user message
    start, offset = text.rfind(question), question.find(subject)
    if start < 0 or offset < 0:
        return None
    return start + offset, start + offset + len(subject)


def encode(tokenizer: Any, items: Sequence[tuple[str, tuple[int, int] | None, bool]]) -> Encoded:
    """items: (text, subject span or None for the last token, add_special_tokens)."""
    rows, lookups = [], []
    for text, span, add_special in items:
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = enc.input_ids
        hits = [i for i, (s, e) in enumerate(enc.offset_mapping) if span and s < span[1] and e > span[0]]
        rows.append(ids)
        lookups.append(hits[-1] if hits else len(ids) - 1)
    input_ids, attention_mask = pad_rows(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return Encoded(input_ids=input_ids, attention_mask=attention_mask, lookup=torch.tensor(lookups),
                   last=torch.tensor([len(ids) - 1 for ids in rows]))


def rewriting_texts(tokenizer: Any, request: EditRequest, templates: list[str], cfg: EditConfig,
                    model_cfg: ModelConfig, use_subject: bool) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """T_0(p_r) = "{}" then T_1..T_n(p_r), laid out per `context_layout`."""
    items = []
    for template in ["{}", *templates]:
        if cfg.context_layout == "in_user_turn":
            text = chat_prompt(tokenizer, template.replace("{}", request.question), model_cfg)
        else:  # reference: the prefix goes before the whole rendered chat prompt
            text = template.replace("{}", chat_prompt(tokenizer, request.question, model_cfg))
        span = subject_span(text, request.question, request.subject) if use_subject else None
        items.append((text, span, False))  # the rendered prompt already has its special tokens
    return items


def kl_text(request: EditRequest, use_subject: bool) -> tuple[str, tuple[int, int] | None, bool]:
    """"<subject> is a" (plain text, lookup at the subject's last token), or the plain question.

    The value optimisation keeps the model's prediction here close to the unedited one (the KL term).
    """
    if use_subject:
        subject = request.subject.strip()
        return subject + " is a", (0, len(subject)), True
    return request.question, None, True


def uses_subject(tokenizer: Any, request: EditRequest, cfg: EditConfig, model_cfg: ModelConfig) -> bool:
    """Whether the request is keyed on its subject: key_position=subject_last and the subject is found."""
    if cfg.key_position == "last":
        return False
    return subject_span(chat_prompt(tokenizer, request.question, model_cfg),
                        request.question, request.subject) is not None


def generate_context_templates(model: torch.nn.Module, tokenizer: Any, seed: int, max_tokens: int = 10,
                               top_k: int = 5) -> list[str]:
    """T_1..T_5: short seeded top-k samples from each seed word, as "<text>. {}"."""
    generator = torch.Generator().manual_seed(seed)
    run_device = next(model.parameters()).device
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    templates = []
    for word in SEED_WORDS:
        ids = tokenizer(word, add_special_tokens=True).input_ids
        while len(ids) < max_tokens:  # up to max_tokens in total, seed word included
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids], device=run_device), use_cache=False).logits
            top = logits[0, -1].float().topk(top_k)
            choice = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=generator)
            token = int(top.indices[choice])
            if token in stop:
                break
            ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates
