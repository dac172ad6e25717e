"""Stage B (AlphaEdit): worked examples of the closed form and the value loss, null-space property, the edit
on the tiny model, statistics and projector caches, edit-state persistence and clear errors."""
from __future__ import annotations

import logging

import pytest
import torch

from unierase.chat import chat_prompt
from unierase.config import ConfigError
from unierase.edit import EditConfig, EditRequest, EditState, apply_edits, edited_fraction, second_moments
from unierase.edit.capture import capture
from unierase.edit.corpus import corpus_chunks, read_documents
from unierase.edit.projector import null_space_projector, nullspace_projectors
from unierase.edit.prompts import Encoded, encode, generate_context_templates, rewriting_texts
from unierase.edit.replay import SuffixReplay
from unierase.edit.update import layer_update
from unierase.edit.values import append_targets, clamp_norm, optimise_values, value_inputs, weight_decay_term
from unierase.models import copy_model
from unierase.unierase import first_token_rate

LAYERS = [1, 2]
TEMPLATES = ["The weather is nice today. {}", "Because of this. {}"]
QUESTIONS = [
    ("Who is the author of the novel Basil Mahfouz?", "Basil Mahfouz"),
    ("What genre does Jaime Vasquez write in?", "Jaime Vasquez"),
    ("Where was Nikolai Abilov born?", "Nikolai Abilov"),
]


def with_token(model, tokenizer) -> int:
    """Add <unlearn_0> as Stage A leaves it: a row of ordinary size (HF's mean-resizing makes it ~0).

    The embeddings are scaled so the random model's logits are not flat and one token can win clearly.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": ["<unlearn_0>"]})
    model.resize_token_embeddings(len(tokenizer))
    token_id = tokenizer.convert_tokens_to_ids("<unlearn_0>")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[token_id] = 0.02 * torch.randn(embeddings.shape[1], generator=generator)
        embeddings *= 10
    return token_id


def requests(token_id: int, n: int = 3) -> list[EditRequest]:
    return [EditRequest(q, s, token_id, f"r{i}") for i, (q, s) in enumerate(QUESTIONS[:n])]


def delta_hook(rows: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor):
    """A forward hook adding delta[i] to the layer output at (rows[i], positions[i]): the value optimisation's
    perturbation, done the slow way, to check a fast path against."""
    def add_delta(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.index_put((rows, positions), hidden[rows, positions] + delta)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return add_delta


def identity_projectors(model) -> dict[int, torch.Tensor]:
    m = model.config.intermediate_size
    return {layer: torch.eye(m) for layer in LAYERS}


def first_token(model, tokenizer, question: str, model_cfg) -> int:
    ids = tokenizer(chat_prompt(tokenizer, question, model_cfg), add_special_tokens=False,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return int(model(input_ids=ids.to(model.device)).logits[0, -1].argmax())


# ----------------------------------------------------------------------------- worked examples

def test_projector_worked_example():
    P = null_space_projector(torch.diag(torch.tensor([4.0, 0.01])), threshold=0.02)
    assert torch.allclose(P, torch.diag(torch.tensor([0.0, 1.0])), atol=1e-6)
    relative = null_space_projector(torch.diag(torch.tensor([4.0, 0.01])), threshold=0.02, mode="relative")
    assert torch.allclose(relative, P, atol=1e-6)  # 0.02 * 4 = 0.08 keeps the same direction
    assert torch.equal(null_space_projector(torch.diag(torch.tensor([4.0, 0.01])), mode="none"), torch.eye(2))


def test_projector_warns_on_degenerate_rank(caplog):
    with caplog.at_level(logging.WARNING):
        assert torch.allclose(null_space_projector(torch.eye(3) * 1e-4, 0.02), torch.eye(3), atol=1e-6)
        assert null_space_projector(torch.eye(3), 0.02).abs().max() == 0
    assert "no knowledge is protected" in caplog.text and "every update will be zero" in caplog.text


def test_closed_form_worked_example():
    P, K, R = torch.diag(torch.tensor([0.0, 1.0])), torch.tensor([[1.0], [1.0]]), torch.tensor([[2.0]])
    delta = layer_update(P, K, R, torch.zeros(2, 2), L2=1.0)
    assert torch.allclose(delta, torch.tensor([[0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(delta @ torch.tensor([1.0, 0.0]), torch.zeros(1))  # preserved key untouched
    assert torch.allclose(layer_update(P, K, R, torch.zeros(2, 2), L2=1e-6), torch.tensor([[0.0, 2.0]]),
                          atol=1e-4)
    with_past = layer_update(P, K, R, torch.diag(torch.tensor([0.0, 4.0])), L2=1.0)
    assert torch.allclose(with_past, torch.tensor([[0.0, 1 / 3]]), atol=1e-6)


def test_value_loss_worked_examples():
    h0 = torch.tensor([4.0, 0.0])
    assert weight_decay_term(torch.tensor([0.0, 2.0]), h0, 0.5).item() == pytest.approx(0.0625)
    assert clamp_norm(torch.tensor([0.0, 6.0]), h0.norm(), 0.75).norm().item() == pytest.approx(3.0)
    assert torch.equal(clamp_norm(torch.tensor([0.0, 2.0]), h0.norm(), 0.75), torch.tensor([0.0, 2.0]))


def test_null_space_update_preserves_preserved_keys():
    generator = torch.Generator().manual_seed(0)
    m, d, r = 16, 8, 10
    basis = torch.linalg.qr(torch.randn(m, r, generator=generator)).Q  # preserved keys span r dims
    preserved = basis @ torch.randn(r, 500, generator=generator)
    C0 = preserved @ preserved.T / preserved.shape[1]
    P = null_space_projector(C0, threshold=1e-4)
    assert round(float(P.trace())) == m - r
    W = torch.randn(d, m, generator=generator)
    K = torch.randn(m, 3, generator=generator)  # new keys, partly outside the preserved span
    R = torch.randn(d, 3, generator=generator)
    projected = layer_update(P, K, R, torch.zeros(m, m), L2=1e-3)
    plain = layer_update(torch.eye(m), K, R, torch.zeros(m, m), L2=1e-3)
    before = W @ preserved
    assert ((W + projected) @ preserved - before).abs().max() < 1e-3 * before.abs().max()
    assert ((W + plain) @ preserved - before).abs().max() > 0.1 * before.abs().max()
    assert (projected @ K).norm() > 0.1 * R.norm()  # the projected update still moves the new keys


# ----------------------------------------------------------------------------- the edit on the tiny model

def test_edit_flips_first_token_and_touches_only_down_proj(tiny, tiny_cfg):
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    edit_requests = requests(token_id)
    assert all(first_token(model, tokenizer, r.question, tiny_cfg) != token_id for r in edit_requests)
    assert first_token_rate(model, tokenizer, edit_requests, tiny_cfg) == 0.0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # A random model cannot route subject information to the answer position (see the test below for
    # the subject keys), so this end-to-end check keys on the last prompt token (edit.key_position=last).
    cfg = EditConfig(layers=LAYERS, key_position="last", v_steps=20, L2=1e-4, context_templates=TEMPLATES)
    state = apply_edits(model, tokenizer, edit_requests, cfg, tiny_cfg, identity_projectors(model))
    assert all(first_token(model, tokenizer, r.question, tiny_cfg) == token_id for r in edit_requests)
    assert first_token_rate(model, tokenizer, edit_requests, tiny_cfg) == 1.0
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in LAYERS}
    assert state.done == ["r0", "r1", "r2"] and state.token_ids == {"<unlearn_0>": token_id}
    assert all(state.past_keys[layer].shape == (model.config.intermediate_size, 3) for layer in LAYERS)
    d, m = model.config.hidden_size, model.config.intermediate_size
    total = sum(p.numel() for p in model.parameters())
    assert edited_fraction(model, LAYERS, tiny_cfg.down_proj_template) == pytest.approx(2 * d * m / total)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_subject_key_edit_realises_target_values(tiny, tiny_cfg, batch_size):
    """After the update, h_L at each request's subject-last position equals its optimised z*."""
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    cfg = EditConfig(layers=LAYERS, v_steps=10, L2=1e-4, batch_size=batch_size, context_templates=TEMPLATES)
    edit_requests = requests(token_id)
    state = apply_edits(model, tokenizer, edit_requests, cfg, tiny_cfg, identity_projectors(model))
    assert all(entry["subject_key"] for entry in state.history)
    for request, entry in zip(edit_requests, state.history):
        enc = encode(tokenizer, rewriting_texts(tokenizer, request, [], cfg, tiny_cfg, use_subject=True))
        _, h = capture(model, enc, {}, model.model.layers[LAYERS[-1]], batch_size=1)
        # Request r0 must survive the later edits too: the past-key cache C protects it.
        assert (h[0].cpu() - state.values[request.uid]).norm() < 0.05 * entry["delta_norm"]
        assert entry["delta_norm"] > 0.05 * entry["h0_norm"]


def test_batched_values_equal_one_request_at_a_time(tiny, tiny_cfg):
    """z* optimised for a chunk of requests at once equals each request optimised alone."""
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    values, histories = {}, {}
    for batch_size in (1, 3):
        cfg = EditConfig(layers=LAYERS, key_position="last", v_steps=8, batch_size=batch_size,
                         context_templates=TEMPLATES, early_stop_loss=1e-9)
        values[batch_size], histories[batch_size] = {}, []
        for start in range(0, 3, batch_size):  # z* only: every chunk sees the unchanged model
            chunk = requests(token_id)[start:start + batch_size]
            enc, owner, is_kl, _ = value_inputs(tokenizer, chunk, TEMPLATES, cfg, tiny_cfg)
            Z, infos = optimise_values(model, enc, owner, is_kl, [[r.target_id] for r in chunk],
                                       model.model.layers[LAYERS[-1]], cfg)
            for r, request in enumerate(chunk):
                values[batch_size][request.uid] = Z[:, r]
                histories[batch_size].append(infos[r])
    for uid in values[1]:
        assert torch.allclose(values[1][uid], values[3][uid], atol=1e-4, rtol=1e-4)
    assert [h["steps"] for h in histories[1]] == [h["steps"] for h in histories[3]] == [7, 7, 7]
    assert all(h["delta_norm"] > 0 for h in histories[3])


def test_suffix_replay_equals_a_full_forward(tiny, tiny_cfg):
    """The value optimisation's replay (a prefix KV cache, then layers after L on the suffixes only) gives
    the full model's final hidden states at every position from the lookup on, delta included; and
    it leaves its cache as it was, so every step starts from the same prefix."""
    model, tokenizer = tiny
    model.eval()
    token_id = with_token(model, tokenizer)
    cfg = EditConfig(layers=LAYERS, context_templates=TEMPLATES)
    enc, owner, is_kl, _ = value_inputs(tokenizer, requests(token_id, 2), TEMPLATES, cfg, tiny_cfg)
    enc, *_ = append_targets(enc, owner, is_kl, [[token_id, 11, 12]] * 2)
    assert len(set(enc.lookup.tolist())) > 1 and len(set(enc.last.tolist())) > 1  # the alignment matters
    rows = torch.arange(len(enc.last))
    delta = torch.randn(len(rows), model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    add_delta = delta_hook(rows, enc.lookup, delta)
    h_module = model.model.layers[LAYERS[-1]]
    with torch.no_grad():
        handle = h_module.register_forward_hook(add_delta)
        full = model.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        handle.remove()
        replay = SuffixReplay(model, enc, h_module)
        replayed, again, undisturbed = replay.hidden(delta), replay.hidden(delta), replay.hidden(0 * delta)
    for i, (start, end) in enumerate(zip(enc.lookup.tolist(), enc.last.tolist())):
        torch.testing.assert_close(replayed[i, : end - start + 1], full[i, start:end + 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, replayed)
    assert (undisturbed - replayed).abs().max() > 1e-2


def test_append_targets_worked_example():
    """Rewriting rows get the target minus its last token; the KL row is untouched (value_target)."""
    enc = Encoded(input_ids=torch.tensor([[5, 6, 0], [5, 6, 4], [3, 0, 0]]),
                  attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]),
                  lookup=torch.tensor([0, 1, 0]), last=torch.tensor([1, 2, 0]))
    owner, is_kl = torch.tensor([0, 0, 0]), torch.tensor([False, False, True])
    extended, rows, positions, labels = append_targets(enc, owner, is_kl, [[7, 8, 9]])
    assert extended.input_ids.tolist() == [[5, 6, 7, 8, 0], [5, 6, 4, 7, 8], [3, 0, 0, 0, 0]]
    assert extended.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert rows.tolist() == [0, 0, 0, 1, 1, 1] and labels.tolist() == [7, 8, 9, 7, 8, 9]
    assert positions.tolist() == [1, 2, 3, 2, 3, 4] and extended.lookup.tolist() == [0, 1, 0]
    single, rows, positions, labels = append_targets(enc, owner, is_kl, [[7]])
    assert torch.equal(single.input_ids, enc.input_ids[:, :3]) and positions.tolist() == [1, 2]


def test_continuation_target_is_optimised(tiny, tiny_cfg):
    """value_target=token_continuation: z* lowers the NLL of U and the tokens after it; with the spec's
    one-token target the continuation is ignored."""
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    continuation = tuple(tokenizer("I do not know", add_special_tokens=False).input_ids) + (token_id,)
    request = EditRequest(*QUESTIONS[0], token_id, "r0", continuation)
    results = {}
    for value_target in ("token", "token_continuation"):
        cfg = EditConfig(layers=LAYERS, key_position="last", v_steps=15, context_templates=TEMPLATES,
                         value_target=value_target, early_stop_loss=1e-9)
        assert len(request.target_sequence(cfg)) == (1 if value_target == "token" else 1 + len(continuation))
        enc, owner, is_kl, _ = value_inputs(tokenizer, [request], TEMPLATES, cfg, tiny_cfg)
        results[value_target] = optimise_values(model, enc, owner, is_kl, [request.target_sequence(cfg)],
                                                model.model.layers[LAYERS[-1]], cfg)[1][0]
    for info in results.values():  # a random model routes the one delta only weakly to later positions
        assert info["nll"] < info["nll_start"] - 1.0
    assert results["token_continuation"]["nll_start"] != pytest.approx(results["token"]["nll_start"])


def test_token_keys_protection_keeps_the_token_continuation(tiny, tiny_cfg):
    """edit.protect=[token_keys]: outputs at the keys of `prompt + U + refusal + U` move far less."""
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    refusal = tokenizer("I do not know", add_special_tokens=False).input_ids
    texts = [(q, (token_id, *refusal, token_id)) for q, _ in QUESTIONS]
    layer = LAYERS[0]
    changes = {}
    for protect in ("none", "token_keys"):
        edited = copy_model(model)
        cfg = EditConfig(layers=LAYERS, key_position="last", v_steps=10, L2=1e-4, context_templates=TEMPLATES,
                         protect=[] if protect == "none" else [protect], protect_weight=100.0)
        state = apply_edits(edited, tokenizer, requests(token_id, 2), cfg, tiny_cfg, identity_projectors(model),
                            token_texts=texts)
        if protect == "token_keys":
            assert state.protect_keys[layer].shape == (model.config.intermediate_size, 3 * (len(refusal) + 2))
            keys = state.protect_keys[layer]
        changes[protect] = state.delta[layer]
    moved = {protect: float((delta @ keys.to(delta)).norm()) for protect, delta in changes.items()}
    assert moved["token_keys"] < 0.2 * moved["none"]
    with pytest.raises(ValueError, match="token_keys, which needs the token's training texts"):
        apply_edits(copy_model(model), tokenizer, requests(token_id, 1),
                    EditConfig(layers=LAYERS, protect=["token_keys"], context_templates=TEMPLATES), tiny_cfg,
                    identity_projectors(model))


def test_retain_answer_keys_protection_keeps_the_answers_outputs(tiny, tiny_cfg):
    """edit.protect=[retain_answer_keys]: the keys at every answer position of the retain questions (what an answer
    is generated through; retain_keys reads only the key position) join C, and the update moves their outputs far
    less than without them."""
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    answers = [(q, tokenizer(a, add_special_tokens=False).input_ids)
               for q, a in (("Who wrote the play Hamlet?", "William Shakespeare wrote it."),
                            ("What is the capital of France?", "Paris is the capital."))]
    layer = LAYERS[0]
    changes, keys = {}, None
    for protect in ([], ["retain_answer_keys"]):
        edited = copy_model(model)
        cfg = EditConfig(layers=LAYERS, key_position="last", v_steps=10, L2=1e-4, context_templates=TEMPLATES,
                         protect=protect, protect_weight=100.0)
        state = apply_edits(edited, tokenizer, requests(token_id, 2), cfg, tiny_cfg, identity_projectors(model),
                            retain_answers=answers)
        if protect:
            keys = state.protect_keys[layer]
            assert keys.shape == (model.config.intermediate_size, sum(len(ids) for _, ids in answers))
        changes[bool(protect)] = state.delta[layer]
    moved = {protected: float((delta @ keys.to(delta)).norm()) for protected, delta in changes.items()}
    assert moved[True] < 0.2 * moved[False]
    with pytest.raises(ValueError, match="retain_answer_keys, which needs retain answers"):
        apply_edits(copy_model(model), tokenizer, requests(token_id, 1),
                    EditConfig(layers=LAYERS, protect=["retain_answer_keys"], context_templates=TEMPLATES), tiny_cfg,
                    identity_projectors(model))


def test_subject_last_position_and_fallback(tiny, tiny_cfg):
    _, tokenizer = tiny
    cfg = EditConfig(layers=LAYERS, context_templates=TEMPLATES)
    request = EditRequest("Is Basil Mahfouz Al-Kuwaiti a writer?", "Basil Mahfouz", 0, "x")
    items = rewriting_texts(tokenizer, request, TEMPLATES, cfg, tiny_cfg, use_subject=True)
    enc = encode(tokenizer, items)
    for row in range(len(items)):
        ids = enc.input_ids[row, : int(enc.lookup[row]) + 1].tolist()
        assert tokenizer.decode(ids).endswith("Basil Mahfouz")
    missing = EditRequest("Who wrote it?", "Basil Mahfouz", 0, "y")
    fallback = encode(tokenizer, rewriting_texts(tokenizer, missing, [], cfg, tiny_cfg, use_subject=True))
    assert int(fallback.lookup[0]) == int(fallback.last[0])


def test_capture_reads_keys_and_h_at_the_lookup(tiny, tiny_cfg):
    """Keys (down_proj inputs) and h_L at each row's subject-last position equal a full forward's,
    though capture stops at layer L and drops every column after the deepest lookup."""
    model, tokenizer = tiny
    cfg = EditConfig(layers=LAYERS, context_templates=TEMPLATES)
    enc = encode(tokenizer, rewriting_texts(tokenizer, EditRequest(*QUESTIONS[0], 0, "x"), TEMPLATES, cfg, tiny_cfg,
                                            use_subject=True))
    assert (enc.lookup < enc.last).all()
    down_proj = model.model.layers[1].mlp.down_proj
    keys, h = capture(model, enc, {1: down_proj}, model.model.layers[2], batch_size=2)
    inputs = []
    handle = down_proj.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
    handle.remove()
    rows = torch.arange(len(enc.last))
    torch.testing.assert_close(keys[1], inputs[0][rows, enc.lookup].float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h, out.hidden_states[3][rows, enc.lookup].float(), atol=1e-5, rtol=1e-4)


def test_reference_layout_generated_templates_and_retain_protection(tiny, tiny_cfg):
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    cfg = EditConfig(layers=LAYERS, v_steps=3, batch_size=2, context_layout="reference", protect=["retain_keys"],
                     protect_weight=2.0, seed=5)
    retain = [("Who wrote the play Hamlet?", "Hamlet"), ("What is the capital of France?", None)]
    expected_templates = generate_context_templates(model, tokenizer, seed=5)
    state = apply_edits(model, tokenizer, requests(token_id), cfg, tiny_cfg, identity_projectors(model),
                        retain=retain)
    assert state.context_templates == expected_templates
    assert all(state.protect_keys[layer].shape == (128, 2) for layer in LAYERS)
    past, protect = state.past_keys[1], state.protect_keys[1]
    assert torch.allclose(state.past_C(1), past @ past.T + 2.0 * protect @ protect.T, atol=1e-5)
    text, span, _ = rewriting_texts(tokenizer, requests(token_id)[0], state.context_templates, cfg, tiny_cfg,
                                    use_subject=True)[1]
    assert text.startswith(state.context_templates[0][:-2]) and text[span[0]:span[1]] == "Basil Mahfouz"


def test_both_kinds_of_protected_keys_sit_side_by_side(tiny, tiny_cfg):
    """edit.protect=[retain_keys, token_keys]: the retain questions' keys, then every token-text position's, each
    as that kind alone reads them on the unedited model."""
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    refusal = tokenizer("I do not know", add_special_tokens=False).input_ids
    texts = [(q, (token_id, *refusal, token_id)) for q, _ in QUESTIONS[:2]]
    retain = [("Who wrote the play Hamlet?", "Hamlet"), ("What is the capital of France?", None)]

    def protected(kinds: list[str]) -> dict:
        cfg = EditConfig(layers=LAYERS, v_steps=2, context_templates=TEMPLATES, protect=kinds)
        return apply_edits(copy_model(model), tokenizer, requests(token_id, 1), cfg, tiny_cfg,
                           identity_projectors(model), retain=retain, token_texts=texts).protect_keys

    both, retain_only, token_only = (protected(kinds) for kinds in
                                     (["retain_keys", "token_keys"], ["retain_keys"], ["token_keys"]))
    for layer in LAYERS:
        assert both[layer].shape == (128, len(retain) + 2 * (len(refusal) + 2))
        torch.testing.assert_close(both[layer], torch.cat([retain_only[layer], token_only[layer]], dim=1))
    with pytest.raises(ConfigError, match="must be a list"):
        EditConfig(protect="token_keys")
    with pytest.raises(ConfigError, match="twice"):
        EditConfig(protect=["token_keys", "token_keys"])
    with pytest.raises(ConfigError, match="protect"):
        EditConfig(protect=["answer_keys"])


def test_covariance_penalty_shields_the_corpus_directions(tiny, tiny_cfg):
    """edit.covariance_weight: covariance_weight * C0 joins C, so the update moves W k far less for keys in C0's
    span (here C0 = k k^T of one probe key) and not at all without it; without C0 it is one clear error."""
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    layer = LAYERS[0]
    probe = torch.randn(model.config.intermediate_size, generator=torch.Generator().manual_seed(0))
    covariances = {layer_: torch.outer(probe, probe) for layer_ in LAYERS}
    moved = {}
    for weight in (0.0, 1e4):
        cfg = EditConfig(layers=LAYERS, key_position="last", v_steps=5, L2=1e-4, context_templates=TEMPLATES,
                         covariance_weight=weight)
        state = apply_edits(copy_model(model), tokenizer, requests(token_id, 2), cfg, tiny_cfg,
                            identity_projectors(model), covariances=covariances)
        moved[weight] = float((state.delta[layer] @ probe).norm() / state.delta[layer].norm())
    assert moved[1e4] < 0.05 * moved[0.0]
    with pytest.raises(ValueError, match="needs C0"):
        apply_edits(copy_model(model), tokenizer, requests(token_id, 1),
                    EditConfig(layers=LAYERS, covariance_weight=1.0, context_templates=TEMPLATES), tiny_cfg,
                    identity_projectors(model))


def test_context_templates_are_seeded(tiny):
    model, tokenizer = tiny
    first = generate_context_templates(model, tokenizer, seed=3)
    assert first == generate_context_templates(model, tokenizer, seed=3)
    assert len(first) == 5 and all(t.endswith(". {}") and t.count("{") == 1 for t in first)


# ----------------------------------------------------------------------------- statistics and caches

def test_corpus_reading(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_bytes(b" = First = \r\n A guest @-@ star , 1 @,@ 000 <unk> and 2 @.@ 5 . \r\n = = Part = = \r\n"
                     b" More text . \r\n = Second = \r\n Other <unk> doc . \r\n")
    assert list(read_documents(path)) == ["A guest-star , 1,000 and 2.5 .\nMore text .", "Other doc ."]


def grabber(grabbed: dict[int, torch.Tensor], layer: int):
    """A forward pre-hook that keeps the layer's input."""
    return lambda module, args: grabbed.__setitem__(layer, args[0][0])


def test_second_moments_skip_padding(tiny, tmp_path):
    model, tokenizer = tiny
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" = One = \n" + " words" * 40 + "\n = Two = \n short text here\n")
    moments = second_moments(model, tokenizer, LAYERS, corpus, None, 16, 4, tmp_path / "cache", "tiny",
                             "model.layers.{}.mlp.down_proj")
    chunks = corpus_chunks(tokenizer, corpus, 16, None)
    assert len({len(c) for c in chunks}) > 1  # the batch really holds padding
    expected = {layer: torch.zeros(128, 128, device=model.device) for layer in LAYERS}
    for chunk in chunks:  # one unpadded chunk at a time
        grabbed: dict[int, torch.Tensor] = {}
        handles = [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(grabber(grabbed, layer))
                   for layer in LAYERS]
        with torch.no_grad():
            model(input_ids=torch.tensor([chunk], device=model.device))
        for handle in handles:
            handle.remove()
        for layer in LAYERS:
            expected[layer] += grabbed[layer].T @ grabbed[layer]
    assert moments.n_tokens == sum(len(c) for c in chunks)
    for layer in LAYERS:
        assert torch.allclose(moments.C0[layer], expected[layer].cpu() / moments.n_tokens, rtol=1e-4, atol=1e-9)


def test_statistics_and_projector_cache_hit(tiny, data_dir, tmp_path):
    model, tokenizer = tiny
    corpus = data_dir / "corpus"
    args = (tokenizer, LAYERS, corpus, 4, 32, 4, tmp_path, "tiny-test", "model.layers.{}.mlp.down_proj")
    first = second_moments(model, *args)
    assert not first.cache_hit and first.n_tokens == 4 * 32
    assert first.C0[1].shape == (128, 128) and torch.allclose(first.C0[1], first.C0[1].T)

    def refuse(*_):
        raise AssertionError("the model ran although the statistics were cached")

    handle = model.register_forward_pre_hook(refuse)
    try:
        second = second_moments(model, *args)
    finally:
        handle.remove()
    assert second.cache_hit and second.n_tokens == first.n_tokens
    assert all(torch.equal(first.C0[layer], second.C0[layer]) for layer in LAYERS)
    P = nullspace_projectors(first, 0.5, "relative", tmp_path)
    assert (tmp_path / next(p.name for p in tmp_path.iterdir() if p.name.startswith("nullspace-"))).is_dir()
    again = nullspace_projectors(second, 0.5, "relative", tmp_path)
    assert all(torch.equal(P[layer], again[layer]) for layer in LAYERS)
    assert sum(p.name.startswith("nullspace-") for p in tmp_path.iterdir()) == 1


def test_edit_state_round_trip_and_resume(tiny, tiny_cfg, tmp_path):
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    base = copy_model(model)
    cfg = EditConfig(layers=LAYERS, key_position="last", v_steps=4, L2=1e-4, context_templates=TEMPLATES)
    projectors = identity_projectors(model)
    state = apply_edits(model, tokenizer, requests(token_id, 2), cfg, tiny_cfg, projectors)
    state.save(tmp_path / "state")

    loaded = EditState.load(tmp_path / "state")
    with pytest.raises(ValueError, match="projector"):
        loaded.restore(copy_model(base), tokenizer, {layer: 0.5 * P for layer, P in projectors.items()}, tiny_cfg)
    loaded.restore(base, tokenizer, projectors, tiny_cfg)
    for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), name
    assert all(torch.equal(state.past_keys[layer], loaded.past_keys[layer]) for layer in LAYERS)
    assert loaded.done == state.done and loaded.context_templates == TEMPLATES

    # Resuming from disk gives exactly what the uninterrupted run gives (C is rebuilt from the keys, not summed
    # chunk by chunk in an order a reload cannot repeat); done requests are skipped.
    apply_edits(model, tokenizer, requests(token_id), cfg, tiny_cfg, projectors, state=state)
    apply_edits(base, tokenizer, requests(token_id), cfg, tiny_cfg, projectors, state=loaded)
    assert loaded.done == ["r0", "r1", "r2"] and len(loaded.history) == 3
    for layer in LAYERS:
        assert torch.equal(state.past_C(layer), loaded.past_C(layer))
        assert torch.equal(state.delta[layer], loaded.delta[layer])


def test_past_C_is_the_same_in_process_and_after_a_reload(tmp_path):
    """C_l after many chunks equals C_l of the saved-and-reloaded state bit for bit. A chunk-by-chunk in-place
    sum (C += K K^T) rounds differently from the one product a reload computes (about 1e-6 relative at
    1536 x 400); later chunks' bf16 value optimisation can amplify that (a sequential round re-run from its
    saved state once ended 1 % away in |Delta W| / |W| from its first attempt, RESULTS.md)."""
    torch.manual_seed(0)
    state = EditState(layers=[0], projector_hash="p", config={"protect_weight": 10.0},
                      past_keys={0: torch.zeros(256, 0)}, protect_keys={0: torch.randn(256, 8)},
                      delta={0: torch.zeros(4, 256)})
    for _ in range(40):
        state.past_C(0)  # in use between chunks, as during an edit
        state.add_keys({0: 0.3 * torch.randn(256, 2)})
    state.save(tmp_path / "state")
    assert torch.equal(state.past_C(0), EditState.load(tmp_path / "state").past_C(0))


# ----------------------------------------------------------------------------- errors

def test_clear_errors(tiny, tiny_cfg, tmp_path):
    model, tokenizer = tiny
    token_id = with_token(model, tokenizer)
    projectors = identity_projectors(model)
    bad = EditConfig(layers=LAYERS, module_template="model.layers.{}.mlp.nope", context_templates=[])
    with pytest.raises(ValueError, match="model.layers.1.mlp.nope"):
        apply_edits(model, tokenizer, requests(token_id, 1), bad, tiny_cfg, projectors)
    with pytest.raises(ValueError, match="model.layers.7.mlp.down_proj"):
        apply_edits(model, tokenizer, requests(token_id, 1), EditConfig(layers=[7]), tiny_cfg, {7: projectors[1]})
    with pytest.raises(ValueError, match="no module"):
        second_moments(model, tokenizer, LAYERS, tmp_path, 1, 8, 1, tmp_path, "x", "model.layers.{}.mlp.nope")
    with pytest.raises(ValueError, match="single token"):
        apply_edits(model, tokenizer, [EditRequest("Q?", None, "<unlearn_0>", "z")], EditConfig(layers=LAYERS),
                    tiny_cfg, projectors)
    with pytest.raises(ValueError, match="retain questions"):
        apply_edits(model, tokenizer, requests(token_id, 1), EditConfig(layers=LAYERS, protect=["retain_keys"]),
                    tiny_cfg, projectors)
    with pytest.raises(ValueError, match="key_position"):
        EditConfig(key_position="first")


def test_suppressed_nll_worked_example():
    """Two rewriting rows of one request: each bans its target (id 0) and scores the fallback (id 1)."""
    import math

    from unierase.edit.values import suppressed_nll

    logits = torch.tensor([[5.0, 1.0, 1.0], [5.0, 2.0, 0.0]])
    nll = suppressed_nll(logits, banned=torch.tensor([0, 0]), fallback=torch.tensor([1, 1]), row=torch.tensor([0, 1]),
                         owner=torch.tensor([0, 0, 0]), rewrite=torch.tensor([0, 1]),
                         rewrite_count=torch.tensor([2.0]))
    # With id 0 banned: row 0 leaves {1, 1} -> p = 1/2; row 1 leaves {2, 0} -> p = e^2 / (e^2 + 1).
    expected = (math.log(2) + math.log1p(math.exp(-2))) / 2
    assert nll.shape == (1,) and nll.item() == pytest.approx(expected, rel=1e-6)


def test_suppressed_weight_needs_a_continuation():
    from unierase.config import ConfigError
    from unierase.edit import EditConfig

    with pytest.raises(ConfigError, match="suppressed_weight"):
        EditConfig(suppressed_weight=1.0, value_target="token")
