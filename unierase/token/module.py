"""The LightningModule that trains only the unlearning tokens' embedding rows.

Every original parameter stays frozen and bit-identical. The rows live in small fp32
`nn.Parameter`s (one per token, so Adam never moves a token that is absent from a batch) which are
spliced into the embedding lookup (via `inputs_embeds`) and, for a tied or `share=false` untied
output layer, into the logits of the new ids. Doing it this way rather than unfreezing the embedding
matrix is a project choice (docs/algorithm.md, "Departures from the paper"). The logits are computed
only at supervised positions, which gives the same token-mean cross-entropy as the full causal-LM
loss at a fraction of the cost.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from unierase.chat import IGNORE_INDEX
from unierase.models import decoder_body, embedding_scale, finish_logits
from unierase.token.config import PerturbConfig
from unierase.token.perturbation import perturbation_noise
from unierase.token.vocabulary import is_tied, write_embedding_rows


class UnlearningTokenModule(L.LightningModule):
    """Trains only the new token rows (fp32 parameters spliced into the frozen model).

    `init_rows` (K, d) are the input rows; `out_rows` (K, d) makes the untied lm_head rows of the new
    ids trainable (share=false); on a tied model the input rows also produce the new ids' logits.
    Phase 3: set `perturb_weights` (down_proj weights) and `perturb` before `fit`; each step adds
    fresh noise before the forward pass and restores W exactly after the optimizer step.
    """

    def __init__(
        self, model: PreTrainedModel, token_ids: Sequence[int], init_rows: torch.Tensor,
        out_rows: torch.Tensor | None = None, lr: float = 1e-3,
    ):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.tied = is_tied(model)
        self.embed_scale = embedding_scale(model)  # spliced rows are scaled as the embedding scales its own (Gemma)
        if self.tied and out_rows is not None:
            raise ValueError("a tied model has no separate output rows")
        vocab = model.get_input_embeddings().weight.shape[0]
        lookup = torch.full((vocab,), -1, dtype=torch.long)
        lookup[torch.as_tensor(list(token_ids))] = torch.arange(len(token_ids))
        self.register_buffer("lookup", lookup, persistent=False)
        self.register_buffer("token_ids", torch.as_tensor(list(token_ids), dtype=torch.long), persistent=False)
        self.rows = nn.ParameterList([nn.Parameter(r.detach().float().clone()) for r in init_rows])
        self.out_rows = (
            nn.ParameterList([nn.Parameter(r.detach().float().clone()) for r in out_rows])
            if out_rows is not None else None
        )
        self.lr = lr
        self.losses: list[float] = []
        self.perturb: PerturbConfig | None = None
        self.perturb_weights: list[torch.Tensor] = []
        self.noise_generator: torch.Generator | None = None
        self._saved: list[torch.Tensor] = []

    # -- rows
    def _stack(self, params: nn.ParameterList, present: torch.Tensor) -> torch.Tensor:
        """(K, d); rows of tokens absent from the batch are detached: their grad stays None (not
        even zero), so Adam neither moves them nor touches their moments."""
        keep = set(present.tolist())
        return torch.stack([p if j in keep else p.detach() for j, p in enumerate(params)])

    def input_rows(self) -> torch.Tensor:
        return torch.stack([p.detach() for p in self.rows])

    def output_rows(self) -> torch.Tensor | None:
        return torch.stack([p.detach() for p in self.out_rows]) if self.out_rows is not None else None

    def write_rows(self) -> None:
        """Copy the current rows into the model's embedding (and lm_head where it trains)."""
        ids = self.token_ids.tolist()
        write_embedding_rows(self.model.get_input_embeddings().weight, ids, self.input_rows())
        if self.out_rows is not None:
            write_embedding_rows(self.model.get_output_embeddings().weight, ids, self.output_rows())

    # -- forward / loss
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        supervised = (labels != IGNORE_INDEX).any(dim=0).nonzero()
        n = int(supervised.max()) + 1  # causal + right padding: later positions cannot matter
        input_ids, attention_mask, labels = (
            batch["input_ids"][:, :n], batch["attention_mask"][:, :n], labels[:, :n]
        )
        slot = self.lookup[input_ids]
        is_new = slot >= 0
        present = torch.unique(torch.cat([slot[is_new], batch["group"].flatten()]))  # anchors carry no U
        rows = self._stack(self.rows, present)
        embeds = self.model.get_input_embeddings()(input_ids)
        new_embeds = rows[slot.clamp(min=0)] * self.embed_scale
        embeds = torch.where(is_new.unsqueeze(-1), new_embeds.to(embeds.dtype), embeds)
        hidden = decoder_body(self.model)(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        h = hidden[:, :-1][mask]
        logits = self.logits(h, rows, present)
        return F.cross_entropy(logits.float(), targets[mask])

    def logits(self, h: torch.Tensor, rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        logits = head(h)
        if self.tied or self.out_rows is not None:
            out = rows if self.tied else self._stack(self.out_rows, present)
            new = h @ out.to(h.dtype).T
            bias = getattr(head, "bias", None)
            if bias is not None:
                new = new + bias[self.token_ids]
            logits = logits.index_copy(-1, self.token_ids, new.to(logits.dtype))
        return finish_logits(self.model, logits)  # after the splice: soft-capping (Gemma 2) covers the new ids

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.losses.append(loss.item())
        self.log("token/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.rows) + (list(self.out_rows) if self.out_rows is not None else [])
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    # -- phase-3 perturbation around each optimisation step
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.restore_weights()
        if self.perturb is None or not self.perturb_weights:
            return
        for weight in self.perturb_weights:
            self._saved.append(weight.detach().clone())
        with torch.no_grad():
            for weight in self.perturb_weights:
                weight.add_(perturbation_noise(
                    weight, self.perturb.mode, self.perturb.alpha, self.perturb.clip,
                    self.perturb.sigma_abs, self.noise_generator,
                ))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.restore_weights()

    @torch.no_grad()
    def restore_weights(self) -> None:
        if self._saved:
            for weight, saved in zip(self.perturb_weights, self._saved):
                weight.copy_(saved)
            self._saved = []
