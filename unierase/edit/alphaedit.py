"""Stage B, the Unlearning Edit: AlphaEdit on down_proj (SPEC-unierase.md section 3).

For every request (question, subject, target token [UNL]) the edit
1. optimises a residual-stream vector z* at the last edited layer L that makes the model say [UNL] (3.6);
2. spreads the residual z* - h_L over the edited layers, each solving a ridge problem for Delta W_l
   restricted to the null space P_l of preserved-knowledge keys and of all earlier edits' keys (3.9).
The edit state (cumulative Delta W, past keys, templates, ids) is what a sequential run persists (3.10).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from unierase.edit.statistics import StopForward, projector_hash
from unierase.io import atomic_dir, atomic_write_json
from unierase.models import ModelConfig, chat_prompt, decoder_body, kv_cache_name, module_by_name

log = logging.getLogger(__name__)

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass
class EditConfig:
    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    module_template: str | None = None  # None: the model config's down_proj_template
    key_position: str = "subject_last"  # subject_last | last
    # The reference drivers use 10 steps, EasyEdit's yaml 25; early stopping makes extra steps free
    # once converged, and small models need them.
    v_steps: int = 25
    v_lr: float = 0.1
    v_loss_layer: int | None = None  # None: N - 1 (the ordinary logits; the only supported value)
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    nullspace_threshold: float = 2e-2
    nullspace_mode: str = "absolute"  # absolute | relative (threshold * largest eigenvalue)
    L2: float = 10.0
    batch_size: int = 1
    context_templates: list[str] | None = None  # T_1..T_n, each containing "{}"; None: generate
    context_layout: str = "in_user_turn"  # in_user_turn | reference
    mom2_corpus: str = "corpus"  # folder, relative to the data dir
    mom2_n_samples: int | None = None  # None: every chunk
    mom2_chunk_tokens: int = 1024
    mom2_batch_size: int = 4
    # none | retain_keys (3.11) | token_keys [PROJ]: the keys at the unlearning token and its refusal in
    # Stage A's own training texts, so the edit does not undo the token's "U -> refusal" behaviour.
    protect: str = "none"
    protect_weight: float = 1.0
    checkpoint_every_chunk: bool = False
    forward_batch_size: int = 16  # sequences per forward pass when measuring keys
    value_autocast: str | None = None  # e.g. "bfloat16": z* optimisation forwards under autocast (CPU speed)
    # [PROJ] token: z* is supervised on the target token alone (3.6). token_continuation: also on the
    # request's continuation (UniErase: the refusal and the closing token), ROME-style multi-token targets.
    value_target: str = "token"
    seed: int = 0

    def __post_init__(self) -> None:
        self.layers = sorted({int(layer) for layer in self.layers})
        if self.context_templates is not None:
            self.context_templates = list(self.context_templates)
        choices = {"key_position": ("subject_last", "last"), "context_layout": ("in_user_turn", "reference"),
                   "nullspace_mode": ("absolute", "relative"), "protect": ("none", "retain_keys", "token_keys"),
                   "value_target": ("token", "token_continuation")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"edit.{name} must be one of {allowed}, got '{getattr(self, name)}'")
        if not self.layers or self.batch_size < 1 or self.v_steps < 1:
            raise ValueError("edit.layers must be non-empty, edit.batch_size and edit.v_steps >= 1")
        for template in self.context_templates or []:
            if template.count("{}") != 1:
                raise ValueError(f"context template {template!r} must contain '{{}}' exactly once")


@dataclass(frozen=True)
class EditRequest:
    question: str
    subject: str | None
    target_id: int
    uid: str
    continuation: tuple[int, ...] = ()  # tokens after the target, supervised under value_target=token_continuation

    def target_sequence(self, cfg: EditConfig) -> list[int]:
        if cfg.value_target == "token_continuation":
            return [self.target_id, *self.continuation]
        return [self.target_id]


def target_token_id(tokenizer: Any, target: str) -> int:
    """The id of a target that must tokenise to exactly one token, without a leading space (3.2)."""
    ids = tokenizer(target, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"edit target {target!r} is not a single token (tokenises to {ids})")
    return ids[0]


# ----------------------------------------------------------------------------- edit state

@dataclass
class EditState:
    layers: list[int]
    projector_hash: str
    config: dict[str, Any]
    context_templates: list[str] | None = None
    token_ids: dict[str, int] = field(default_factory=dict)  # target token string -> id
    done: list[str] = field(default_factory=list)  # request uids already edited
    delta: dict[int, Tensor] = field(default_factory=dict)  # cumulative Delta W_l, d x m, fp32
    past_keys: dict[int, Tensor] = field(default_factory=dict)  # K'_l, m x n_total, fp32
    protect_keys: dict[int, Tensor] = field(default_factory=dict)  # retain / token keys, m x n_protected
    values: dict[str, Tensor] = field(default_factory=dict)  # request uid -> z* (d), for inspection
    history: list[dict[str, Any]] = field(default_factory=list)  # per request: loss, steps, norms
    # In memory only: C_l = sum K'K'^T (+ weighted protected keys) and the fp32 base weights. They live on
    # the state, never at module level, so two runs in one process never share them.
    _C: dict[int, Tensor] = field(default_factory=dict, repr=False)
    _base: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def check(self, layers: list[int], p_hash: str, tokenizer: Any) -> None:
        """Resuming with other layers, another P or a re-numbered token would silently corrupt the edit."""
        if list(layers) != self.layers:
            raise ValueError(f"edit state was made for layers {self.layers}, not {list(layers)}")
        if p_hash != self.projector_hash:
            raise ValueError(f"edit state was made with projector {self.projector_hash}, not {p_hash}")
        for token, token_id in self.token_ids.items():
            if tokenizer.convert_ids_to_tokens(token_id) != token:
                raise ValueError(f"edit state maps {token!r} to id {token_id}, the tokenizer does not")

    def past_C(self, layer: int) -> Tensor:
        if layer not in self._C:
            keys = self.past_keys[layer]
            C = keys @ keys.T
            if layer in self.protect_keys:
                protected = self.protect_keys[layer].to(C)
                C = C + self.config["protect_weight"] * (protected @ protected.T)
            self._C[layer] = C
        return self._C[layer]

    def add_keys(self, keys: dict[int, Tensor]) -> None:
        for layer, K in keys.items():
            C = self.past_C(layer)  # built from the keys so far, before K joins them
            self.past_keys[layer] = torch.cat([self.past_keys[layer], K.to(self.past_keys[layer])], dim=1)
            C.addmm_(K, K.T)

    def save(self, directory: Path) -> None:
        tensors = {f"{name}.{key}": tensor.detach().cpu().contiguous()
                   for name in ("delta", "past_keys", "protect_keys", "values")
                   for key, tensor in getattr(self, name).items()}
        with atomic_dir(Path(directory)) as tmp:
            save_file(tensors, tmp / "state.safetensors")
            atomic_write_json(tmp / "manifest.json", {
                "layers": self.layers, "projector_hash": self.projector_hash, "config": self.config,
                "context_templates": self.context_templates, "token_ids": self.token_ids,
                "done": self.done, "history": self.history,
            })

    @classmethod
    def load(cls, directory: Path) -> EditState:
        directory = Path(directory)
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        tensors = load_file(directory / "state.safetensors")
        state = cls(layers=manifest["layers"], projector_hash=manifest["projector_hash"],
                    config=manifest["config"], context_templates=manifest["context_templates"],
                    token_ids=manifest["token_ids"], done=manifest["done"], history=manifest["history"])
        for name, tensor in tensors.items():
            kind, key = name.split(".", 1)
            getattr(state, kind)[key if kind == "values" else int(key)] = tensor
        return state

    def restore(self, model: torch.nn.Module, tokenizer: Any, projectors: dict[int, Tensor],
                model_cfg: ModelConfig) -> None:
        """On a freshly loaded base (token-trained) model: weights = base + sum Delta W."""
        missing = [layer for layer in self.layers if layer not in projectors]
        if missing:
            raise ValueError(f"no null-space projector for edited layer(s) {missing}")
        self.check(self.layers, projector_hash({layer: projectors[layer] for layer in self.layers}), tokenizer)
        template = self.config.get("module_template") or model_cfg.down_proj_template
        for layer in self.layers:
            weight = module_by_name(model, template.format(layer)).weight
            if weight.shape != self.delta[layer].shape:
                raise ValueError(f"edit state delta for layer {layer} has shape {tuple(self.delta[layer].shape)},"
                                 f" the model's down_proj {tuple(weight.shape)}")
            self._base[layer] = weight.detach().float().clone()
            self.delta[layer] = self.delta[layer].to(weight.device)
            self.write_weight(layer, weight)

    def attach(self, modules: dict[int, torch.nn.Module]) -> None:
        """Bind to the down_proj modules being edited; a fresh state takes their weights as the base."""
        for layer, module in modules.items():
            weight = module.weight
            if layer not in self._base:
                if self.done:
                    raise ValueError("a loaded edit state must be restored first: state.restore(model, ...)")
                self._base[layer] = weight.detach().float().clone()
            self.delta[layer] = self.delta.get(layer, torch.zeros_like(self._base[layer])).to(weight.device)
            keys = self.past_keys.get(layer, torch.zeros(module.in_features, 0))
            self.past_keys[layer] = keys.to(weight.device)

    def write_weight(self, layer: int, weight: Tensor) -> None:
        """weight = base + cumulative Delta, computed in fp32 and cast once: rounding never accumulates."""
        with torch.no_grad():
            weight.copy_(self._base[layer] + self.delta[layer])


# ----------------------------------------------------------------------------- prompts and positions

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
    width = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(
        input_ids=torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows]),
        attention_mask=torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows]),
        lookup=torch.tensor(lookups), last=torch.tensor([len(ids) - 1 for ids in rows]),
    )


def rewriting_texts(tokenizer: Any, request: EditRequest, templates: list[str], cfg: EditConfig,
                    model_cfg: ModelConfig, use_subject: bool) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """T_0(p_r) = "{}" then T_1..T_n(p_r), laid out per `context_layout` (3.4)."""
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
    """"<subject> is a" (plain text, lookup at the subject's last token), or the plain question (3.6)."""
    if use_subject:
        subject = request.subject.strip()
        return subject + " is a", (0, len(subject)), True
    return request.question, None, True


def uses_subject(tokenizer: Any, request: EditRequest, cfg: EditConfig, model_cfg: ModelConfig) -> bool:
    if cfg.key_position == "last":
        return False
    return subject_span(chat_prompt(tokenizer, request.question, model_cfg),
                        request.question, request.subject) is not None


# ----------------------------------------------------------------------------- context templates

def generate_context_templates(model: torch.nn.Module, tokenizer: Any, seed: int, max_tokens: int = 10,
                               top_k: int = 5) -> list[str]:
    """T_1..T_5: short seeded top-k samples from each seed word, as "<text>. {}" (3.4)."""
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


# ----------------------------------------------------------------------------- measuring the model

@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients while optimising delta: less memory, no weight-gradient work."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def hooks(pairs: Sequence[tuple[torch.nn.Module, str, Any]]) -> Iterator[None]:
    """Register (module, "pre" | "post", fn) hooks for the duration of the block."""
    handles = [module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn)
               for module, kind, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hidden(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def forward(model: torch.nn.Module, enc: Encoded, **kwargs: Any) -> Any:
    run_device = next(model.parameters()).device
    return model(input_ids=enc.input_ids.to(run_device), attention_mask=enc.attention_mask.to(run_device),
                 use_cache=False, **kwargs)


def capture(model: torch.nn.Module, enc: Encoded, key_modules: dict[int, torch.nn.Module],
            h_module: torch.nn.Module | None, batch_size: int) -> tuple[dict[int, Tensor], Tensor | None]:
    """down_proj inputs (rows x m per layer) and h_L (rows x d) at each row's lookup position, fp32."""
    keys: dict[int, list[Tensor]] = {layer: [] for layer in key_modules}
    values: list[Tensor] = []
    deepest = max(key_modules, default=None)

    def key_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            keys[layer].append(args[0][rows, lookup].float())
            if h_module is None and layer == deepest:
                raise StopForward
        return hook

    def h_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        values.append(_hidden(output)[rows, lookup].float())
        raise StopForward  # L is the deepest edited layer: nothing after it is needed

    pairs = [(module, "pre", key_hook(layer)) for layer, module in key_modules.items()]
    if h_module is not None:
        pairs.append((h_module, "post", h_hook))
    run_device = next(model.parameters()).device
    with hooks(pairs), torch.no_grad():
        for start in range(0, len(enc.last), batch_size):
            chunk = enc.rows(start, start + batch_size)
            width = int(chunk.lookup.max()) + 1  # causal: nothing after the deepest lookup is needed
            chunk = Encoded(chunk.input_ids[:, :width], chunk.attention_mask[:, :width], chunk.lookup, chunk.last)
            rows, lookup = torch.arange(len(chunk.last), device=run_device), chunk.lookup.to(run_device)
            with contextlib.suppress(StopForward):
                forward(model, chunk)
    return {layer: torch.cat(parts) for layer, parts in keys.items()}, (torch.cat(values) if values else None)


def group_mean(rows: Tensor, n_requests: int) -> Tensor:
    """(n * G) x dim rows, G inputs per request -> dim x n keys: 1/2 (T_0 + mean of T_1..T_n) (3.5)."""
    grouped = rows.view(n_requests, -1, rows.shape[-1])
    keys = grouped[:, 0] if grouped.shape[1] == 1 else 0.5 * (grouped[:, 0] + grouped[:, 1:].mean(1))
    return keys.T.contiguous()


# ----------------------------------------------------------------------------- the algorithm

def weight_decay_term(delta: Tensor, h0: Tensor, weight: float) -> Tensor:
    """lambda_wd * ||delta|| / ||h0||^2 per row: the norm, not squared, over the squared norm [REF]."""
    return weight * delta.norm(dim=-1) / h0.norm(dim=-1) ** 2


def clamp_norm(delta: Tensor, h0_norm: float | Tensor, factor: float) -> Tensor:
    """Rescale each row of delta to norm factor * ||h0|| when it is longer."""
    limit = factor * torch.as_tensor(h0_norm, dtype=delta.dtype, device=delta.device)
    if limit.dim() == 1:
        limit = limit.unsqueeze(-1)
    norm = delta.norm(dim=-1, keepdim=True)
    return torch.where(norm > limit, delta * (limit / norm), delta)


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
    width = max(len(ids) for ids in rows)
    extended = Encoded(
        input_ids=torch.tensor([ids + [0] * (width - len(ids)) for ids in rows]),  # padding is masked out
        attention_mask=torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows]),
        lookup=enc.lookup, last=torch.tensor([len(ids) - 1 for ids in rows]),
    )
    return extended, torch.tensor(score_row), torch.tensor(score_position), torch.tensor(labels)


class SuffixReplay:
    """The model from layer L's output on, rerun per step only where delta can reach.

    delta enters the residual stream at layer L and at each row's lookup position, so every layer at
    earlier positions, and layers <= L at all positions, compute the same thing at every step. They run
    once: the positions before each lookup (the prefix) fill a KV cache, and the rest (the suffix) runs
    to layer L. A step then runs layers L+1.. on the suffixes only, against that cache. The rows are laid
    out with their lookups in one column (prefixes left-padded, suffixes right-padded), so delta lands in
    suffix column 0 of every row. The replay reuses the arguments the decoder passed its layer L+1 (mask,
    rotary embeddings, cache), so it holds for any decoder whose body has `layers` and `norm`.
    """

    def __init__(self, model: torch.nn.Module, enc: Encoded, h_module: torch.nn.Module) -> None:
        body = decoder_body(model)
        if not hasattr(body, "layers") or not hasattr(body, "norm"):
            raise ValueError(f"{type(body).__name__} has no `layers` and `norm`: the value optimisation "
                             "replays the decoder layers after layer L")
        is_last = [layer is h_module for layer in body.layers]
        if not any(is_last):
            raise ValueError("the edit's last layer is not one of the decoder's `layers`")
        self.upper = list(body.layers)[is_last.index(True) + 1:]
        self.norm = body.norm
        run_device = enc.input_ids.device
        lookup, last = enc.lookup, enc.last
        width, length = int(lookup.max()), int((last - lookup).max()) + 1
        if width == 0:
            raise ValueError("every row's lookup is its first token: there is no prefix to cache")
        rows = len(last)
        prefix = torch.zeros(rows, width, dtype=torch.long, device=run_device)
        suffix = torch.zeros(rows, length, dtype=torch.long, device=run_device)
        prefix_mask, suffix_mask = torch.zeros_like(prefix), torch.zeros_like(suffix)
        for i, (start, end) in enumerate(zip(lookup.tolist(), last.tolist())):
            prefix[i, width - start:] = enc.input_ids[i, :start]
            prefix_mask[i, width - start:] = 1
            suffix[i, : end - start + 1] = enc.input_ids[i, start:end + 1]
            suffix_mask[i, : end - start + 1] = 1
        columns = torch.arange(width, device=run_device)
        prefix_positions = (columns - (width - lookup)[:, None]).clamp_min(0)
        suffix_positions = lookup[:, None] + torch.arange(length, device=run_device)
        cache_name = kv_cache_name(model)
        with torch.no_grad():
            self.prefix_cache = body(input_ids=prefix, attention_mask=prefix_mask, position_ids=prefix_positions,
                                     use_cache=True)[cache_name]
            cache = copy.deepcopy(self.prefix_cache)
            captured: dict[str, Any] = {}

            def keep_h(module: torch.nn.Module, args: tuple, output: Any) -> None:
                captured["h"] = _hidden(output)
                if not self.upper:
                    raise StopForward

            def keep_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                captured["kwargs"] = kwargs
                raise StopForward

            handles = [h_module.register_forward_hook(keep_h)]
            if self.upper:
                handles.append(self.upper[0].register_forward_pre_hook(keep_arguments, with_kwargs=True))
            try:
                with contextlib.suppress(StopForward):
                    body(input_ids=suffix, attention_mask=torch.cat([prefix_mask, suffix_mask], dim=1),
                         position_ids=suffix_positions, use_cache=True, **{cache_name: cache})
            finally:
                for handle in handles:
                    handle.remove()
        self.h = captured["h"]  # h_L on the suffixes: column 0 is each row's lookup
        self.kwargs = captured.get("kwargs", {})
        self.cache = cache

    def hidden(self, delta_rows: Tensor) -> Tensor:
        """Final hidden states of the suffixes with `delta_rows` (rows x d) added to h_L at the lookups."""
        hidden = torch.cat([self.h[:, :1] + delta_rows.unsqueeze(1).to(self.h.dtype), self.h[:, 1:]], dim=1)
        fresh = copy.deepcopy(self.prefix_cache)  # the layers append the suffix to the cache they are given
        kwargs = {name: fresh if value is self.cache else value for name, value in self.kwargs.items()}
        for layer in self.upper:
            hidden = _hidden(layer(hidden, **kwargs))
        return self.norm(hidden)


def optimise_values(model: torch.nn.Module, enc: Encoded, owner: Tensor, is_kl: Tensor,
                    targets: Sequence[Sequence[int]], h_module: torch.nn.Module,
                    cfg: EditConfig) -> tuple[Tensor, list[dict[str, float]]]:
    """z*_r = h0_r + delta_r at layer L for a chunk of requests at once (3.6), d x n.

    Row i of `enc` belongs to request `owner[i]`: its rewriting inputs (T_0 first), then one KL input
    (`is_kl`). `targets[r]` is request r's target sequence (one token in the spec); a row's NLL is the
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
    rewrite_count = torch.bincount(owner[rewrite], minlength=n).float()
    tokens_per_row = torch.bincount(score_row, minlength=len(rows)).clamp_min(1).float()
    delta = torch.zeros(n, model.config.hidden_size, device=run_device, requires_grad=True)
    # Logits only where supervised (the target tokens; the KL subject position), in suffix columns:
    # the vocabulary projection of whole sequences would dominate time and memory.
    logit_rows = torch.cat([score_row, kl_rows])
    logit_positions = torch.cat([score_position, enc.lookup[kl_rows]]) - enc.lookup[logit_rows]
    head = model.get_output_embeddings()
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
                logits = head(replay.hidden(delta[owner])[logit_rows, logit_positions])
            target_log_probs = logits[: len(labels)].float().log_softmax(-1)
            token_nll = -target_log_probs[torch.arange(len(labels), device=run_device), labels]
            row_nll = torch.zeros(len(rows), device=run_device).index_add(0, score_row, token_nll) / tokens_per_row
            nll = torch.zeros(n, device=run_device).index_add(0, owner[rewrite], row_nll[rewrite]) / rewrite_count
            kl_log_probs = logits[len(labels):].float().log_softmax(-1)
            if kl_initial is None:
                kl_initial = kl_log_probs.detach()
            kl = (kl_log_probs.exp() * (kl_log_probs - kl_initial)).sum(-1)  # KL(current || initial)
            loss = nll + cfg.kl_factor * kl + weight_decay_term(delta, h0, cfg.v_weight_decay)
            if step == 0:
                for r in range(n):
                    infos[r]["nll_start"] = nll[r].item()
            # A request stops at its first loss below the threshold, or at the last step, which
            # measures but does not step [REF].
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


def layer_update(P: Tensor, K: Tensor, R: Tensor, C: Tensor, L2: float) -> Tensor:
    """Delta (d x m) = X^T with (P (K K^T + C) + L2 I) X = P K R^T, solved in float32 (3.9)."""
    P, K, R, C = (t.float() for t in (P, K, R, C))
    A = P @ (K @ K.T + C) + L2 * torch.eye(P.shape[0], device=P.device)
    return torch.linalg.solve(A, P @ K @ R.T).T


@dataclass
class _Run:
    """What one apply_edits call shares across its chunks."""
    model: torch.nn.Module
    tokenizer: Any
    cfg: EditConfig
    model_cfg: ModelConfig
    key_modules: dict[int, torch.nn.Module]
    h_module: torch.nn.Module
    projectors: dict[int, Tensor]
    templates: list[str]


def request_keys(run: _Run, requests: Sequence[tuple[str, str | None]], layers: list[int],
                 with_values: bool = False) -> tuple[dict[int, Tensor], Tensor | None]:
    """Keys (m x n per layer) of (question, subject) pairs and, optionally, h_L on T_0 (d x n)."""
    items, use = [], []
    for question, subject in requests:
        request = EditRequest(question, subject, -1, "")
        use.append(uses_subject(run.tokenizer, request, run.cfg, run.model_cfg))
        items += rewriting_texts(run.tokenizer, request, run.templates, run.cfg, run.model_cfg, use[-1])
    enc = encode(run.tokenizer, items)
    rows, h = capture(run.model, enc, {layer: run.key_modules[layer] for layer in layers},
                      run.h_module if with_values else None, run.cfg.forward_batch_size)
    keys = {layer: group_mean(r, len(requests)) for layer, r in rows.items()}
    if h is None:
        return keys, None
    return keys, h.view(len(requests), -1, h.shape[-1])[:, 0].T.contiguous()  # h_L on T_0 only


def continuation_keys(run: _Run, items: Sequence[tuple[str, Sequence[int]]],
                      layers: list[int]) -> dict[int, Tensor]:
    """Keys (m x n per layer) at every continuation position of `chat prompt + continuation`."""
    sequences, starts = [], []
    for question, continuation in items:
        prompt = run.tokenizer(chat_prompt(run.tokenizer, question, run.model_cfg), add_special_tokens=False).input_ids
        sequences.append(prompt + list(continuation))
        starts.append(len(prompt))
    keys: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    current: dict[int, Tensor] = {}

    def key_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            current[layer] = args[0].float()
            if layer == max(layers):
                raise StopForward
        return hook

    run_device = next(run.model.parameters()).device
    with hooks([(run.key_modules[layer], "pre", key_hook(layer)) for layer in layers]), torch.no_grad():
        for first in range(0, len(sequences), run.cfg.forward_batch_size):
            batch = sequences[first:first + run.cfg.forward_batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor([row + [0] * (width - len(row)) for row in batch], device=run_device)
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch], device=run_device)
            with contextlib.suppress(StopForward):
                run.model(input_ids=ids, attention_mask=mask, use_cache=False)
            for layer in layers:
                keys[layer] += [current[layer][i, starts[first + i]:len(row)] for i, row in enumerate(batch)]
    return {layer: torch.cat(parts).T.contiguous() for layer, parts in keys.items()}


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


def edit_chunk(run: _Run, chunk: list[EditRequest], state: EditState) -> None:
    """One closed-form update for a chunk: all z* on the unchanged model, then the layers in order."""
    layers = state.layers
    pairs = [(r.question, r.subject) for r in chunk]
    enc, owner, is_kl, uses = value_inputs(run.tokenizer, chunk, run.templates, run.cfg, run.model_cfg)
    Z, infos = optimise_values(run.model, enc, owner, is_kl, [r.target_sequence(run.cfg) for r in chunk],
                               run.h_module, run.cfg)  # d x n
    for r, (request, use, info) in enumerate(zip(chunk, uses, infos)):
        state.values[request.uid] = Z[:, r].cpu()
        state.history.append({"uid": request.uid, "subject_key": use, **info})
    for i, layer in enumerate(layers):
        keys, current = request_keys(run, pairs, [layer], with_values=True)
        R = (Z - current) / (len(layers) - i)  # this layer's share of what is still missing
        delta = layer_update(run.projectors[layer], keys[layer], R, state.past_C(layer), run.cfg.L2)
        state.delta[layer] += delta.to(state.delta[layer])
        state.write_weight(layer, run.key_modules[layer].weight)
    new_keys, _ = request_keys(run, pairs, layers)
    state.add_keys(new_keys)
    state.done += [r.uid for r in chunk]


def check_target(request: EditRequest, vocab_size: int) -> None:
    if isinstance(request.target_id, bool) or not isinstance(request.target_id, int):
        raise ValueError(f"request {request.uid}: target must be a single token id, got {request.target_id!r}")
    if not 0 <= request.target_id < vocab_size:
        raise ValueError(f"request {request.uid}: target id {request.target_id} outside the vocabulary "
                         f"({vocab_size})")


def apply_edits(
    model: torch.nn.Module, tokenizer: Any, requests: Sequence[EditRequest], cfg: EditConfig,
    model_cfg: ModelConfig, projectors: dict[int, Tensor], state: EditState | None = None,
    retain: Sequence[tuple[str, str | None]] | None = None,
    token_texts: Sequence[tuple[str, Sequence[int]]] | None = None, checkpoint_dir: Path | None = None,
) -> EditState:
    """Edit `model` in place for every request not yet in `state.done`; returns the (updated) state.

    `retain` (question, subject) pairs feed edit.protect=retain_keys (3.11); `token_texts` (question,
    token + refusal + token ids) pairs, Stage A's training texts, feed edit.protect=token_keys. With
    edit.checkpoint_every_chunk the state is also written to `checkpoint_dir` after every chunk.
    """
    template = cfg.module_template or model_cfg.down_proj_template
    key_modules = {layer: module_by_name(model, template.format(layer)) for layer in cfg.layers}
    h_module = module_by_name(model, model_cfg.layer_template.format(cfg.layers[-1]))
    n_layers = model.config.num_hidden_layers
    if cfg.v_loss_layer not in (None, n_layers - 1):
        raise ValueError(f"edit.v_loss_layer must be None or {n_layers - 1} (the ordinary logits), "
                         f"got {cfg.v_loss_layer}")
    missing = [layer for layer in cfg.layers if layer not in projectors]
    if missing:
        raise ValueError(f"no null-space projector for layer(s) {missing}")
    vocab_size = model.get_output_embeddings().weight.shape[0]
    for request in requests:
        check_target(request, vocab_size)
    needs = {"retain_keys": ("retain questions", retain), "token_keys": ("the token's training texts", token_texts)}
    if cfg.protect in needs and not needs[cfg.protect][1] and (state is None or not state.protect_keys):
        raise ValueError(f"edit.protect={cfg.protect} needs {needs[cfg.protect][0]}")

    run_device = next(model.parameters()).device
    p_hash = projector_hash({layer: projectors[layer] for layer in cfg.layers})
    if state is None:
        state = EditState(layers=list(cfg.layers), projector_hash=p_hash, config=asdict(cfg))
    state.check(cfg.layers, p_hash, tokenizer)
    state.attach(key_modules)

    was_training = model.training
    model.eval()
    try:
        if state.context_templates is None:  # once per (model, seed), then persisted with the state
            state.context_templates = (cfg.context_templates if cfg.context_templates is not None
                                       else generate_context_templates(model, tokenizer, cfg.seed))
        run = _Run(model, tokenizer, cfg, model_cfg, key_modules, h_module,
                   {layer: projectors[layer].to(run_device, torch.float32) for layer in cfg.layers},
                   state.context_templates)
        if cfg.protect != "none" and not state.protect_keys:
            state.protect_keys = (request_keys(run, list(retain), cfg.layers)[0] if cfg.protect == "retain_keys"
                                  else continuation_keys(run, list(token_texts), cfg.layers))
            state._C.clear()
        done = set(state.done)
        pending = [r for r in requests if r.uid not in done]
        fallbacks = sum(not uses_subject(tokenizer, r, cfg, model_cfg) for r in pending)
        if cfg.key_position == "subject_last" and fallbacks:
            log.warning("subject not found for %d of %d requests: keyed on the last prompt token",
                        fallbacks, len(pending))
        for request in pending:
            state.token_ids[tokenizer.convert_ids_to_tokens(request.target_id)] = request.target_id
        bar = tqdm(total=len(pending), desc="edit", unit="request", disable=bool(os.environ.get("CI")))
        for start in range(0, len(pending), cfg.batch_size):
            chunk = pending[start:start + cfg.batch_size]
            edit_chunk(run, chunk, state)
            bar.update(len(chunk))
            if cfg.checkpoint_every_chunk and checkpoint_dir is not None:
                state.save(checkpoint_dir)
        bar.close()
    finally:
        model.train(was_training)
    for layer in cfg.layers:
        ratio = float(state.delta[layer].norm() / state._base[layer].norm())
        log.info("layer %d: |Delta W| / |W| = %.4g", layer, ratio)
    return state


def edited_fraction(model: torch.nn.Module, layers: list[int],
                    down_proj_template: str = "model.layers.{}.mlp.down_proj") -> float:
    """Share of all parameters the edit may change (3.66 % for Llama-3.1-8B, layers 4..8)."""
    edited = sum(module_by_name(model, down_proj_template.format(layer)).weight.numel() for layer in layers)
    return edited / sum(p.numel() for p in model.parameters())
