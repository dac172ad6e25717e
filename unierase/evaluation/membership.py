"""Teacher-forced token statistics of answers and the membership-inference scores built on them (the audit's
`mia` attack; docs/metrics.md, "audit"): loss, zlib, Min-K % and Min-K %++, and the AUC of telling holdout rows
(never seen) from forget rows."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from unierase.chat import IGNORE_INDEX, pad_rows, render_chat
from unierase.evaluation import audit_metrics as am
from unierase.evaluation.config import EvalConfig
from unierase.evaluation.engine import autocast, length_sorted_batches, qa_sequence
from unierase.models import ModelConfig, autocast_dtype
from unierase.records import QA

MIA_SCORES = ("loss", "zlib", "min_k", "min_k_pp")
PRIVLEAK_SCORE = "min_k"  # open-unlearning's privleak attack


class TokenStats(NamedTuple):
    """Teacher-forced statistics of one answer's tokens."""

    logprobs: list[float]  # log p(answer token)
    suppressed_logprobs: list[float]  # the same with the banned ids removed and the rest renormalised
    mus: list[float]  # E[log p] of the next-token distribution (Min-K %++)
    sigmas: list[float]  # its standard deviation


@torch.no_grad()
def token_stats(model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                banned_ids: Sequence[int], batch_size: int, max_length: int,
                dtype: torch.dtype | None) -> list[TokenStats]:
    """Per answer token: log-probability, the same without the banned ids, and the next-token distribution's
    mean and standard deviation of log-probabilities (input order; prompt + answer ≤ max_length)."""
    seqs = [qa_sequence(tokenizer, p, a, max_length) for p, a in zip(prompts, answers)]
    results: list[TokenStats | None] = [None] * len(seqs)
    banned = torch.tensor(list(banned_ids), dtype=torch.long, device=model.device)
    with autocast(model, dtype):
        for batch in length_sorted_batches([len(ids) for ids, _ in seqs], batch_size):
            ids, mask = pad_rows([seqs[i][0] for i in batch], tokenizer.pad_token_id, device=model.device)
            labels, _ = pad_rows([seqs[i][1] for i in batch], IGNORE_INDEX, device=model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            for row, i in enumerate(batch):
                keep = targets[row] != IGNORE_INDEX
                logp = F.log_softmax(logits[row][keep], dim=-1)
                label_logp = logp.gather(-1, targets[row][keep][:, None])[:, 0]
                # log(1 − p(banned)): renormalise over the tokens decoding may still choose
                rest = torch.log1p(-logp[:, banned].exp().sum(-1).clamp(max=1 - 1e-6)) if len(banned) else 0.0
                mus, sigmas = am.next_token_moments(logits[row][keep])
                results[i] = TokenStats(label_logp.tolist(), (label_logp - rest).tolist(), mus.tolist(),
                                        sigmas.tolist())
    return results  # type: ignore[return-value]


def membership_scores(model: PreTrainedModel, tokenizer: Any, rows: Sequence[QA], cfg: EvalConfig,
                      model_cfg: ModelConfig) -> list[dict[str, float]]:
    """The four membership-inference scores of each row's answer (higher = looks unseen)."""
    prompts = [render_chat(tokenizer, [{"role": "user", "content": qa.question}], model_cfg) for qa in rows]
    stats = token_stats(model, tokenizer, prompts, [qa.answer for qa in rows], (), cfg.batch_size,
                        cfg.nll_max_length, autocast_dtype(model_cfg))
    k = cfg.audit.mia_k
    return [{"loss": am.loss_score(s.logprobs), "zlib": am.zlib_score(s.logprobs, qa.answer),
             "min_k": am.min_k_score(s.logprobs, k), "min_k_pp": am.min_k_plus_plus_score(s.logprobs, s.mus,
                                                                                          s.sigmas, k)}
            for qa, s in zip(rows, stats)]


def membership_aucs(model: PreTrainedModel, tokenizer: Any, forget: Sequence[QA], holdout: Sequence[QA],
                    cfg: EvalConfig, model_cfg: ModelConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """AUC per score of telling holdout (unseen) from forget rows, and the per-row records."""
    forget_scores = membership_scores(model, tokenizer, forget, cfg, model_cfg)
    holdout_scores = membership_scores(model, tokenizer, holdout, cfg, model_cfg)
    aucs = {name: am.auc([s[name] for s in forget_scores], [s[name] for s in holdout_scores]) for name in MIA_SCORES}
    records = ([{"uid": qa.uid, "member": "forget", **s} for qa, s in zip(forget, forget_scores)]
               + [{"uid": qa.uid, "member": "holdout", **s} for qa, s in zip(holdout, holdout_scores)])
    return aucs, records
