"""Chat formatting and token batches: rendering a question (and answer) with the model's chat template, the
turn-end token, and padded id rows / labelled QA examples for training and scoring."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jinja2 import TemplateError

from unierase.models import ModelConfig

_PROBE = "Xq7Zunierase"  # a marker to find in rendered templates (no template trims or rewrites it)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], cfg: ModelConfig,
                add_generation_prompt: bool = True) -> str:
    """Render messages with the chat template, the date pinned and thinking off (Qwen3: answers start right
    after the prompt). A leading system turn goes into the first user turn, after a blank line (as Gemma 3's
    template does itself), where the template rejects or drops a system role (Gemma 2)."""
    if messages and messages[0]["role"] == "system" and not accepts_system_role(tokenizer):
        system, first, *rest = messages
        messages = [{"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}, *rest]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         date_string=cfg.date_string, enable_thinking=False)


def accepts_system_role(tokenizer: Any) -> bool:
    """Whether the chat template renders a system turn, found by rendering one."""
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": _PROBE}, {"role": "user", "content": "Q"}],
                                             tokenize=False, add_generation_prompt=True, enable_thinking=False)
    except TemplateError:  # e.g. Gemma 2's raise_exception('System role not supported')
        return False
    return _PROBE in text


def turn_end_id(tokenizer: Any) -> int:
    """The token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>, <end_of_turn>,
    <|end|>, </s>), found by rendering one: the first added token after the answer, else the eos token."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _PROBE}], tokenize=False,
        add_generation_prompt=False, enable_thinking=False,
    )
    added = tokenizer.added_tokens_decoder
    after = text[text.index(_PROBE) + len(_PROBE):]
    return next((i for i in tokenizer(after, add_special_tokens=False).input_ids if i in added),
                tokenizer.eos_token_id)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end generation (never <unlearn_k>)."""
    return sorted({turn_end_id(tokenizer), tokenizer.eos_token_id})


def _chat_messages(question: str, cfg: ModelConfig, answer: str | None = None) -> list[dict[str, str]]:
    """The conversation as chat-template messages: optional system prompt, the user turn, the answer."""
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    if cfg.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def chat_prompt(tokenizer: Any, question: str, cfg: ModelConfig) -> str:
    """The rendered user turn plus the assistant header: the next token is the answer's first."""
    return render_chat(tokenizer, _chat_messages(question, cfg), cfg)


def chat_text(tokenizer: Any, question: str, answer: str, cfg: ModelConfig) -> str:
    """The full rendered conversation (user = question, assistant = answer), no generation prompt."""
    return render_chat(tokenizer, _chat_messages(question, cfg, answer), cfg, add_generation_prompt=False)


IGNORE_INDEX = -100  # a label that is not scored (prompt, padding): torch's and transformers' convention


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows padded to the longest one: (ids, attention mask). Left padding puts every row's last
    token in the last column (batched generation); right padding keeps every row's first token in column 0."""
    width = max(len(row) for row in rows)
    ids, mask = [], []
    for row in rows:
        padding = width - len(row)
        ids.append([pad_id] * padding + list(row) if left else list(row) + [pad_id] * padding)
        mask.append([0] * padding + [1] * len(row) if left else [1] * len(row) + [0] * padding)
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """An answer's tokens as the model is trained to produce them: the text, then one end-of-turn."""
    return tokenizer(answer, add_special_tokens=False).input_ids + [turn_end_id(tokenizer)]


def encode_qa(
    tokenizer: Any, question: str, answer: str, cfg: ModelConfig, max_length: int, pad: bool = True
) -> dict[str, torch.Tensor]:
    """Chat-formatted QA example: labels are the answer tokens plus one end-of-turn.

    Prompt and answer are tokenised separately so the label boundary is exact. `pad=True` right-pads
    to `max_length`; otherwise `pad_batch` pads each batch to its own longest example.
    """
    prompt_ids = tokenizer(chat_prompt(tokenizer, question, cfg), add_special_tokens=False).input_ids
    answer = answer_ids(tokenizer, answer)
    input_ids = (prompt_ids + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer)[:max_length]
    pad = max_length - len(input_ids) if pad else 0
    return {
        "input_ids": torch.tensor(input_ids + [tokenizer.pad_token_id] * pad),
        "attention_mask": torch.tensor([1] * len(input_ids) + [0] * pad),
        "labels": torch.tensor(labels + [IGNORE_INDEX] * pad),
    }
