"""Computing the values: z* = h_L + delta, the layer-L output that makes the model say the target.

For a chunk of requests, delta is optimised by Adam so that every rewriting prompt (T_0..T_n) predicts
the target token, with a KL term keeping the prediction after "<subject> is a" (or the plain question)
unchanged, a weight decay on delta, and its norm clamped relative to h_L (docs/algorithm.md, "Stage B:
the unlearning edit").
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from unierase.chat import pad_rows
from unierase.edit.capture import frozen
from unierase.edit.config import EditConfig, EditRequest
from unierase.edit.prompts import Encoded, encode, kl_text, rewriting_texts, uses_subject
from unierase.edit.replay import SuffixReplay
from unierase.models import ModelConfig, output_logits


def weight_decay_term(delta: Tensor, h0: Tensor, weight: float) -> Tensor:
    """lambda_wd * ||delta|| / ||h0||^2 per row.

    The norm, not squared, over the squared norm: as the reference AlphaEdit code computes it.
    """
    return weight * delta.norm(dim=-1) / h0.norm(dim=-1) ** 2


def clamp_norm(delta: Tensor, h0_norm: float | Tensor, factor: float) -> Tensor:
    """Rescale each row of delta to norm factor * ||h0|| when it is longer."""
    limit = factor * torch.as_tensor(h0_norm, dtype=delta.dtype, device=delta.device)
    if limit.dim() == 1:
        limit = limit.unsqueeze(-1)
    norm = delta.norm(dim=-1, keepdim=True)
    return torch.where(norm > limit, delta * (limit / norm), delta)


def suppressed_nll(logits: Tensor, banned: Tensor, fallback: Tensor, row: Tensor, owner: Tensor, rewrite: Tensor,
                   rewrite_count: Tensor) -> Tensor:
    """Per request, the mean over its rewriting rows of −log p(fallback token) with the row's banned token
    removed from the distribution: what greedy decoding with that token suppressed would choose."""
    masked = logits.clone()
    masked[torch.arange(len(banned), device=logits.device), banned] = float("-inf")
    token_nll = -masked.log_softmax(-1)[torch.arange(len(fallback), device=logits.device), fallback]
    per_row = torch.zeros(len(owner), device=logits.device).index_add(0, row, token_nll)
    return torch.zeros(len(rewrite_count), device=logits.device).index_add(
        0, owner[rewrite], per_row[rewrite]) / rewrite_count


def append_targets(enc: Encoded, owner: Tensor, is_kl: Tensor,
                   targets: Sequence[Sequence[int]]) -> tuple[Encoded, Tensor, Tensor, Tensor]:
    """Teacher forcing: each rewriting row gets its request's target sequence minus the last token appended.

    Returns the extended inputs and, per supervised token, its row, its (predicting) position and its label.
    A one-token target appends nothing and supervises the prompt's last position.
    """
    rows, score_row, score_position, labels = [], [], [], []
    for i in range(len(enc.last)):
        last = int(enc.last[i])
        ids = enc.input_ids[i, : last + 1].tolist()
        if not is_kl[i]:
            sequence = list(targets[int(owner[i])])
            ids += sequence[:-1]
            score_row += [i] * len(sequence)
            score_position += range(last, last + len(sequence))
            labels += sequence
        rows.append(ids)
    input_ids, attention_mask = pad_rows(rows, 0)  # padding is masked out
    extended = Encoded(input_ids=input_ids, attention_mask=attention_mask, lookup=enc.lookup,
                       last=torch.tensor([len(ids) - 1 for ids in rows]))
    return extended, torch.tensor(score_row), torch.tensor(score_position), torch.tensor(labels)


def value_inputs(tokenizer: Any, chunk: Sequence[EditRequest], templates: list[str], cfg: EditConfig,
                 model_cfg: ModelConfig) -> tuple[Encoded, Tensor, Tensor, list[bool]]:
    """The value-optimisation batch of a chunk: per request its rewriting inputs, then its KL input.

    Returns the encoded rows, each row's request index, the KL-row mask and per request whether it
    is keyed on the subject.
    """
    items, owner, is_kl = [], [], []
    uses = [uses_subject(tokenizer, r, cfg, model_cfg) for r in chunk]
    for r, (request, use) in enumerate(zip(chunk, uses)):
        texts = rewriting_texts(tokenizer, request, templates, cfg, model_cfg, use)
        items += texts + [kl_text(request, use)]
        owner += [r] * (len(texts) + 1)
        is_kl += [False] * len(texts) + [True]
    return encode(tokenizer, items), torch.tensor(owner), torch.tensor(is_kl), uses


def optimise_values(model: torch.nn.Module, enc: Encoded, owner: Tensor, is_kl: Tensor,
                    targets: Sequence[Sequence[int]], h_module: torch.nn.Module,
                    cfg: EditConfig) -> tuple[Tensor, list[dict[str, float]]]:
    """z*_r = h0_r + delta_r at layer L for a chunk of requests at once, d x n.

    Row i of `enc` belongs to request `owner[i]`: its rewriting inputs (T_0 first), then one KL input
    (`is_kl`). `targets[r]` is request r's target sequence (one token in the paper); a row's NLL is the
    mean over its target tokens. The requests' losses are summed, so each delta_r gets exactly its own
    gradient, and Adam is element-wise: this equals optimising each request alone, with one batched
    forward per step. A request stops (its delta frozen) once its loss is below `early_stop_loss`.
    """
    run_device = next(model.parameters()).device
    enc, score_row, score_position, labels = append_targets(enc, owner, is_kl, targets)
    enc = Encoded(*(t.to(run_device) for t in (enc.input_ids, enc.attention_mask, enc.lookup, enc.last)))
    score_row, score_position, labels = (t.to(run_device) for t in (score_row, score_position, labels))
    owner, is_kl = owner.to(run_device), is_kl.to(run_device)
    n = len(targets)
    rows = torch.arange(len(enc.last), device=run_device)
    rewrite, kl_rows = rows[~is_kl], rows[is_kl]
    if not torch.equal(owner[kl_rows], torch.arange(n, device=run_device)):
        raise ValueError("each request needs exactly one KL row, in request order")
    first = torch.stack([rewrite[owner[rewrite] == r][0] for r in range(n)])  # T_0 row of each request
    # Each rewriting row's first supervised token (the target token) and the one after it (the refusal's first):
    # suppressed_weight trains the latter to win once the former is banned.
    starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool, device=run_device),
                                      score_row[1:] != score_row[:-1]])).flatten()
    rewrite_count = torch.bincount(owner[rewrite], minlength=n).float()
    tokens_per_row = torch.bincount(score_row, minlength=len(rows)).clamp_min(1).float()
    delta = torch.zeros(n, model.config.hidden_size, device=run_device, requires_grad=True)
    # Logits only where supervised (the target tokens; the KL subject position), in suffix columns:
    # the vocabulary projection of whole sequences would dominate time and memory.
    logit_rows = torch.cat([score_row, kl_rows])
    logit_positions = torch.cat([score_position, enc.lookup[kl_rows]]) - enc.lookup[logit_rows]
    optimiser = torch.optim.Adam([delta], lr=cfg.v_lr)
    kl_initial: Tensor | None = None
    active = torch.ones(n, dtype=torch.bool, device=run_device)
    infos: list[dict[str, float]] = [{} for _ in range(n)]
    # Autocast only speeds up the forward/backward; delta, the loss and z* stay float32.
    autocast = (torch.autocast(run_device.type, dtype=getattr(torch, cfg.value_autocast))
                if cfg.value_autocast else contextlib.nullcontext())
    with frozen(model):
        with autocast:
            replay = SuffixReplay(model, enc, h_module)
        h0 = replay.h[first, 0].detach().float()
        for step in range(cfg.v_steps):
            with autocast:
                logits = output_logits(model, replay.hidden(delta[owner])[logit_rows, logit_positions])
            target_log_probs = logits[: len(labels)].float().log_softmax(-1)
            token_nll = -target_log_probs[torch.arange(len(labels), device=run_device), labels]
            row_nll = torch.zeros(len(rows), device=run_device).index_add(0, score_row, token_nll) / tokens_per_row
            nll = torch.zeros(n, device=run_device).index_add(0, owner[rewrite], row_nll[rewrite]) / rewrite_count
            kl_log_probs = logits[len(labels):].float().log_softmax(-1)
            if kl_initial is None:
                kl_initial = kl_log_probs.detach()
            kl = (kl_log_probs.exp() * (kl_log_probs - kl_initial)).sum(-1)  # KL(current || initial)
            loss = nll + cfg.kl_factor * kl + weight_decay_term(delta, h0, cfg.v_weight_decay)
            if cfg.suppressed_weight:
                loss = loss + cfg.suppressed_weight * suppressed_nll(logits[starts].float(), labels[starts],
                                                                     labels[starts + 1], score_row[starts],
                                                                     owner, rewrite, rewrite_count)
            if step == 0:
                for r in range(n):
                    infos[r]["nll_start"] = nll[r].item()
            # A request stops at its first loss below the threshold, or at the last step, which
            # measures but does not step, as in the reference AlphaEdit code.
            stopping = active & ((loss.detach() < cfg.early_stop_loss) | (step == cfg.v_steps - 1))
            for r in stopping.nonzero().flatten().tolist():
                infos[r] |= {"loss": loss[r].item(), "nll": nll[r].item(), "steps": step}
            active &= ~stopping
            if not active.any():
                break
            (grad,) = torch.autograd.grad(loss[active].sum(), delta)
            frozen_rows = delta.detach()[~active].clone()
            delta.grad = grad
            optimiser.step()
            with torch.no_grad():
                delta[~active] = frozen_rows  # Adam momentum would otherwise keep moving finished rows
                delta.copy_(clamp_norm(delta, h0.norm(dim=1), cfg.clamp_norm_factor))
    z = h0 + delta.detach()
    for r in range(n):
        infos[r] |= {"delta_norm": delta[r].norm().item(), "h0_norm": h0[r].norm().item()}
    return z.T.contiguous(), infos
