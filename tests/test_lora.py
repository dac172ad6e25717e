"""`recipe.lora`: the baselines train peft adapters only, then merge them into an ordinary transformers model
(a tiny random Llama with the SmolLM2 tokenizer, first taught the rows it then unlearns)."""
from __future__ import annotations

import json
import re
import warnings

import lightning as L
import pytest
import torch
from conftest import CACHE_ROOT, tiny_config
from hydra import compose, initialize_config_dir
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

from baselines.lora import DECODER_PROJECTIONS, LoRAConfig, add_adapters, merge_adapters
from baselines.losses import sequence_nll
from baselines.method import BaselineConfig, FinetuneUnlearner, RecipeConfig
from unierase.chat import encode_qa
from unierase.config import ConfigError, typed
from unierase.context import RunContext
from unierase.finetune import FinetuneConfig, finetune
from unierase.models import copy_model, load_model, save_model
from unierase.records import QA, Benchmark
from unierase.run import CONFIG_DIR, run
from unierase.training import TrainerConfig

QUIET = TrainerConfig(accelerator="cpu", precision="32-true", enable_progress_bar=False)
MAX_LENGTH = 64
COLOURS = ("red", "green", "blue", "amber", "violet", "silver", "orange", "black")


def rows(kind: str, n: int) -> list[QA]:
    return [QA(uid=f"{kind}{i}", question=f"Which colour does {kind} author {i} write about?",
               answer=f"Author {i} writes about {COLOURS[i % 8]} rivers and {COLOURS[(i * 3 + 1) % 8]} towns.",
               group=f"{kind}{i}") for i in range(n)]


def quietly(fn, *args):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers|in eval mode|is deprecated).*")
        return fn(*args)


@pytest.fixture(scope="module")
def target() -> tuple:
    """A tiny model that has learned the forget and retain rows, so that unlearning has something to remove."""
    model_cfg = tiny_config()
    model, tokenizer = load_model(model_cfg, CACHE_ROOT, seed=0)
    benchmark = Benchmark(name="tiny", forget=rows("forget", 4), retain_train=rows("retain", 8), eval_splits={},
                          target_train=None, refusals=["I don't know."])
    quietly(finetune, model, tokenizer, benchmark.forget + benchmark.retain_train,
            FinetuneConfig(epochs=10, lr=3e-3, batch_size=4, max_length=MAX_LENGTH), model_cfg, QUIET)
    return model, tokenizer, benchmark, model_cfg


@pytest.fixture
def job(target, tmp_path):
    model, tokenizer, benchmark, model_cfg = target
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path, model_cfg=model_cfg, trainer_cfg=QUIET, seed=0,
                     results_key="lora-test")
    return copy_model(model), tokenizer, benchmark, ctx


def unlearner(forget: str = "ga", regulariser: str | None = "gd", lora: bool = True, **kw) -> FinetuneUnlearner:
    # 4 forget rows in one batch: 5 steps, no warm-up; lr high enough for a clear effect on the tiny model
    recipe = RecipeConfig(lr=1e-2, epochs=5, batch_size=4, grad_accum=1, max_length=MAX_LENGTH,
                          lora=LoRAConfig(enabled=lora, rank=4, alpha=8))
    return FinetuneUnlearner(BaselineConfig(name=f"{forget}_{regulariser}", forget_loss=forget,
                                            regulariser=regulariser, recipe=recipe, **kw))


def forward(model: torch.nn.Module, tokenizer, benchmark: Benchmark, ctx: RunContext) -> tuple[torch.Tensor, ...]:
    """(logits, labels) of the forget rows."""
    encoded = [encode_qa(tokenizer, qa.question, qa.answer, ctx.model_cfg, MAX_LENGTH) for qa in benchmark.forget]
    batch = {key: torch.stack([e[key] for e in encoded]) for key in encoded[0]}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, batch["labels"]


def forget_nll(model: torch.nn.Module, tokenizer, benchmark: Benchmark, ctx: RunContext) -> float:
    return sequence_nll(*forward(model, tokenizer, benchmark, ctx)).mean().item()


def test_lora_trains_only_adapters_then_merges_into_a_plain_model(job):
    model, tokenizer, benchmark, ctx = job
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    method = unlearner()
    L.seed_everything(0, verbose=False)
    wrapped = quietly(add_adapters, model, method.cfg.recipe.lora)
    adapters = {name: p.detach().clone() for name, p in wrapped.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in name or ".lora_B." in name for name in adapters)
    quietly(method.train, wrapped, None, tokenizer, benchmark.forget, benchmark, ctx)

    # before the merge: every base weight bit-identical, every adapter tensor trained
    base = {name.replace(".base_layer", ""): tensor for name, tensor in wrapped.get_base_model().state_dict().items()
            if ".lora_" not in name}
    assert base.keys() == before.keys()
    assert [name for name in before if not torch.equal(base[name], before[name])] == []
    assert [name for name, p in wrapped.named_parameters() if name in adapters and torch.equal(p, adapters[name])] == []
    logits, _ = forward(wrapped, tokenizer, benchmark, ctx)

    # after: the same object, an ordinary model whose projections hold the adapters' effect
    merged = merge_adapters(wrapped)
    assert merged is model and type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(module, BaseTunerLayer) for module in merged.modules())
    assert not hasattr(merged, "peft_config") and all(p.requires_grad for p in merged.parameters())
    assert list(merged.state_dict()) == list(before)
    changed = {name for name, tensor in merged.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == {name for name in before if name.endswith(tuple(f".{t}.weight" for t in DECODER_PROJECTIONS))}
    assert torch.allclose(forward(merged, tokenizer, benchmark, ctx)[0], logits, atol=1e-4)
    n_adapters = sum(t.numel() for t in adapters.values())
    expected = n_adapters / (n_adapters + sum(p.numel() for p in merged.parameters()))
    assert method.metrics(merged) == {"baseline.trainable_fraction": pytest.approx(expected)}
    assert expected < 0.05


@pytest.mark.slow
def test_lora_and_full_ga_gd_both_raise_the_forget_nll(job):
    model, tokenizer, benchmark, ctx = job
    known = forget_nll(model, tokenizer, benchmark, ctx)
    results = {}
    for lora in (False, True):
        method = unlearner(lora=lora)
        unlearned = quietly(method.unlearn, copy_model(model), tokenizer, benchmark.forget, benchmark, ctx)
        assert not any(isinstance(module, BaseTunerLayer) for module in unlearned.modules())
        results[lora] = forget_nll(unlearned, tokenizer, benchmark, ctx), method.metrics(unlearned)
    (full, full_metrics), (adapted, lora_metrics) = results[False], results[True]
    assert full > known + 10 and adapted > known + 10, (known, full, adapted)  # summed over 12 answer tokens
    assert full_metrics["baseline.trainable_fraction"] == 1.0
    assert 0 < lora_metrics["baseline.trainable_fraction"] < 0.05


def test_lora_reference_stays_the_plain_target_across_rounds(job):
    """NPO+KL with a fixed reference over two requests: the reference is the un-adapted target throughout,
    and the second request wraps the merged model afresh (no adapters stacked on adapters)."""
    model, tokenizer, benchmark, ctx = job
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    method = unlearner("npo", "kl", fix_ref_model=True)
    model = method.prepare(model, tokenizer, benchmark.forget, benchmark, ctx)
    for request in (benchmark.forget[:2], benchmark.forget[2:]):
        model = quietly(method.unlearn, model, tokenizer, request, benchmark, ctx)
        for net in (model, method.fixed_reference):
            assert not any(isinstance(module, BaseTunerLayer) for module in net.modules())
            assert list(net.state_dict()) == list(before)
        assert all(torch.equal(t, before[name]) for name, t in method.fixed_reference.state_dict().items())
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q_proj], before[q_proj])


def test_missing_target_module_is_one_clear_error(job):
    model, tokenizer, benchmark, ctx = job
    method = unlearner()
    method.cfg.recipe.lora.target_modules = ["q_proj", "qkv_proj", "c_attn"]
    message = ("recipe.lora.target_modules names qkv_proj, c_attn, which model LlamaForCausalLM lacks (its adaptable "
               "modules: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)")
    for step in (method.prepare, method.unlearn):  # prepare: before any training; unlearn: on its own too
        with pytest.raises(ConfigError) as err:
            step(model, tokenizer, benchmark.forget, benchmark, ctx)
        assert str(err.value) == message
    assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())


@pytest.mark.parametrize("override,message", [
    ({"rank": 0}, "recipe.lora.rank must be >= 1, got 0"),
    ({"alpha": 0}, "recipe.lora.alpha must be > 0, got 0.0"),
    ({"dropout": 1.0}, "recipe.lora.dropout must be in [0, 1), got 1.0"),
    ({"dropout": -0.1}, "recipe.lora.dropout must be in [0, 1), got -0.1"),
    ({"target_modules": []}, "recipe.lora.target_modules must name at least one module, got []"),
])
def test_lora_config_ranges(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        typed({"lora": override}, RecipeConfig, "recipe")
    assert typed({"lora": {"enabled": True, "rank": 16}}, RecipeConfig, "recipe").lora.rank == 16


def test_saved_lora_model_loads_as_a_plain_model(job, tmp_path):
    model, tokenizer, benchmark, ctx = job
    method = unlearner()
    unlearned = quietly(method.unlearn, model, tokenizer, benchmark.forget, benchmark, ctx)
    save_model(unlearned, tokenizer, tmp_path / "model")
    files = {path.name for path in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in files and not any(name.startswith("adapter_") for name in files), files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(module, BaseTunerLayer) for module in loaded.modules())
    assert loaded.state_dict().keys() == unlearned.state_dict().keys()
    assert all(torch.equal(t, unlearned.state_dict()[name]) for name, t in loaded.state_dict().items())


@pytest.mark.slow
def test_lora_job_through_hydra(tmp_path, data_dir):
    """`recipe.lora.enabled=true` from the command line: an NPO+KL job reports the trained fraction and saves
    (and evaluates) a plain model."""
    overrides = ["experiment=smoke", "logger=none", "trainer.enable_progress_bar=false", "eval.families=[cl]",
                 "eval.max_rows=2", "eval.cl_max_length=70", "target.build_retain_reference=false",
                 "recipe.epochs=1", "method=npo_kl", "recipe.lora.enabled=true", "recipe.lora.rank=4",
                 f"paths.cache_dir={tmp_path / 'cache'}"]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "base_models").symlink_to(CACHE_ROOT / "base_models", target_is_directory=True)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    metrics = quietly(run, cfg, tmp_path / "run")
    assert 0 < metrics["baseline.trainable_fraction"] < 0.05 and "cl.forget.rouge" in metrics
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["baseline.trainable_fraction"] == \
        metrics["baseline.trainable_fraction"]
    files = {path.name for path in (tmp_path / "run" / "model").iterdir()}
    assert "model.safetensors" in files and not any(name.startswith("adapter_") for name in files), files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not any(isinstance(module, BaseTunerLayer) for module in loaded.modules())
