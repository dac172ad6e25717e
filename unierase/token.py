"""Stage A of UniErase: the unlearning token (SPEC-unierase.md §2).

New special tokens `<unlearn_0> … <unlearn_{K-1}>` are added to the vocabulary and ONLY their
embedding rows are trained, so that "question + [UNL]" continues with a refusal, the closing [UNL]
and the end-of-turn token. Every original parameter stays frozen and bit-identical.

How the "only the new rows train" rule is implemented [PROJ, §2.2]: the rows live in small fp32
`nn.Parameter`s (one per token, so Adam never moves a token that is absent from a batch) which are
spliced into the embedding lookup (via `inputs_embeds`) and, for a tied or `share=false` untied
output layer, into the logits of the new ids. The logits are computed only at supervised positions,
which gives the same token-mean cross-entropy as the full causal-LM loss at a fraction of the cost.

Public API: `TokenConfig`, `refusal_for`, `add_unlearning_tokens`, `token_example`, `mask_labels`,
`perturbation_noise`, `UnlearningTokenModule`, `train_unlearning_token`, `TokenArtifact`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import AddedToken, PreTrainedModel

from unierase.io import atomic_dir, atomic_write_json, stable_hash
from unierase.models import (
    IGNORE_INDEX, ModelConfig, chat_prompt, decoder_body, encode_qa, end_of_turn_ids, module_by_name,
    untie_output_embeddings,
)
from unierase.training import TensorDictDataset, TrainerConfig, fit, make_trainer

log = logging.getLogger(__name__)

TOKEN_TEMPLATE = "<unlearn_{}>"
FORMATS = ("plain", "chat")
PERTURB_MODES = ("relative_std", "reference", "absolute", "none")
SCHEDULES = ("per_layer", "all_layers")


# ----------------------------------------------------------------------------- configuration
@dataclass
class PhaseConfig:
    epochs: int
    lr: float


@dataclass
class PerturbConfig:
    """Phase-3 weight perturbation of `down_proj` (§2.8)."""

    mode: str = "relative_std"  # relative_std | reference | absolute | none
    alpha: float = 0.05  # relative_std: sigma = alpha * std(W)   [UNCERTAIN: tune in 0.01-0.1]
    clip: float = 1.0  # noise clipped to [-clip*sigma, clip*sigma] (relative_std, absolute)
    sigma_abs: float = 1e-3  # absolute mode sigma (ablation only; no reference value)
    layers: list[int] | None = None  # None = the edit layers passed by the caller
    schedule: str = "per_layer"  # per_layer | all_layers


@dataclass
class TokenConfig:
    """Every Stage A knob of §2.10 (defaults = the spec's defaults)."""

    samples_per_token: int = 400
    init_std: float | None = None  # None = the model's initializer_range
    share: bool = True  # untied models: the lm_head row is a frozen copy of the initial e_u
    # [PROJ] Tied models only: give the model its own lm_head first. A tied row is both the input that
    # steers the model and an output logit, so on small models its growth makes U appear inside
    # ordinary answers; untied, it behaves as on an untied model (with `share` as above).
    untie_output: bool = False
    # [PROJ] Ordinary QA pairs (the retain set) added to every phase with their own answers as labels.
    # Only an output row that trains (tied, or untied with share=false) learns from them: it is pushed
    # down wherever U is not the answer, so U does not leak into ordinary answers. 0 = the reference.
    output_anchors: int = 0
    refusal_pool: str = "idontknow_100"  # idontknow_100 | reference_99; the caller resolves it to lines
    refusal_salt: str = ""
    # [PROJ] Use only the first n lines of the pool (null = all). One row of a small model cannot
    # encode a 100-way pseudo-random choice; the refusal style is what must be learned.
    refusal_lines: int | None = None
    max_length: int = 128
    batch_size: int = 16
    phase1: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=5, lr=1e-3))
    phase2: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=3, lr=1e-4))
    phase3: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=2, lr=1e-4))  # epochs per layer
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    shuffle: bool = False  # True: shuffle within token groups with the run seed
    on_truncation: str = "error"  # error | skip (fewer than two U survive truncation)
    train_on: str = "forget"  # forget | generic (one universal token, whatever the item count)
    sanity_questions: int = 5  # forced-U greedy generations logged after phases 2 and 3
    sanity_max_new_tokens: int = 48
    save_full_model: bool = False  # TokenArtifact.save(..., model=) also writes the enlarged model
    seed: int = 0

    def validate(self) -> TokenConfig:
        if self.samples_per_token < 1:
            raise ValueError("token.samples_per_token must be >= 1")
        if self.perturb.mode not in PERTURB_MODES:
            raise ValueError(f"token.perturb.mode='{self.perturb.mode}' is not one of {PERTURB_MODES}")
        if self.perturb.schedule not in SCHEDULES:
            raise ValueError(f"token.perturb.schedule='{self.perturb.schedule}' is not one of {SCHEDULES}")
        if self.on_truncation not in ("error", "skip"):
            raise ValueError(f"token.on_truncation='{self.on_truncation}' is not error | skip")
        if self.train_on not in ("forget", "generic"):
            raise ValueError(f"token.train_on='{self.train_on}' is not forget | generic")
        if self.refusal_lines is not None and self.refusal_lines < 1:
            raise ValueError("token.refusal_lines must be >= 1 or null")
        if self.output_anchors < 0:
            raise ValueError("token.output_anchors must be >= 0")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenConfig:
        """Build from a plain (e.g. Hydra `to_container`) dict; unknown keys are an error."""
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown token config key(s) {sorted(unknown)}")
        for name in ("phase1", "phase2", "phase3"):
            if isinstance(data.get(name), dict):
                data[name] = PhaseConfig(**data[name])
        if isinstance(data.get("perturb"), dict):
            data["perturb"] = PerturbConfig(**data["perturb"])
        return cls(**data).validate()


# ----------------------------------------------------------------------------- refusals and tokens
def refusal_index(question: str, pool_size: int, salt: str = "") -> int:
    """idx(q) = int.from_bytes(SHA-256(salt ‖ q)[0:8], "big") mod |pool| (§2.3)."""
    digest = hashlib.sha256(salt.encode("utf-8") + question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], byteorder="big") % pool_size


def refusal_for(question: str, pool: Sequence[str], salt: str = "") -> str:
    """The stable refusal of `question`: the same on every process and machine."""
    if not pool:
        raise ValueError("the refusal pool is empty")
    return pool[refusal_index(question, len(pool), salt)]


def token_string(index: int) -> str:
    return TOKEN_TEMPLATE.format(index)


def num_tokens(n_items: int, samples_per_token: int) -> int:
    """K = ceil(n / samples_per_token): 400 items -> 1 token, 3,600 -> 9."""
    return math.ceil(n_items / samples_per_token)


def token_for_item(index: int, samples_per_token: int) -> int:
    """Items go to tokens in contiguous chunks of `samples_per_token`, in dataset order."""
    return index // samples_per_token


def _is_tied(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight is model.get_input_embeddings().weight


def _register_tokens(model: PreTrainedModel, tokenizer: Any, tokens: Sequence[str]) -> list[int]:
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
def _write_rows(weight: torch.Tensor, ids: Sequence[int], rows: torch.Tensor) -> None:
    weight[torch.as_tensor(list(ids), device=weight.device)] = rows.to(weight.device, weight.dtype)


def add_unlearning_tokens(
    model: PreTrainedModel, tokenizer: Any, count: int, init_std: float | None = None, seed: int = 0,
    share: bool = True,
) -> list[int]:
    """Add `<unlearn_0..count-1>`, resize, and draw the new rows from N(0, init_std²) (§2.1–2.2).

    The draw uses a private generator seeded with `seed` (global RNG untouched). On an untied model
    the new lm_head rows are a copy of the new input rows when `share` (the reference) and an
    independent draw from the same generator otherwise. Returns the new token ids.
    """
    if count < 1:
        raise ValueError("need at least one unlearning token")
    std = init_std if init_std is not None else getattr(model.config, "initializer_range", 0.02)
    ids = _register_tokens(model, tokenizer, [token_string(j) for j in range(count)])
    emb = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, emb.shape[1], generator=generator) * std
    _write_rows(emb, ids, rows)
    if not _is_tied(model):
        out = rows if share else torch.randn(count, emb.shape[1], generator=generator) * std
        _write_rows(model.get_output_embeddings().weight, ids, out)
    return ids


# ----------------------------------------------------------------------------- training examples
class TruncationError(ValueError):
    """Fewer than two occurrences of the unlearning token survived truncation (§2.5.6)."""


def mask_labels(input_ids: Sequence[int], token_id: int) -> list[int]:
    """Labels of §2.5: supervise after the first U up to and including one token after the second U."""
    positions = [i for i, t in enumerate(input_ids) if t == token_id]
    if len(positions) < 2:
        raise TruncationError(f"found {len(positions)} occurrence(s) of token id {token_id}, need 2")
    p0, p1 = positions[0], positions[1]
    labels = list(input_ids)
    for i in range(len(labels)):
        if i <= p0 or i >= p1 + 2:
            labels[i] = IGNORE_INDEX
    return labels


def chat_text(tokenizer: Any, question: str, answer: str, model_cfg: ModelConfig) -> str:
    """The full rendered conversation (user = question, assistant = answer), no generation prompt."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if model_cfg.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": model_cfg.system_prompt})
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, date_string=model_cfg.date_string
    )


def token_example(
    tokenizer: Any, question: str, refusal: str, token: str, fmt: str, max_length: int,
    model_cfg: ModelConfig, group: int = 0,
) -> dict[str, torch.Tensor]:
    """One training item (§2.4–2.5) as tensors `input_ids`, `attention_mask`, `labels` and `group`
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
    # the closing U is the first EOS pad (§2.5 worked example).
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


# ----------------------------------------------------------------------------- phase-3 perturbation
def perturbation_noise(
    weight: torch.Tensor, mode: str, alpha: float = 0.05, clip: float = 1.0, sigma_abs: float = 1e-3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ε of §2.8 for one weight matrix (computed in fp32, returned in the weight's dtype).

    reference: k = mean(W); ε = clamp(k·Z, −k, k) — for k < 0 the bounds cross and PyTorch sets every
    entry to the upper bound, so ε is the constant k (the reference quirk, reproduced on purpose).
    relative_std: σ = α·std(W); ε = clamp(σ·Z, −cσ, cσ).  absolute: σ = sigma_abs, same clipping.
    """
    w = weight.detach().float()
    # Drawn on the CPU: the same noise on every device (a CUDA generator would give another stream).
    z = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.device)
    if mode == "reference":
        k = w.mean().item()
        eps = torch.clamp(k * z, min=-k, max=k)
    elif mode in ("relative_std", "absolute"):
        sigma = alpha * w.std().item() if mode == "relative_std" else sigma_abs
        eps = torch.clamp(sigma * z, min=-clip * sigma, max=clip * sigma)
    else:
        raise ValueError(f"no noise for perturb mode '{mode}'")
    return eps.to(weight.dtype)


# ----------------------------------------------------------------------------- the LightningModule
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
        self.tied = _is_tied(model)
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
        _write_rows(self.model.get_input_embeddings().weight, ids, self.input_rows())
        if self.out_rows is not None:
            _write_rows(self.model.get_output_embeddings().weight, ids, self.output_rows())

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
        embeds = torch.where(is_new.unsqueeze(-1), rows[slot.clamp(min=0)].to(embeds.dtype), embeds)
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
        return logits

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


# ----------------------------------------------------------------------------- artifact
@dataclass
class TokenArtifact:
    """Everything Stage A changed (§2.9): enough to re-apply the token to a fresh model."""

    tokens: list[str]
    token_ids: list[int]
    input_rows: torch.Tensor  # (K, d) fp32
    output_rows: torch.Tensor | None  # (K, d) fp32 for an untied model, else None
    tied: bool
    refusals: dict[str, str]  # question -> assigned refusal
    token_of: dict[str, str]  # question -> its token string
    pool: list[str]
    losses: dict[str, list[float]]
    config: dict[str, Any]
    sanity: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # questions dropped by on_truncation=skip
    rendered_example: str = ""  # one rendered chat-format training text (template record)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def _meta(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens, "token_ids": self.token_ids, "tied": self.tied,
            "hidden_size": int(self.input_rows.shape[1]), "refusals": self.refusals,
            "token_of": self.token_of, "pool": self.pool, "losses": self.losses, "config": self.config,
            "sanity": self.sanity, "skipped": self.skipped, "rendered_example": self.rendered_example,
        }

    def save(self, directory: Path, model: PreTrainedModel | None = None) -> Path:
        """Write rows (safetensors), token.json and the tokenizer atomically into `directory`.

        With `config.save_full_model` and a `model`, the enlarged model is saved under `model/` too.
        """
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            tensors = {"input_rows": self.input_rows.detach().float().contiguous().cpu()}
            if self.output_rows is not None:
                tensors["output_rows"] = self.output_rows.detach().float().contiguous().cpu()
            save_file(tensors, str(tmp / "rows.safetensors"))
            atomic_write_json(tmp / "token.json", self._meta())
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            if model is not None and self.config.get("save_full_model"):
                from unierase.models import save_model

                save_model(model, self.tokenizer, tmp / "model")
        return directory

    @classmethod
    def load(cls, directory: Path) -> TokenArtifact:
        directory = Path(directory)
        meta = json.loads((directory / "token.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / "rows.safetensors"))
        tokenizer = None
        if (directory / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        return cls(
            tokens=meta["tokens"], token_ids=meta["token_ids"], input_rows=tensors["input_rows"],
            output_rows=tensors.get("output_rows"), tied=meta["tied"], refusals=meta["refusals"],
            token_of=meta["token_of"], pool=meta["pool"], losses=meta["losses"], config=meta["config"],
            sanity=meta.get("sanity", {}), skipped=meta.get("skipped", []),
            rendered_example=meta.get("rendered_example", ""), tokenizer=tokenizer,
        )

    def apply(self, model: PreTrainedModel, tokenizer: Any) -> list[int]:
        """Add the tokens to a fresh tokenizer/model (ids must match) and write the trained rows.

        A tokenizer that already holds the tokens at the same ids (e.g. a saved enlarged model) is
        accepted as is. Output rows: a tied model uses the input rows (refused if the artifact has
        different untied output rows); an untied model gets `output_rows`, or the input rows when
        the artifact was trained on a tied model (the share rule). An artifact trained with
        `untie_output` unties a tied model first.
        """
        if self.config.get("untie_output"):
            untie_output_embeddings(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        if hidden != self.input_rows.shape[1]:
            raise ValueError(f"artifact rows have width {self.input_rows.shape[1]}, the model {hidden}")
        vocab = tokenizer.get_vocab()
        if all(t in vocab for t in self.tokens):
            ids = tokenizer.convert_tokens_to_ids(list(self.tokens))
            size = max(model.get_input_embeddings().weight.shape[0], max(ids) + 1)
            if size != model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(size, mean_resizing=False)
        elif any(t in vocab for t in self.tokens):
            raise ValueError("tokenizer holds only some of the artifact's tokens")
        else:
            ids = _register_tokens(model, tokenizer, self.tokens)
        if list(ids) != list(self.token_ids):
            raise ValueError(f"token ids differ: artifact {self.token_ids}, this tokenizer {list(ids)}")
        _write_rows(model.get_input_embeddings().weight, ids, self.input_rows)
        if _is_tied(model):
            if self.output_rows is not None and not torch.equal(self.output_rows, self.input_rows):
                raise ValueError("artifact was trained with separate output rows; this model is tied")
        else:
            out = self.output_rows if self.output_rows is not None else self.input_rows
            _write_rows(model.get_output_embeddings().weight, ids, out)
        return list(ids)


def artifact_key(model_id: str, cfg: TokenConfig, questions: Sequence[str], pool: Sequence[str],
                 model_cfg: ModelConfig, perturb_layers: Sequence[int],
                 anchors: Sequence[tuple[str, str]] = ()) -> str:
    """Cache key of a token artifact: model identity, token config, the exact data and format."""
    return stable_hash({
        "model": model_id, "token": asdict(cfg), "questions": list(questions), "pool": list(pool),
        "format": [model_cfg.system_prompt, model_cfg.date_string], "perturb_layers": list(perturb_layers),
        "anchors": [list(pair) for pair in anchors[: cfg.output_anchors]],
    })


# ----------------------------------------------------------------------------- sanity generation
@torch.no_grad()
def forced_token_generation(
    model: PreTrainedModel, tokenizer: Any, question: str, token: str, model_cfg: ModelConfig,
    max_new_tokens: int = 48, skip_special_tokens: bool = False,
) -> str:
    """Greedy continuation of `chat prompt + U` (U forced as the first assistant token)."""
    prompt = chat_prompt(tokenizer, question, model_cfg) + token
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    was_training = model.training
    model.eval()
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    text = tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=skip_special_tokens)
    return text if skip_special_tokens else token + text


def _sanity(module: UnlearningTokenModule, tokenizer: Any, picks: list[tuple[str, str, str]],
            model_cfg: ModelConfig, max_new_tokens: int, phase: str) -> list[dict[str, str]]:
    module.write_rows()
    rows = []
    for question, token, refusal in picks:
        generated = forced_token_generation(module.model, tokenizer, question, token, model_cfg, max_new_tokens)
        rows.append({"question": question, "assigned": refusal, "generated": generated})
        log.info("token sanity after %s: %r -> %r", phase, question, generated)
    return rows


# ----------------------------------------------------------------------------- training
def _fit(module: UnlearningTokenModule, dataset: TensorDictDataset, groups: list[list[int]], epochs: int,
         lr: float, cfg: TokenConfig, trainer_cfg: TrainerConfig) -> list[float]:
    """One fresh-Adam run of `epochs` over `groups`; returns its per-step losses."""
    if epochs <= 0:
        return []
    module.lr = lr
    module.losses = []
    batches = DataLoader(dataset, batch_sampler=GroupBatchSampler(groups, cfg.batch_size, cfg.shuffle, cfg.seed))
    trainer = make_trainer(trainer_cfg, max_epochs=epochs)
    try:
        fit(trainer, module, batches)
    finally:
        module.restore_weights()
    return list(module.losses)


def train_unlearning_token(
    model: PreTrainedModel, tokenizer: Any, questions: list[str], pool: list[str], cfg: TokenConfig,
    model_cfg: ModelConfig, trainer_cfg: TrainerConfig, perturb_layers: list[int],
    anchors: Sequence[tuple[str, str]] = (),
) -> TokenArtifact:
    """Stage A end to end (§2): add K tokens, run the three phases, write the rows into `model`.

    `questions` are the forget questions (or generic ones with `train_on=generic`, which always uses
    one universal token); `pool` is the refusal pool; `perturb_layers` are the edit layers (used for
    phase 3 unless `cfg.perturb.layers` is set); `anchors` are (question, answer) pairs of which the
    first `cfg.output_anchors` join every phase. `model` and `tokenizer` are modified in place:
    afterwards the tokens exist and their trained rows are in the embedding (and untied lm_head).
    """
    cfg.validate()
    if not questions:
        raise ValueError("no questions to train the unlearning token on")
    pool = list(pool)[: cfg.refusal_lines]
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.untie_output:
        untie_output_embeddings(model)
    tied = _is_tied(model)
    share = cfg.share
    if tied and not share:
        warnings.warn("token.share=false needs an untied lm_head; this model is tied, using share=true")
        share = True
    count = 1 if cfg.train_on == "generic" else num_tokens(len(questions), cfg.samples_per_token)
    ids = add_unlearning_tokens(model, tokenizer, count, cfg.init_std, cfg.seed, share)
    tokens = [token_string(j) for j in range(count)]

    def token_of_index(i: int) -> int:
        return 0 if cfg.train_on == "generic" else token_for_item(i, cfg.samples_per_token)

    plain, chat, group_of, refusals, token_of, skipped = [], [], [], {}, {}, []
    for i, question in enumerate(questions):
        j = token_of_index(i)
        refusal = refusal_for(question, pool, cfg.refusal_salt)
        try:
            pair = [token_example(tokenizer, question, refusal, tokens[j], fmt, cfg.max_length, model_cfg, j)
                    for fmt in FORMATS]
        except TruncationError as err:
            if cfg.on_truncation == "error":
                raise TruncationError(
                    f"item {i} ({question[:60]!r}) is too long for token.max_length={cfg.max_length}: {err}"
                ) from None
            warnings.warn(f"skipping item {i}: {err} (token.max_length={cfg.max_length})")
            skipped.append(question)
            continue
        plain.append(pair[0])
        chat.append(pair[1])
        group_of.append(j)
        refusals[question] = refusal
        token_of[question] = tokens[j]
    if not plain:
        raise ValueError("every item was skipped by truncation")
    if cfg.output_anchors and not tied and share:
        raise ValueError("token.output_anchors needs an output row that trains: a tied model, or share=false")
    if len(anchors) < cfg.output_anchors:
        raise ValueError(f"token.output_anchors={cfg.output_anchors} but only {len(anchors)} anchor pairs given")
    # Anchors are spread over the token groups; an anchor batch updates its group's rows.
    anchor_items = [encode_qa(tokenizer, q, a, model_cfg, cfg.max_length) | {"group": torch.tensor([i % count])}
                    for i, (q, a) in enumerate(anchors[: cfg.output_anchors])]
    n, n_anchor = len(plain), len(anchor_items)
    phase1 = TensorDictDataset(plain + anchor_items)
    anchors_of = [[n + i for i in range(n_anchor) if i % count == j] for j in range(count)]
    groups1 = [[i for i in range(n) if group_of[i] == j] + anchors_of[j] for j in range(count)]
    # plain followed by chat, then the anchors, per token group
    phase2 = TensorDictDataset(plain + anchor_items + chat)
    groups2 = [[i for i in range(n) if group_of[i] == j] + [n + n_anchor + i for i in range(n) if group_of[i] == j]
               + anchors_of[j] for j in range(count)]

    emb = model.get_input_embeddings().weight
    index = torch.as_tensor(ids, device=emb.device)
    init_rows = emb.detach()[index].float().cpu()
    out_rows = None if (tied or share) else model.get_output_embeddings().weight.detach()[index].float().cpu()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    module = UnlearningTokenModule(model, ids, init_rows, out_rows)
    picks = [(q, token_of[q], refusals[q]) for q in list(refusals)[: cfg.sanity_questions]]
    layers = list(cfg.perturb.layers) if cfg.perturb.layers is not None else list(perturb_layers)
    losses: dict[str, list[float]] = {}
    sanity: dict[str, list[dict[str, str]]] = {}
    try:
        losses["phase1"] = _fit(module, phase1, groups1, cfg.phase1.epochs, cfg.phase1.lr, cfg, trainer_cfg)
        losses["phase2"] = _fit(module, phase2, groups2, cfg.phase2.epochs, cfg.phase2.lr, cfg, trainer_cfg)
        sanity["phase2"] = _sanity(module, tokenizer, picks, model_cfg, cfg.sanity_max_new_tokens, "phase 2")
        if cfg.perturb.mode != "none" and cfg.phase3.epochs > 0:
            if not layers:
                warnings.warn("phase 3 has no layers to perturb; skipped")
            else:
                module.perturb = cfg.perturb
                weights = {l: module_by_name(model, model_cfg.down_proj_template.format(l)).weight for l in layers}
                module.noise_generator = torch.Generator().manual_seed(cfg.seed)
                if cfg.perturb.schedule == "per_layer":
                    for layer in layers:
                        module.perturb_weights = [weights[layer]]
                        losses[f"phase3/layer_{layer}"] = _fit(
                            module, phase2, groups2, cfg.phase3.epochs, cfg.phase3.lr, cfg, trainer_cfg)
                else:
                    module.perturb_weights = list(weights.values())
                    losses["phase3/all_layers"] = _fit(
                        module, phase2, groups2, cfg.phase3.epochs * len(layers), cfg.phase3.lr, cfg, trainer_cfg)
                module.perturb, module.perturb_weights = None, []
                sanity["phase3"] = _sanity(module, tokenizer, picks, model_cfg, cfg.sanity_max_new_tokens, "phase 3")
        module.write_rows()
    finally:
        module.restore_weights()
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        model.eval()
    for phase, curve in losses.items():
        if curve:
            log.info("token %s loss %.3f -> %.3f (%d steps)", phase, curve[0], curve[-1], len(curve))
    output_rows = None
    if not tied:
        output_rows = module.output_rows() if module.out_rows is not None else (
            model.get_output_embeddings().weight.detach()[index].float().cpu())
    return TokenArtifact(
        tokens=tokens, token_ids=list(ids), input_rows=module.input_rows().cpu(),
        output_rows=None if output_rows is None else output_rows.cpu(), tied=tied, refusals=refusals,
        token_of=token_of, pool=list(pool), losses=losses,
        config={**asdict(cfg), "effective_share": share, "perturb_layers": list(layers)},
        sanity=sanity, skipped=skipped,
        rendered_example=tokenizer.decode(chat[0]["input_ids"][chat[0]["attention_mask"].bool()]),
        tokenizer=tokenizer,
    )
