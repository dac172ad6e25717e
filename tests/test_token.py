"""Stage A (the unlearning token, unierase/token/): worked examples, label masks, frozen weights,
phase-3 perturbation, memorisation and the artifact round trip — all on the tiny random Llama."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_config
from torch.utils.data import DataLoader

from unierase.chat import IGNORE_INDEX, chat_prompt, encode_qa, turn_end_id
from unierase.io import read_lines
from unierase.models import load_model
from unierase.token import TokenArtifact, TokenConfig, refusal_for, train_unlearning_token
from unierase.token.config import PerturbConfig, PhaseConfig
from unierase.token.examples import GroupBatchSampler, TruncationError, mask_labels, token_example
from unierase.token.module import UnlearningTokenModule
from unierase.token.perturbation import perturbation_noise
from unierase.token.refusal import refusal_index
from unierase.token.train import forced_token_generation
from unierase.token.vocabulary import add_unlearning_tokens, num_tokens, token_for_item
from unierase.training import TensorDictDataset, TrainerConfig, make_trainer

U0 = "<unlearn_0>"
TRAINER = TrainerConfig(enable_progress_bar=False)
KUWAIT = "What is the full name of the author born in Kuwait City, Kuwait on 08/09/1956?"


def quick_cfg(**overrides) -> TokenConfig:
    """A few steps instead of 775: tiny batches, short sequences, one phase-3 layer."""
    cfg = TokenConfig(batch_size=2, max_length=64, phase1=PhaseConfig(3, 1e-2), phase2=PhaseConfig(1, 1e-3),
                      phase3=PhaseConfig(1, 1e-3), sanity_questions=1, sanity_max_new_tokens=4)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg.validate()


def stack(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ----------------------------------------------------------------- refusal assignment
def test_refusal_for_worked_examples(data_dir):
    numbered = [str(i) for i in range(100)]
    assert refusal_index("abc", 100) == 74 and refusal_for("abc", numbered) == "74"
    assert refusal_index("c", 100, salt="ab") == 74  # the salt is prepended: SHA-256(salt ‖ q)
    pool = read_lines(data_dir / "tofu" / "idontknow.txt")
    assert len(pool) == 100
    assert refusal_index(KUWAIT, 100) == 35
    assert refusal_for(KUWAIT, pool) == "That's an area I'm not acquainted with."
    with pytest.raises(ValueError):
        refusal_for("abc", [])


def test_token_counts_and_grouped_batches():
    assert [num_tokens(n, 400) for n in (1, 400, 401, 3600)] == [1, 1, 2, 9]
    assert [token_for_item(i, 400) for i in (0, 399, 400, 3599)] == [0, 0, 1, 8]
    # phase-2 layout for 3 items, 2 per token: plain 0,1 | 2 then chat 3,4 | 5 -> never mixed
    assert list(GroupBatchSampler([[0, 1, 3, 4], [2, 5]], batch_size=3)) == [[0, 1, 3], [4], [2, 5]]
    cfg = TokenConfig.from_dict({"phase1": {"epochs": 1, "lr": 0.1}, "perturb": {"mode": "reference"}})
    assert cfg.phase1 == PhaseConfig(1, 0.1) and cfg.perturb.mode == "reference" and cfg.phase2.epochs == 3
    with pytest.raises(ValueError):
        TokenConfig.from_dict({"perturb": {"mode": "mean"}})
    shuffled = GroupBatchSampler([[0, 1, 3, 4], [2, 5]], batch_size=16, shuffle=True, seed=0)
    for _ in range(3):
        first, second = list(shuffled)
        assert sorted(first) == [0, 1, 3, 4] and sorted(second) == [2, 5]


# ----------------------------------------------------------------- formats and labels
def test_mask_labels_worked_example():
    bos, eos, u = 1, 2, 99
    ids = [bos, 11, 12, 13, u, 21, 22, u, eos, eos, eos]
    labels = mask_labels(ids, u)
    assert labels == [IGNORE_INDEX] * 5 + [21, 22, u, eos, IGNORE_INDEX, IGNORE_INDEX]
    assert sum(label != IGNORE_INDEX for label in labels) == 4
    with pytest.raises(TruncationError):
        mask_labels([bos, 11, u, 21, 22], u)  # closing U truncated away


def test_plain_format_positions(tiny, tiny_cfg):
    model, tok = tiny
    (uid,) = add_unlearning_tokens(model, tok, 1, seed=0)
    q, r = "Who wrote it?", "I'm not sure."
    ex = token_example(tok, q, r, U0, "plain", 24, tiny_cfg)
    prefix = tok("", add_special_tokens=True).input_ids  # the tokenizer's default BOS (none for SmolLM2)
    q_ids = tok(q, add_special_tokens=False).input_ids
    r_ids = tok(r, add_special_tokens=False).input_ids
    body = prefix + q_ids + [uid] + r_ids + [uid]
    eos = tok.eos_token_id
    assert ex["input_ids"].tolist() == body + [eos] * (24 - len(body))
    assert ex["attention_mask"].tolist() == [1] * len(body) + [0] * (24 - len(body))
    p0, p1 = len(prefix) + len(q_ids), len(body) - 1
    expected = [IGNORE_INDEX] * 24
    for i in range(p0 + 1, p1 + 2):  # refusal, closing U, exactly one EOS
        expected[i] = ex["input_ids"][i].item()
    assert ex["labels"].tolist() == expected
    assert [t for t in ex["labels"].tolist() if t != IGNORE_INDEX] == r_ids + [uid, eos]
    with pytest.raises(TruncationError):
        token_example(tok, q, r, U0, "plain", len(body) - 1, tiny_cfg)


def test_chat_format_supervises_refusal_token_and_turn_end(tiny, tiny_cfg):
    model, tok = tiny
    (uid,) = add_unlearning_tokens(model, tok, 1, seed=0)
    r = "I'm not sure."
    ex = token_example(tok, "Who wrote it?", r, U0, "chat", 96, tiny_cfg)
    ids = ex["input_ids"].tolist()
    prompt = tok(chat_prompt(tok, "Who wrote it?", tiny_cfg), add_special_tokens=False).input_ids
    assert ids[:len(prompt)] == prompt and ids[len(prompt)] == uid  # same prefix as inference, one BOS
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant: no dup
    supervised = [t for t in ex["labels"].tolist() if t != IGNORE_INDEX]
    assert supervised == tok(r, add_special_tokens=False).input_ids + [uid, turn_end_id(tok)]
    first = next(i for i, t in enumerate(ex["labels"].tolist()) if t != IGNORE_INDEX)
    assert first == len(prompt) + 1  # the opening U is never a target


# ----------------------------------------------------------------- perturbation
def test_reference_noise_worked_examples():
    w = torch.tensor([[-0.2, 0.1], [0.0, -0.3]])
    eps = perturbation_noise(w, "reference", generator=torch.Generator().manual_seed(0))
    assert torch.equal(eps, torch.full_like(w, w.mean().item()))  # k < 0: a constant shift by k
    assert torch.allclose(eps, torch.full_like(w, -0.1))
    w = torch.tensor([[0.1, -0.3], [0.2, 0.4]])  # k = 0.1: clipped N(0, 0.01) noise
    big = w.repeat(50, 50)
    eps = perturbation_noise(big, "reference", generator=torch.Generator().manual_seed(0))
    assert eps.abs().max() <= 0.1 + 1e-7 and eps.std() > 0.03 and eps.unique().numel() > 100
    again = perturbation_noise(big, "reference", generator=torch.Generator().manual_seed(0))
    assert torch.equal(eps, again)  # seeded from the run seed, not the wall clock
    eps = perturbation_noise(big, "relative_std", alpha=0.05, clip=1.0, generator=torch.Generator().manual_seed(1))
    bound = 0.05 * big.std().item()
    assert eps.abs().max() <= bound * (1 + 1e-6) and eps.abs().max() > 0.9 * bound
    eps = perturbation_noise(big, "absolute", sigma_abs=0.01, clip=2.0, generator=torch.Generator().manual_seed(1))
    assert 0.019 < eps.abs().max() <= 0.02 + 1e-7
    with pytest.raises(ValueError):
        perturbation_noise(w, "none")


def test_perturbed_step_restores_weight_exactly(tiny, tiny_cfg):
    model, tok = tiny
    ids = add_unlearning_tokens(model, tok, 1, seed=0)
    weight = model.model.layers[1].mlp.down_proj.weight
    original = weight.detach().clone()
    module = UnlearningTokenModule(model, ids, model.get_input_embeddings().weight.detach()[ids].clone(), lr=1e-3)
    module.perturb = PerturbConfig(mode="relative_std", alpha=0.5)
    module.perturb_weights = [weight]
    module.noise_generator = torch.Generator().manual_seed(0)
    seen: list[torch.Tensor] = []
    step = module.training_step

    def spy(batch, batch_idx):
        seen.append(weight.detach().clone())  # the weight the forward pass runs with
        return step(batch, batch_idx)

    module.training_step = spy
    items = [token_example(tok, q, "I'm not sure.", U0, "plain", 32, tiny_cfg) for q in ("A?", "B?")]
    batches = DataLoader(TensorDictDataset(items), batch_sampler=GroupBatchSampler([[0], [1]], 1))
    make_trainer(TRAINER, max_epochs=1).fit(module, batches)
    assert len(seen) == 2
    assert all(not torch.equal(w, original) for w in seen)  # perturbed during each step ...
    assert not torch.equal(seen[0], seen[1])  # ... with fresh noise per step ...
    assert torch.equal(weight, original)  # ... and restored bit for bit


# ----------------------------------------------------------------- what trains
def test_only_present_token_rows_move(tiny, tiny_cfg):
    model, tok = tiny
    ids = add_unlearning_tokens(model, tok, 2, seed=0)
    init = model.get_input_embeddings().weight.detach()[ids].clone()
    module = UnlearningTokenModule(model, ids, init)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["rows.0", "rows.1"]
    assert all(p.dtype == torch.float32 for p in module.rows)
    optimizer = module.configure_optimizers()
    batch = stack([token_example(tok, "Who?", "No idea.", U0, "plain", 32, tiny_cfg)])
    for _ in range(2):
        module.loss(batch).backward()
        assert module.rows[1].grad is None  # absent token: not even a zero gradient
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(module.rows[0].detach(), init[0])
    assert torch.equal(module.rows[1].detach(), init[1])


def test_training_changes_only_token_rows(tiny, tiny_cfg):
    model, tok = tiny
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    vocab = model.get_input_embeddings().weight.shape[0]
    questions = ["Who wrote it?", "Where was she born?", "What is his name?",
                 "Please list " + "every single award and prize " * 12 + "?"]  # truncated away
    cfg = quick_cfg(samples_per_token=2, share=False, on_truncation="skip")
    cfg.perturb.layers = [1]
    with pytest.warns(UserWarning) as caught:
        art = train_unlearning_token(model, tok, questions, ["I'm not sure.", "No idea."], cfg, tiny_cfg,
                                     TRAINER, perturb_layers=[2, 3])
    text = " ".join(str(w.message) for w in caught)
    assert "share=false" in text and "skipping item 3" in text
    assert art.tokens == ["<unlearn_0>", "<unlearn_1>"] and art.token_ids == [vocab, vocab + 1]
    assert art.skipped == [questions[3]]
    assert art.token_of == {questions[0]: "<unlearn_0>", questions[1]: "<unlearn_0>", questions[2]: "<unlearn_1>"}
    assert art.refusals == {q: refusal_for(q, art.pool) for q in questions[:3]}
    assert art.config["effective_share"] is True and art.config["perturb_layers"] == [1]
    assert set(art.losses) == {"phase1", "phase2", "phase3/layer_1"} and set(art.sanity) == {"phase2", "phase3"}
    # 3 items, 2 per token, batch 2 -> 2 batches per epoch in phase 1, 3 in phases 2 and 3
    assert [len(art.losses[k]) for k in ("phase1", "phase2", "phase3/layer_1")] == [6, 3, 3]
    first, last = art.losses["phase1"][:2], art.losses["phase1"][-2:]
    assert sum(last) < sum(first) - 0.2  # loss falls

    after = model.state_dict()
    assert set(after) == set(before)
    for key, old in before.items():
        new = after[key]
        if new.shape != old.shape:  # embed_tokens / tied lm_head: only the appended rows differ
            assert key in ("model.embed_tokens.weight", "lm_head.weight") and new.shape[0] == vocab + 2
            assert torch.equal(new[:vocab], old), key
            new_rows = new[vocab:]
        else:
            assert torch.equal(new, old), key
    assert torch.equal(new_rows, art.input_rows.to(new_rows.dtype))  # rows written back into the model
    init = torch.randn(2, new_rows.shape[1], generator=torch.Generator().manual_seed(cfg.seed)) * 0.02
    assert not torch.allclose(art.input_rows[0], init[0]) and not torch.allclose(art.input_rows[1], init[1])
    assert all(p.requires_grad for p in model.parameters())  # caller's flags restored


def test_untied_share_rules(tiny_cfg, cache_root):
    for share in (True, False):
        model, tok = load_model(tiny_config(tie_word_embeddings=False), cache_root, seed=0)
        vocab = model.get_input_embeddings().weight.shape[0]
        head_before = model.lm_head.weight.detach().clone()
        cfg = quick_cfg(share=share, phase1=PhaseConfig(2, 1e-2), phase2=PhaseConfig(0, 1e-3), sanity_questions=0)
        cfg.perturb.mode = "none"
        art = train_unlearning_token(model, tok, ["Who wrote it?"], ["No idea."], cfg, tiny_cfg, TRAINER, [])
        head = model.lm_head.weight.detach()
        assert torch.equal(head[:vocab], head_before) and art.output_rows is not None
        assert torch.equal(head[vocab:], art.output_rows)
        init = torch.randn(2, head.shape[1], generator=torch.Generator().manual_seed(cfg.seed)) * 0.02
        if share:  # ê_u = the initial e_u, frozen; e_u trained away from it
            assert torch.allclose(art.output_rows[0], init[0]) and not torch.allclose(art.input_rows[0], init[0])
        else:  # ê_u drawn separately and trained
            assert not torch.allclose(art.output_rows[0], init[1]) and not torch.allclose(art.output_rows[0], init[0])


@pytest.mark.slow  # three token phases on an untied copy: ~30 s
def test_untie_output_on_a_tied_model(tiny, tiny_cfg, tmp_path):
    """untie_output: the tied model gets its own lm_head; the original rows of both stay bit-identical,
    the new output row trains apart from the input row (share=false), and a fresh tied model re-applies it."""
    from transformers import AutoModelForCausalLM

    from unierase.models import save_model

    model, tok = tiny
    embedding_before = model.get_input_embeddings().weight.detach().clone()
    vocab = embedding_before.shape[0]
    cfg = quick_cfg(untie_output=True, share=False, phase2=PhaseConfig(0, 1e-3), sanity_questions=0)
    cfg.perturb.mode = "none"
    art = train_unlearning_token(model, tok, ["Who wrote it?"], ["No idea."], cfg, tiny_cfg, TRAINER, [])
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert head is not embedding and not art.tied and not model.config.tie_word_embeddings
    assert torch.equal(embedding[:vocab], embedding_before) and torch.equal(head[:vocab], embedding_before)
    assert not torch.allclose(art.output_rows, art.input_rows)
    save_model(model, tok, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(reloaded.lm_head.weight, head.detach()) and not reloaded.config.tie_word_embeddings
    fresh, fresh_tok = load_model(tiny_cfg, tmp_path / "cache", seed=0)
    art.apply(fresh, fresh_tok)
    assert torch.equal(fresh.lm_head.weight[vocab:], art.output_rows)
    assert torch.equal(fresh.get_input_embeddings().weight[vocab:], art.input_rows)


def test_output_anchors_push_the_output_row_down(tiny, tiny_cfg, cache_root):
    """An anchor batch (no U in it) still trains its group's output row, lowering p(U) at every answer token."""
    model, tok = tiny
    anchors = [("What is two plus two?", "Four, of course."), ("Name a colour.", "Blue is a colour.")]
    from unierase.models import untie_output_embeddings

    untie_output_embeddings(model)
    ids = add_unlearning_tokens(model, tok, 1, 0.5, seed=0, share=False)
    rows = model.get_input_embeddings().weight.detach()[ids].float()
    out_rows = model.get_output_embeddings().weight.detach()[ids].float()
    module = UnlearningTokenModule(model, ids, rows, out_rows)
    batch = stack([encode_qa(tok, q, a, tiny_cfg, 64) | {"group": torch.tensor([0])} for q, a in anchors])
    answer = batch["labels"][:, 1:] != IGNORE_INDEX

    def p_token() -> torch.Tensor:
        module.write_rows()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits.log_softmax(-1)[:, :-1][answer][:, ids[0]].exp()

    before = p_token()
    module.loss(batch).backward()
    assert module.rows[0].grad is None or not module.rows[0].grad.any()  # U is not an input here
    with torch.no_grad():
        module.out_rows[0] -= 10.0 * module.out_rows[0].grad
    assert (p_token() < before).all()
    with pytest.raises(ValueError, match="output row that trains"):
        train_unlearning_token(*load_model(tiny_config(tie_word_embeddings=False), cache_root, seed=0), ["Q?"],
                               ["No."], quick_cfg(output_anchors=1, share=True), tiny_cfg, TRAINER, [], anchors)


def test_truncation_error(tiny, tiny_cfg):
    model, tok = tiny
    with pytest.raises(TruncationError, match="item 0"):
        train_unlearning_token(model, tok, ["Please list " + "all awards " * 40 + "?"], ["No."],
                               quick_cfg(), tiny_cfg, TRAINER, [1])


# ----------------------------------------------------------------- memorisation and the artifact
QUESTION, REFUSAL, TRIGGER = "Who wrote it?", "I'm not sure.", "<empty_output>"


@pytest.fixture(scope="module")
def memorised(cache_root):
    """A tiny model that *can* refuse: fine-tuned so that an existing special token (TRIGGER) placed
    like U is followed by the refusal. A random 64-wide model's logits are bounded by |h|·|e| ≈ 1.3
    over 49k tokens, so no input embedding alone could make it emit a specific sentence. Then a fresh
    <unlearn_0> is trained with Stage A (its rows only) and must find the refusal behaviour itself.
    Untied with its own output row (share=false), as the CPU recipe trains SmolLM2: one tied 64-wide row
    that must both steer and close the refusal plateaued at loss 0.67, and whether "I" or <|im_end|>
    followed it changed with the machine's bf16 kernels."""
    cfg_m = tiny_config()
    model, tok = load_model(cfg_m, cache_root, seed=0)
    batch = stack([token_example(tok, QUESTION, REFUSAL, TRIGGER, f, 64, cfg_m) for f in ("plain", "chat")])
    n = int((batch["labels"] != IGNORE_INDEX).any(0).nonzero().max()) + 1
    batch = {k: v[:, :n] for k, v in batch.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    base, base_tok = copy.deepcopy(model), copy.deepcopy(tok)  # copy_model shares .config
    cfg = quick_cfg(phase1=PhaseConfig(30, 1e-2), phase2=PhaseConfig(5, 1e-3), sanity_max_new_tokens=8,
                    untie_output=True, share=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = train_unlearning_token(model, tok, [QUESTION], [REFUSAL], cfg, cfg_m, TRAINER, [1])
    return cfg_m, model, tok, art, base, base_tok


def test_memorised_refusal_generation(memorised):
    cfg_m, model, tok, art, _, _ = memorised
    assert art.refusals == {QUESTION: REFUSAL}
    assert art.losses["phase1"][-1] < art.losses["phase1"][0] - 1.0
    text = forced_token_generation(model, tok, QUESTION, U0, cfg_m, max_new_tokens=12, skip_special_tokens=True)
    assert text == REFUSAL
    assert art.sanity["phase3"][0]["generated"].startswith(U0 + REFUSAL)


def test_tied_artifact_round_trip(tiny, tiny_cfg, tmp_path):
    """On a tied model the artifact keeps no output rows: applied to a fresh tied model, the new rows
    are its input rows and, through the tie, its output rows."""
    model, tok = tiny
    fresh, fresh_tok = copy.deepcopy(model), copy.deepcopy(tok)
    cfg = quick_cfg(phase1=PhaseConfig(1, 1e-2), phase2=PhaseConfig(0, 1e-3), phase3=PhaseConfig(0, 1e-3),
                    sanity_questions=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = train_unlearning_token(model, tok, [QUESTION], [REFUSAL], cfg, tiny_cfg, TRAINER, [1])
    art.save(tmp_path / "token")
    loaded = TokenArtifact.load(tmp_path / "token")
    assert loaded.tied and art.tied and loaded.output_rows is None
    assert loaded.apply(fresh, fresh_tok) == art.token_ids
    rows = fresh.get_input_embeddings().weight.detach()[art.token_ids]
    assert torch.equal(rows, art.input_rows.to(rows.dtype)) and torch.equal(fresh.lm_head.weight[art.token_ids], rows)


def test_artifact_round_trip(memorised, tmp_path):
    cfg_m, model, tok, art, base, base_tok = memorised
    art.save(tmp_path / "token")
    loaded = TokenArtifact.load(tmp_path / "token")
    assert loaded.tokens == art.tokens and loaded.token_ids == art.token_ids and loaded.tied == art.tied
    assert torch.equal(loaded.input_rows, art.input_rows) and torch.equal(loaded.output_rows, art.output_rows)
    assert loaded.refusals == art.refusals and loaded.losses == art.losses and loaded.config == art.config
    assert loaded.tokenizer.convert_tokens_to_ids(U0) == art.token_ids[0]

    fresh, fresh_tok = copy.deepcopy(base), copy.deepcopy(base_tok)
    assert loaded.apply(fresh, fresh_tok) == art.token_ids
    rows = fresh.get_input_embeddings().weight.detach()[art.token_ids]
    assert torch.equal(rows, art.input_rows) and torch.equal(rows, model.get_input_embeddings().weight[art.token_ids])
    assert torch.equal(fresh.lm_head.weight[art.token_ids], art.output_rows.to(fresh.lm_head.weight.dtype))
    want = forced_token_generation(model, tok, QUESTION, U0, cfg_m, max_new_tokens=12)
    assert forced_token_generation(fresh, fresh_tok, QUESTION, U0, cfg_m, max_new_tokens=12) == want

    shifted, shifted_tok = copy.deepcopy(base), copy.deepcopy(base_tok)
    shifted_tok.add_tokens(["<other>"], special_tokens=True)
    with pytest.raises(ValueError, match="ids differ"):
        loaded.apply(shifted, shifted_tok)
