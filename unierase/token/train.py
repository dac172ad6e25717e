"""Stage A end to end: add the tokens, build the examples, run the three training phases (plain
examples; plain and chat; plain and chat under weight noise), check forced-token generations, and
return the artifact."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from unierase.chat import chat_prompt, encode_qa, end_of_turn_ids
from unierase.models import ModelConfig, module_by_name, untie_output_embeddings
from unierase.token.artifact import TokenArtifact
from unierase.token.config import TokenConfig
from unierase.token.examples import FORMATS, GroupBatchSampler, TruncationError, token_example
from unierase.token.module import UnlearningTokenModule
from unierase.token.refusal import refusal_for
from unierase.token.vocabulary import add_unlearning_tokens, is_tied, num_tokens, token_for_item, token_string
from unierase.training import TensorDictDataset, TrainerConfig, fit, make_trainer

log = logging.getLogger(__name__)


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


def _fit(module: UnlearningTokenModule, dataset: TensorDictDataset, groups: list[list[int]], epochs: int,
         lr: float, cfg: TokenConfig, trainer_cfg: TrainerConfig, desc: str) -> list[float]:
    """One fresh-Adam run of `epochs` over `groups`; returns its per-step losses."""
    if epochs <= 0:
        return []
    module.lr = lr
    module.losses = []
    batches = DataLoader(dataset, batch_sampler=GroupBatchSampler(groups, cfg.batch_size, cfg.shuffle, cfg.seed))
    trainer = make_trainer(trainer_cfg, desc=desc, max_epochs=epochs)
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
    """Stage A end to end: add K tokens, run the three phases, write the rows into `model`.

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
    tied = is_tied(model)
    share = cfg.share
    if tied and not share:
        warnings.warn("token.share=false needs an untied lm_head; this model is tied, using share=true", stacklevel=2)
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
            warnings.warn(f"skipping item {i}: {err} (token.max_length={cfg.max_length})", stacklevel=2)
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
        losses["phase1"] = _fit(module, phase1, groups1, cfg.phase1.epochs, cfg.phase1.lr, cfg, trainer_cfg,
                                  "token phase 1")
        losses["phase2"] = _fit(module, phase2, groups2, cfg.phase2.epochs, cfg.phase2.lr, cfg, trainer_cfg,
                                  "token phase 2")
        sanity["phase2"] = _sanity(module, tokenizer, picks, model_cfg, cfg.sanity_max_new_tokens, "phase 2")
        if cfg.perturb.mode != "none" and cfg.phase3.epochs > 0:
            if not layers:
                warnings.warn("phase 3 has no layers to perturb; skipped", stacklevel=2)
            else:
                module.perturb = cfg.perturb
                weights = {n: module_by_name(model, model_cfg.down_proj_template.format(n)).weight for n in layers}
                module.noise_generator = torch.Generator().manual_seed(cfg.seed)
                if cfg.perturb.schedule == "per_layer":
                    for layer in layers:
                        module.perturb_weights = [weights[layer]]
                        losses[f"phase3/layer_{layer}"] = _fit(
                            module, phase2, groups2, cfg.phase3.epochs, cfg.phase3.lr, cfg, trainer_cfg,
                            f"token phase 3 (layer {layer})")
                else:
                    module.perturb_weights = list(weights.values())
                    losses["phase3/all_layers"] = _fit(
                        module, phase2, groups2, cfg.phase3.epochs * len(layers), cfg.phase3.lr, cfg, trainer_cfg,
                        "token phase 3")
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
