"""Other model families next to Llama (Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3), as tiny random models with
the SmolLM2 tokenizer (`model.family`): where each keeps the matrices the edit changes, the embedding and logits
quirks the token and the edit must reproduce, chat templates without a system role or with thinking, and token +
edit, a baseline and the evaluation end to end. Real checkpoints (conf/model/) are never downloaded here."""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CACHE_ROOT, tiny_config
from jinja2 import TemplateError
from test_edit import LAYERS, TEMPLATES, delta_hook, first_token, identity_projectors, requests
from test_pipeline import TINY_UNIERASE, isolated_cache, run_job
from transformers import AutoTokenizer

from unierase.chat import (
    IGNORE_INDEX,
    accepts_system_role,
    chat_prompt,
    chat_text,
    encode_qa,
    end_of_turn_ids,
    turn_end_id,
)
from unierase.edit import EditConfig, apply_edits
from unierase.edit.replay import SuffixReplay
from unierase.edit.values import append_targets, value_inputs
from unierase.finetune import answer_loss
from unierase.models import (
    TINY_FAMILIES,
    ModelConfig,
    base_identity,
    check_output_logits,
    decoder_body,
    embedding_scale,
    kv_cache_name,
    load_model,
    load_saved,
    module_by_name,
)
from unierase.token.examples import token_example
from unierase.token.module import UnlearningTokenModule
from unierase.token.vocabulary import add_unlearning_tokens, is_tied
from unierase.training import pad_batch
from unierase.unierase import first_token_rate

# What each tiny model takes from its family's instruct checkpoint (conf/model/): untied embeddings for Mistral
# and Phi-3 (the others tie them, like the tiny Llama), eager attention for Gemma 2 (transformers has no sdpa
# with soft-capping), and where the architecture has sliding-window attention a window shorter than the prompts,
# so those layers really differ from global ones (Gemma 3 alternates them here; its 1:5 pattern needs six layers).
FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {"tiny": {"tie_word_embeddings": False, "sliding_window": 16}},
    "gemma2": {"attn_implementation": "eager", "tiny": {"sliding_window": 16}},
    "gemma3": {"tiny": {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"] * 2}},
    "phi3": {"tiny": {"tie_word_embeddings": False}},
}
assert set(FAMILIES) == set(TINY_FAMILIES)
# A soft cap near the tiny model's logit scale (std ~0.16), so capping changes the loss; Gemma 2's own is 30.
LOW_CAP = {"final_logit_softcapping": 0.2}
QA_ROWS = [("Who wrote the novel Basil Mahfouz?", "Basil Mahfouz Al-Kuwaiti wrote it."),
           ("Where was Nikolai Abilov born?", "He was born in Astana, Kazakhstan.")]

# google/gemma-2-2b-it's chat template: it rejects a system turn.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# A template that silently drops a system turn.
DROPPING_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>assistant\n' }}{% endif %}"
)
# Qwen3's thinking switch, reduced: a final assistant turn carries an empty think block, and so does the
# generation prompt only with enable_thinking=false.
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


def family_config(family: str, **tiny) -> ModelConfig:
    spec = FAMILIES[family]
    return ModelConfig(**{**dataclasses.asdict(tiny_config()), "family": family,
                          "attn_implementation": spec.get("attn_implementation", "sdpa"),
                          "tiny": {**spec.get("tiny", {}), **tiny}})


def family_overrides(family: str) -> list[str]:
    """The Hydra overrides that make `experiment=smoke`'s tiny model this family's (four layers)."""
    spec = FAMILIES[family]

    def value(v) -> str:
        return f"[{','.join(v)}]" if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)

    tiny = {"num_hidden_layers": 4, **spec.get("tiny", {})}
    return [f"model.family={family}", f"model.attn_implementation={spec.get('attn_implementation', 'sdpa')}",
            *(f"++model.tiny.{key}={value(v)}" for key, v in tiny.items())]


def with_token(model, tokenizer) -> int:
    """test_edit's <unlearn_0>, with an output row on untied models too (a copy of the input row, as Stage A's
    share=true leaves it), and both embeddings scaled so that one token can win clearly."""
    (token_id,) = add_unlearning_tokens(model, tokenizer, 1, seed=1)
    with torch.no_grad():
        for weight in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            weight *= 10
    return token_id


def qa_batch(tokenizer, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return pad_batch([encode_qa(tokenizer, q, a, cfg, 96, pad=False) for q, a in QA_ROWS])


# ----------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_keeps_its_edited_matrices_where_the_templates_say(family):
    """Every family's down_proj is found by the default templates, is MLP-width in and hidden-width out, and is
    the MLP's last step (the key it reads is the MLP's activation: Phi-3's fused gate_up_proj included)."""
    cfg = family_config(family)
    model, _ = load_model(cfg, CACHE_ROOT)
    config = model.config
    assert config.model_type == TINY_FAMILIES[family]().model_type
    assert is_tied(model) == FAMILIES[family].get("tiny", {}).get("tie_word_embeddings", True)
    assert kv_cache_name(model) in inspect.signature(model.forward).parameters
    layers = decoder_body(model).layers
    for i in range(config.num_hidden_layers):
        layer = module_by_name(model, cfg.layer_template.format(i))
        down = module_by_name(model, cfg.down_proj_template.format(i))
        assert layer is layers[i] and any(module is down for module in layer.modules())
        assert (down.in_features, down.out_features) == (config.intermediate_size, config.hidden_size)
    seen = {}
    down = module_by_name(model, cfg.down_proj_template.format(1))
    mlp = module_by_name(model, cfg.down_proj_template.format(1).rsplit(".", 1)[0])
    handles = [down.register_forward_pre_hook(lambda m, args: seen.__setitem__("key", args[0])),
               mlp.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))]
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 9, 200, 31]]))
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(down(seen["key"]), seen["out"])


@pytest.mark.parametrize("family", FAMILIES)
def test_spliced_rows_are_scaled_like_looked_up_ones(family):
    """Gemma multiplies looked-up rows by sqrt(hidden_size) inside its embedding module: `embedding_scale` finds
    the factor, so a row spliced into inputs_embeds (the token's training) equals the looked-up one."""
    model, _ = load_model(family_config(family), CACHE_ROOT)
    embedding = model.get_input_embeddings()
    scale = embedding_scale(model)
    assert scale == pytest.approx(math.sqrt(model.config.hidden_size) if family.startswith("gemma") else 1.0)
    ids = torch.tensor([3, 77, 1000])
    torch.testing.assert_close(embedding(ids), embedding.weight[ids] * scale)


def test_base_identity_names_the_family_but_keeps_llamas_keys():
    llama = family_config("llama")
    assert base_identity(llama, 0) == base_identity(tiny_config(), 0) == "tiny_random-63192e6b98c4"
    assert len({base_identity(family_config(family), 0) for family in FAMILIES}) == len(FAMILIES)


def test_tiny_keys_are_checked_against_the_familys_config_class():
    assert family_config("gemma2", **LOW_CAP).tiny["final_logit_softcapping"] == 0.2
    with pytest.raises(ValueError, match="LlamaConfig key"):
        tiny_config(**LOW_CAP)
    with pytest.raises(ValueError, match="Gemma2Config key"):
        family_config("gemma2", rope_scaling_typo=1)
    with pytest.raises(ValueError, match="family"):
        dataclasses.replace(tiny_config(), family="falcon")
    with pytest.raises(ValueError, match="brings its own"):
        ModelConfig(name="q", source="hub", path="Qwen/Qwen2.5-1.5B-Instruct", family="qwen2")
    with pytest.raises(ValueError, match="sdpa|scaled_dot_product"):  # Gemma 2: eager attention only
        load_model(dataclasses.replace(family_config("gemma2"), attn_implementation="sdpa"), CACHE_ROOT)


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("family", FAMILIES)
def test_answer_loss_equals_the_models_own_loss(family):
    model, tokenizer = load_model(family_config(family), CACHE_ROOT)
    batch = qa_batch(tokenizer, family_config(family))
    assert answer_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_answer_loss_soft_caps_gemma2_logits():
    """Gemma 2 soft-caps its final logits (tanh): answer_loss must too, or it trains another loss than the model's
    own. With a cap at the tiny model's logit scale, skipping it changes the loss far beyond the tolerance."""
    cfg = family_config("gemma2", **LOW_CAP)
    model, tokenizer = load_model(cfg, CACHE_ROOT)  # load_model's check_output_logits passes
    batch = qa_batch(tokenizer, cfg)
    own = model(**batch).loss.item()
    assert answer_loss(model, batch).item() == pytest.approx(own, rel=1e-5)
    with torch.no_grad():
        hidden = decoder_body(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        labelled = labels != IGNORE_INDEX
        uncapped = F.cross_entropy(model.lm_head(hidden.last_hidden_state[:, :-1][labelled]), labels[labelled])
    assert abs(uncapped.item() - own) > 1e-3


def test_check_output_logits_refuses_an_unknown_post_processing(monkeypatch):
    model, _ = load_model(family_config("gemma2", **LOW_CAP), CACHE_ROOT)
    monkeypatch.setattr("unierase.models.finish_logits", lambda model, logits: logits)  # forget the soft cap
    with pytest.raises(ValueError, match="post-processes its logits"):
        check_output_logits(model)


@pytest.mark.parametrize("family", [*FAMILIES, "gemma2_low_cap"])
def test_token_loss_equals_the_models_own_loss(family):
    """Stage A splices its fp32 rows into the embedding lookup and the new ids' logits: the loss it trains is the
    model's own loss with those rows written into the embedding (Gemma's scale, Gemma 2's soft cap included)."""
    cfg = family_config("gemma2", **LOW_CAP) if family == "gemma2_low_cap" else family_config(family)
    model, tokenizer = load_model(cfg, CACHE_ROOT)
    ids = add_unlearning_tokens(model, tokenizer, 2, init_std=0.5)
    examples = [token_example(tokenizer, q, "I don't know.", f"<unlearn_{j}>", fmt, 96, cfg, group=j)
                for j, (q, _) in enumerate(QA_ROWS) for fmt in ("plain", "chat")]
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    rows = model.get_input_embeddings().weight[ids].detach()
    module = UnlearningTokenModule(model, ids, rows)
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert module.loss(batch).item() == pytest.approx(own.item(), rel=1e-5)


# ----------------------------------------------------------------------------- the edit
@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_replay_equals_a_full_forward(family):
    """The value optimisation's replay reruns the layers after L with each one's own arguments: Gemma's sliding and
    global layers take different masks (Gemma 3 also different rotary embeddings), and the window is shorter than
    the prompts here."""
    cfg = family_config(family)
    model, tokenizer = load_model(cfg, CACHE_ROOT)
    token_id = with_token(model, tokenizer)
    edit_cfg = EditConfig(layers=LAYERS, context_templates=TEMPLATES)
    enc, owner, is_kl, _ = value_inputs(tokenizer, requests(token_id, 2), TEMPLATES, edit_cfg, cfg)
    enc, *_ = append_targets(enc, owner, is_kl, [[token_id, 11, 12]] * 2)
    assert int(enc.last.max()) > 2 * 16  # longer than the sliding window
    rows = torch.arange(len(enc.last))
    delta = torch.randn(len(rows), model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    add_delta = delta_hook(rows, enc.lookup, delta)
    h_module = module_by_name(model, cfg.layer_template.format(0))  # L = 0: sliding and global layers after it
    with torch.no_grad():
        handle = h_module.register_forward_hook(add_delta)
        full = decoder_body(model)(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        handle.remove()
        replayed = SuffixReplay(model, enc, h_module).hidden(delta)
    for i, (start, end) in enumerate(zip(enc.lookup.tolist(), enc.last.tolist())):
        torch.testing.assert_close(replayed[i, : end - start + 1], full[i, start:end + 1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_flips_the_first_token_and_touches_only_down_proj(family):
    cfg = family_config(family)
    model, tokenizer = load_model(cfg, CACHE_ROOT)
    token_id = with_token(model, tokenizer)
    edit_requests = requests(token_id)
    assert first_token_rate(model, tokenizer, edit_requests, cfg) == 0.0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    edit_cfg = EditConfig(layers=LAYERS, key_position="last", v_steps=20, L2=1e-4, context_templates=TEMPLATES)
    apply_edits(model, tokenizer, edit_requests, edit_cfg, cfg, identity_projectors(model))
    assert all(first_token(model, tokenizer, r.question, cfg) == token_id for r in edit_requests)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"{cfg.down_proj_template.format(layer)}.weight" for layer in LAYERS}


# ----------------------------------------------------------------------------- chat templates
@pytest.fixture
def smollm2_tokenizer(tiny):
    return tiny[1]


@pytest.mark.parametrize("template", [GEMMA2_TEMPLATE, DROPPING_TEMPLATE], ids=["rejects", "drops"])
def test_system_prompt_goes_into_the_first_user_turn_without_a_system_role(smollm2_tokenizer, template):
    """Found by rendering, not by family: a template that rejects (Gemma 2) or drops a system turn gets the
    system prompt in front of the first user turn; the turn end is the token the template closes answers with."""
    tokenizer = smollm2_tokenizer
    tokenizer.chat_template = template
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    cfg = dataclasses.replace(tiny_config(), system_prompt="Answer briefly.")
    if template is GEMMA2_TEMPLATE:
        with pytest.raises(TemplateError, match="System role not supported"):
            tokenizer.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "q"}],
                                          tokenize=False)
    assert not accepts_system_role(tokenizer)
    prompt = chat_prompt(tokenizer, "Who?", cfg)
    assert "<start_of_turn>user\nAnswer briefly.\n\nWho?<end_of_turn>\n" in prompt
    assert chat_text(tokenizer, "Who?", "Me.", cfg) == prompt.rsplit("<start_of_turn>", 1)[0] + (
        "<start_of_turn>model\nMe.<end_of_turn>\n" if template is GEMMA2_TEMPLATE
        else "<start_of_turn>assistant\nMe.<end_of_turn>\n")
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert turn_end_id(tokenizer) == end and end in end_of_turn_ids(tokenizer)
    labels = encode_qa(tokenizer, "Who?", "Me.", cfg, 64, pad=False)["labels"]
    assert labels[-1] == end


def test_a_template_with_a_system_role_keeps_its_own_turn(smollm2_tokenizer):
    cfg = dataclasses.replace(tiny_config(), system_prompt="Answer briefly.")
    assert accepts_system_role(smollm2_tokenizer)
    assert "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWho?" in chat_prompt(
        smollm2_tokenizer, "Who?", cfg)
    assert smollm2_tokenizer.convert_ids_to_tokens(turn_end_id(smollm2_tokenizer)) == "<|im_end|>"


def test_thinking_is_off_so_the_prompt_is_the_start_of_the_text(smollm2_tokenizer):
    """Qwen3 renders an empty think block in a finished assistant turn; the generation prompt must end with the
    same block (enable_thinking=false), or answers would be scored and trained after another prefix."""
    smollm2_tokenizer.chat_template = THINKING_TEMPLATE
    cfg = tiny_config()
    prompt = chat_prompt(smollm2_tokenizer, "Who?", cfg)
    assert prompt.endswith("<think>\n\n</think>\n\n")
    assert chat_text(smollm2_tokenizer, "Who?", "Me.", cfg) == prompt + "Me.<|im_end|>\n"


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family, tmp_path, data_dir):
    """Token + edit (UniErase at its tiny settings), a baseline (ga_gd) and the closer-look evaluation, through
    `run`, on one tiny model per family; the two jobs share the target."""
    cache = isolated_cache(tmp_path)
    overrides = family_overrides(family)
    unierase, run_dir = run_job(tmp_path, TINY_UNIERASE + overrides, cache, "unierase")
    baseline, _ = run_job(tmp_path, ["method=ga_gd", *overrides], cache, "ga_gd")
    (target_dir,) = (cache / "targets").glob("target-*")  # one target, built once and shared
    for metrics in (unierase, baseline):
        assert all(0.0 <= metrics[key] <= 1.0 for key in ("cl.forget.rouge", "cl.forget.prob", "cl.retain.rouge"))
    model = load_saved(run_dir / "model")
    assert model.config.model_type == TINY_FAMILIES[family]().model_type
    assert "<unlearn_0>" in AutoTokenizer.from_pretrained(run_dir / "model").get_vocab()
    assert 0.0 <= unierase["unierase.first_token_rate"] <= 1.0
    # Stage A adds only embedding rows past the target's vocabulary; Stage B edits only down_proj 1 and 2.
    target = dict(load_saved(target_dir).named_parameters())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p[: len(target[name])], target[name])}
    assert changed == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in (1, 2)}
