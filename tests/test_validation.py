"""Every value checked before any work starts (#19): a bad config value or data file is one clear error that
names the field (with its allowed values) or file:line, raised by `run` before it writes anything or loads a
model. Data cases corrupt a temporary copy of the files they need; the shared data folder is never touched."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from benchmarks.utility import LOADERS
from unierase.config import ConfigError, typed
from unierase.evaluation.config import UTILITY_BENCHMARKS
from unierase.registry import METHODS
from unierase.run import CONFIG_DIR, run
from unierase.settings import SettingConfig
from unierase.validate import InvalidJob, validate_job

# The tiny model's smoke job, baseline and batch: what each case changes is the only thing wrong.
SMOKE = ["experiment=smoke", "logger=none", "method=ga_gd"]
# The smoke preset sets TOFU's keys: the real-world cases start from the tiny model alone.
REAL_WORLD = ["model=tiny_random", "benchmark=real_world", "logger=none", "method=ga_gd"]
TOFU_FILES = ("forget01_perturbed.jsonl", "forget10_subject.jsonl", "retain90.jsonl", "retain_perturbed.jsonl",
              "real_authors_perturbed.jsonl", "world_facts_perturbed.jsonl", "idontknow.txt")


def compose_job(overrides: list[str]):
    base = REAL_WORLD if "benchmark=real_world" in overrides else SMOKE
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=base + [o for o in overrides if o not in base])


def assert_refused(tmp_path: Path, overrides: list[str], message: str) -> str:
    """`run` raises InvalidJob (one line matching `message`) and leaves no run directory and no cache."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cfg = compose_job(overrides + [f"paths.cache_dir={cache}"])
    with pytest.raises(InvalidJob, match=message) as caught:
        run(cfg, run_dir)
    assert "\n" not in str(caught.value)
    assert not run_dir.exists() and not cache.exists(), "something was written before the error"
    return str(caught.value)


# Config values: each names its field and its allowed range -------------------------------------------------

CONFIG_CASES = [
    # the cases
    (["target.epochs=-1"], r"^target\.epochs must be >= 1, got -1$"),
    (["recipe.epochs=0"], r"^recipe\.epochs must be >= 1, got 0$"),
    (["setting=sequential", "benchmark.known_forget=forget10", "setting.rounds=0"], r"^setting\.rounds must be >= 1"),
    (["eval.max_rows=-1"], r"^eval\.max_rows must be >= 1, got -1$"),
    (["benchmark.retain_authors=-1"], r"^benchmark\.retain_authors must be in \[1, 180\], got -1$"),
    (["setting=precise", "setting.item_ids=[3,-1]"], r"^setting\.item_ids\[1\] must be >= 0, got -1$"),
    (["eval.families=[cll]"], r"^eval\.families\[0\] must be one of cl \| ou \| ut \| audit, got 'cll'$"),
    (["eval.utility.benchmarks=[mmlu,mmlu_pro]"],
     r"^eval\.utility\.benchmarks\[1\] must be one of mmlu \| triviaqa \| gsm8k \| humaneval, got 'mmlu_pro'$"),
    (["recipe.batch_size=0"], r"^recipe\.batch_size must be >= 1, got 0$"),
    (["model=saved", "stage=eval", "model.path=/nonexistent/model"], r"^model\.path is not an existing directory"),
    # a wrong type, on a fresh cache: a string where a list is expected is no longer read letter by letter
    (["eval.utility.benchmarks=mmlu"], r"^eval\.utility\.benchmarks is invalid: .*ListConfig"),
    (["method=unierase", "method.token.phase1.epochs=five"],
     r"^method\.token\.phase1\.epochs is invalid: Value 'five' of type 'str' could not be converted to Integer"),
    (["method=unierase", "method.edit.layers=[4,x]"], r"^method\.edit\.layers\[1\] is invalid"),
    # beyond the issue
    (["stage=train"], r"^stage must be one of finetune \| unlearn \| eval, got 'train'$"),
    (["seed=-1"], r"^seed must be an integer seed in \[0, 4294967295\], got -1$"),
    (["seed=abc"], r"^seed must be an integer seed in \[0, 4294967295\], got 'abc'$"),
    (["optimized_metric=[cl.forget_efficacy]"], r"^optimized_metric must be null or a metrics\.json key"),
    (["tags=smoke"], r"^tags must be a list of strings, got 'smoke'$"),
    (["paths.data_dir=/nonexistent/data"], r"^TOFU folder not found: /nonexistent/data/tofu"),
    (["logger=wandb", "logger.mode=live"], r"^logger\.mode must be one of offline \| online \| disabled, got 'live'$"),
    (["setting=sequential", "benchmark.known_forget=forget10", "setting.rounds=2", "setting.fail_after_round=3"],
     r"^setting\.fail_after_round must be <= setting\.rounds=2, got 3$"),
    (["setting=precise", "setting.item_ids=[40]"], r"^setting\.item_ids\[0\] must be < 40 \(the forget split's rows\)"),
    (["setting=precise", "setting.item_ids=[1,1]"], r"^setting\.item_ids lists row\(s\) \[1\] more than once$"),
    (["setting=precise", "setting.item_ids=[]"], r"^setting\.item_ids must list at least one"),
    (["setting=sequential", "benchmark.known_forget=forget10", "setting.rounds=11"],
     r"^setting\.rounds must be <= 10 \(the rounds of the benchmark's preset\), got 11$"),
    (["setting=sequential"], r"^setting\.rounds \(=null: all\) includes round 2, whose QA pairs the target never"),
    (["setting.name=batches"], r"^setting\.name must be one of batch \| sequential \| precise, got 'batches'$"),
    (["eval.families=[]"], r"^eval\.families must list at least one of cl \| ou \| ut \| audit$"),
    (["eval.families=[cl,cl]"], r"^eval\.families lists \['cl'\] more than once$"),
    (["eval.utility.mmlu_fraction=1.5"], r"^eval\.utility\.mmlu_fraction must be in \[0\.0, 1\.0\], got 1\.5$"),
    (["eval.utility.mmlu_fraction=0.00001"], r"^eval\.utility\.mmlu_fraction keeps no mmlu item at 1e-05"),
    (["eval.utility.gsm8k_fraction=0"], r"^eval\.utility\.gsm8k_fraction is 0: no gsm8k item would be scored"),
    (["+eval.refusal_threshold=2"], r"^eval\.refusal_threshold must be in \[0\.0, 1\.0\], got 2\.0$"),
    (["eval.batch_size=0"], r"^eval\.batch_size must be >= 1, got 0$"),
    (["target.lr=0"], r"^target\.lr must be > 0, got 0\.0$"),
    (["target.lr=nan"], r"^target\.lr must be > 0, got nan$"),
    (["target.batch_size=two"], r"^target\.batch_size is invalid: Value 'two'"),
    (["target.typo=1"], r"Could not override 'target\.typo'"),  # Hydra itself refuses an unknown key
    (["recipe.lr=-1e-05"], r"^recipe\.lr must be > 0, got -1e-05$"),
    (["recipe.grad_accum=0"], r"^recipe\.grad_accum must be >= 1, got 0$"),
    (["method.forget_loss=gaa"], r"^method\.forget_loss must be one of ga \| npo \| dpo \| me \| idk \| simnpo"),
    (["method.regulariser=kll"], r"^method\.regulariser must be one of gd \| kl \| ap, got 'kll'$"),
    (["+method.beta=0"], r"^method\.beta must be > 0, got 0\.0$"),
    (["method.kind=finetuning"], r"^method\.kind must be one of unierase \| finetune, got 'finetuning'$"),
    (["method=unierase", "method.edit.layers=[4,40]"], r"^method\.edit\.layers has layer 40, but the model has 10"),
    (["method=unierase", "method.token.perturb.layers=[10]"],
     r"^method\.token\.perturb\.layers has layer 10, but the model has 10 layers \(0\.\.9\)$"),
    (["method=unierase", "method.edit.v_lr=-0.1"], r"^method\.edit\.v_lr must be > 0, got -0\.1$"),
    (["method=unierase", "method.edit.key_position=first"],
     r"^method\.edit\.key_position must be one of subject_last \| last, got 'first'$"),
    (["method=unierase", "method.token.phase2.lr=0"], r"^method\.token\.phase2\.lr must be > 0, got 0\.0$"),
    (["method=unierase", "method.token.perturb.mode=gaussian"],
     r"^method\.token\.perturb\.mode must be one of relative_std \| reference \| absolute \| none"),
    (["method=unierase", "method.token.samples_per_token=0"], r"^method\.token\.samples_per_token must be >= 1"),
    (["method=unierase", "method.edit.mom2_corpus=/nonexistent/corpus"], r"no \*\.txt corpus files in /nonexistent"),
    (["benchmark.split=forget02"], r"^benchmark\.split must be one of forget01 \| forget05 \| forget10"),
    (["benchmark.split=forget05"], r"^benchmark\.known_forget must contain the split \(split=forget05"),
    (["benchmark.split=[forget01]"], r"^benchmark\.split is invalid: Cannot convert 'ListConfig' to string"),
    (["benchmark.retain_authors=181"], r"^benchmark\.retain_authors must be in \[1, 180\], got 181$"),
    (["benchmark.refusal_pool=reference_100"], r"^benchmark\.refusal_pool must be one of idontknow_100"),
    (["benchmark.name=tofu2"], r"^benchmark\.name must be one of tofu \| real_world \| custom, got 'tofu2'$"),
    (["benchmark=real_world", "benchmark.people=0"], r"^benchmark\.people must be in \[1, 20\], got 0$"),
    (["benchmark=real_world", "benchmark.people=21"], r"^benchmark\.people must be in \[1, 20\], got 21$"),
    (["model.attn_implementation=flash"], r"^model\.attn_implementation must be one of eager \| .*sdpa"),
    (["model.dtype=float8"], r"^model\.dtype must be one of bfloat16 \| float16 \| float32, got 'float8'$"),
    (["model.source=local"], r"^model\.source must be one of hub \| package_gguf \| tiny_random, got 'local'$"),
    (["+model.tiny.num_hiden_layers=2"], r"^model\.tiny has unknown LlamaConfig key\(s\) \['num_hiden_layers'\]$"),
    (["model.tiny.num_hidden_layers=0"], r"^model\.tiny\.num_hidden_layers must be an integer >= 1, got 0$"),
    (["model.package=no_such_package"], r"^model\.package 'no_such_package' is not an installed package$"),
    (["model=saved", "stage=eval"], r"^model\.path is required: set it on the command line"),
    (["trainer.precision=bf17"], r"^trainer\.precision must be one of 64 \| 32 \| 16 \| bf16"),
    (["trainer.devices=0"], r"^trainer\.devices must be auto, -1 \(all\), a count >= 1"),
    (["trainer.accelerator=gpux"], r"^trainer\.accelerator must be one of auto \| gpu"),
    (["trainer.log_every_n_steps=0"], r"^trainer\.log_every_n_steps must be >= 1, got 0$"),
    (["trainer.gradient_clip_val=-1"], r"^trainer\.gradient_clip_val must be > 0, got -1\.0$"),
    (["logger.name=tensorboard"], r"^logger\.name must be one of csv \| none \| wandb, got 'tensorboard'$"),
    (["objective_constraint.metric=cl.model_utility", "objective_constraint.min=0.5", "objective_constraint.max=0.1"],
     r"^objective_constraint\.min must be <= max: min=0\.5 > max=0\.1$"),
    (["objective_constraint.min=0.5"], r"^objective_constraint\.metric is null: the constraint sets min/max"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES, ids=[" ".join(case[0]) for case in CONFIG_CASES])
def test_bad_config_value_is_one_early_error_naming_the_field(tmp_path, data_dir, overrides, message):
    if overrides == ["target.typo=1"]:  # an unknown key never reaches `run`: composing refuses it
        with pytest.raises(Exception, match=message):
            compose_job(overrides)
        return
    assert_refused(tmp_path, overrides, message)


def test_every_preset_and_the_smoke_job_validate(data_dir):
    for overrides in ([], ["method=unierase"], ["setting=precise", "setting.item_ids=[0,39]"],
                      ["setting=sequential", "benchmark.known_forget=forget10", "setting.rounds=10"],
                      ["benchmark=real_world", "benchmark.people=2"], ["stage=finetune"]):
        checked = validate_job(compose_job(overrides))
        assert checked.benchmark.forget and checked.target.epochs >= 1


def test_registries_agree_with_the_checks():
    assert tuple(LOADERS) == UTILITY_BENCHMARKS
    assert set(METHODS) == {"unierase", "finetune"}
    with pytest.raises(ConfigError, match=r"^rounds must be >= 1, got 0$"):
        SettingConfig(rounds=0)  # a dataclass built in code checks its fields too
    with pytest.raises(ConfigError, match=r"^x\.rounds must be >= 1, got 0$"):
        typed({"rounds": 0}, SettingConfig, "x")


def test_command_line_prints_one_line_and_writes_nothing(tmp_path, data_dir):
    """What a user sees: `unierase target.epochs=-1` exits non-zero with the message alone, and the run
    directory holds only Hydra's own record of the command (.hydra/ and an empty log)."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"UNIERASE_DATA": str(data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "unierase.run", *SMOKE, "target.epochs=-1", f"hydra.run.dir={run_dir}",
         f"paths.cache_dir={cache}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == "error: target.epochs must be >= 1, got -1"
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "run.log"] and not cache.exists()
    assert (run_dir / "run.log").read_text() == ""


# Data files: a temporary, corrupted copy ---------------------------------------------------------------------


@pytest.fixture
def data_copy(tmp_path, data_dir) -> Path:
    """The smoke job's data: TOFU files copied (to corrupt), utility and corpus files linked (read only)."""
    copy = tmp_path / "data"
    (copy / "tofu").mkdir(parents=True)
    for name in TOFU_FILES:
        shutil.copyfile(data_dir / "tofu" / name, copy / "tofu" / name)
    for folder in ("utility", "corpus", "real_world"):
        link_tree(data_dir / folder, copy / folder)
    return copy


def link_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_dir():
            link_tree(path, target / path.name)
        else:
            (target / path.name).symlink_to(path)


def replace_with_copy(path: Path) -> Path:
    """Swap a linked file for a private copy, so it can be corrupted."""
    if path.is_symlink():
        source = path.resolve()
        path.unlink()
        shutil.copyfile(source, path)
    return path


def edit_lines(path: Path, change) -> None:
    path = replace_with_copy(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(change(lines)), encoding="utf-8")


def edit_row(path: Path, number: int, change) -> None:
    def apply(lines):
        row = json.loads(lines[number - 1])
        change(row)
        lines[number - 1] = json.dumps(row) + "\n"
        return lines
    edit_lines(path, apply)


def break_utf8(path: Path, number: int) -> None:
    """Line `number` gets a Latin-1 e-acute (0xe9), not UTF-8, after its second character."""
    path = replace_with_copy(path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[number - 1] = lines[number - 1][:2] + b"\xe9" + lines[number - 1][2:]
    path.write_bytes(b"".join(lines))


DATA_CASES = {
    # the cases
    "duplicated TOFU row": (
        lambda d: edit_lines(d / "tofu/forget01_perturbed.jsonl", lambda lines: lines[:5] + lines[4:]),
        r"forget01_perturbed\.jsonl:6: duplicate of line 5 \(same question and answer\)$"),
    "malformed utility file": (
        lambda d: edit_row(d / "utility/gsm8k.jsonl", 7, lambda row: row.update(answer="42")),
        r"gsm8k\.jsonl:7: 'answer' does not end in '#### <number>'$"),
    "missing field in an evaluation split": (
        lambda d: edit_row(d / "tofu/retain_perturbed.jsonl", 3, lambda row: row.pop("perturbed_answer")),
        r"retain_perturbed\.jsonl:3: missing field\(s\) \['perturbed_answer'\]$"),
    "non-UTF-8 TOFU file": (
        lambda d: break_utf8(d / "tofu/retain90.jsonl", 12), r"retain90\.jsonl:12: not UTF-8 \(byte 0xe9 at column"),
    "non-UTF-8 MMLU file": (
        lambda d: break_utf8(d / "utility/mmlu/test/anatomy_test.csv", 3),
        r"anatomy_test\.csv:3: not UTF-8 \(byte 0xe9\)$"),
    "perturbed answers as a string (read letter by letter)": (
        lambda d: edit_row(d / "tofu/forget01_perturbed.jsonl", 2,
                           lambda row: row.update(perturbed_answer=row["perturbed_answer"][0])),
        r"forget01_perturbed\.jsonl:2: field 'perturbed_answer' must be a non-empty list of non-empty strings"),
    # beyond the issue
    "missing TOFU row (shifts the authors)": (
        lambda d: edit_lines(d / "tofu/forget01_perturbed.jsonl", lambda lines: lines[:7] + lines[8:]),
        r"forget01_perturbed\.jsonl: task_id '1' has 39 rows, expected 40 \(2 authors x 20 QA\)"),
    "interleaved task": (
        lambda d: edit_row(d / "tofu/forget01_perturbed.jsonl", 30, lambda row: row.update(task_id="2")),
        r"forget01_perturbed\.jsonl:31: task_id '1' resumes after other tasks"),
    "retain file not whole authors": (
        lambda d: edit_lines(d / "tofu/retain90.jsonl", lambda lines: lines[:-1]),
        r"retain90\.jsonl: the file has 3599 rows, expected 3600 \(180 authors x 20 QA\)"),
    "empty answer": (
        lambda d: edit_row(d / "tofu/forget01_perturbed.jsonl", 4, lambda row: row.update(answer=" ")),
        r"forget01_perturbed\.jsonl:4: field 'answer' must be a non-empty string$"),
    "number where text is expected": (
        lambda d: edit_row(d / "tofu/world_facts_perturbed.jsonl", 9, lambda row: row.update(question=17)),
        r"world_facts_perturbed\.jsonl:9: field 'question' must be a str, got int 17$"),
    "duplicate subject row": (
        lambda d: edit_lines(d / "tofu/forget10_subject.jsonl", lambda lines: lines + lines[-1:]),
        r"forget10_subject\.jsonl:3601: duplicate of line 3600"),
    "refusal list cut short": (
        lambda d: edit_lines(d / "tofu/idontknow.txt", lambda lines: lines[:-1]),
        r"idontknow\.txt: 99 non-blank lines, expected 100 refusals$"),
    "triviaqa aliases empty": (
        lambda d: edit_row(d / "utility/triviaqa.jsonl", 5, lambda row: row.update(aliases=[])),
        r"triviaqa\.jsonl:5: field 'aliases' must be a non-empty list"),
    "humaneval task twice": (
        lambda d: edit_lines(d / "utility/human_eval.jsonl", lambda lines: lines + lines[:1]),
        r"human_eval\.jsonl:165: duplicate of line 1 \(same task_id\)$"),
    "malformed JSON": (
        lambda d: edit_lines(d / "tofu/real_authors_perturbed.jsonl",
                             lambda lines: lines[:9] + ["{oops\n"] + lines[10:]),
        r"real_authors_perturbed\.jsonl:10: malformed JSON"),
    "missing TOFU file": (
        lambda d: (d / "tofu/world_facts_perturbed.jsonl").unlink(),
        r"data file not found: .*world_facts_perturbed\.jsonl"),
    "non-UTF-8 corpus (UniErase reads it after Stage A)": (
        lambda d: break_utf8(d / "corpus/wikitext2_raw_test.txt", 40), r"wikitext2_raw_test\.txt:40: not UTF-8"),
}
DATA_OVERRIDES = {"non-UTF-8 corpus (UniErase reads it after Stage A)": ["method=unierase"]}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_file_is_one_early_error_naming_file_and_line(tmp_path, data_copy, case):
    corrupt, message = DATA_CASES[case]
    corrupt(data_copy)
    assert_refused(tmp_path, [f"paths.data_dir={data_copy}", *DATA_OVERRIDES.get(case, [])], message)


def test_real_world_person_blocks(tmp_path, data_copy):
    """A row of one person inside another's 20-row block: every later person would be shifted."""
    edit_row(data_copy / "real_world/neighbor.jsonl", 45, lambda row: row.update(name="Someone Else"))
    assert_refused(tmp_path, ["benchmark=real_world", f"paths.data_dir={data_copy}"],
                   r"neighbor\.jsonl:45: name 'Someone Else' inside the block of '.+' \(lines 41-60\)")


def test_the_intact_copy_validates(data_copy):
    checked = validate_job(compose_job([f"paths.data_dir={data_copy}"]))
    assert len(checked.benchmark.forget) == 40 and sum(map(len, checked.utility.values())) > 0
