"""Any forget set (#23): `benchmark=custom` reads question/answer pairs from JSON Lines, JSON, CSV, Parquet or a
dataset folder; a metric needing a field the rows lack is null with its reason; bad input is one early error."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest
from conftest import CACHE_ROOT
from hydra import compose, initialize_config_dir
from test_pipeline import isolated_cache

from benchmarks import BENCHMARKS
from benchmarks.custom import CustomConfig, load_custom
from benchmarks.real_world import RealWorldConfig, load_real_world
from benchmarks.tofu import TofuConfig, author_blocks, load_tofu
from benchmarks.tofu_data import HUB_REFUSALS, TofuFiles
from unierase.config import ConfigError, typed
from unierase.evaluation.aggregate import aggregate_from_records, forget_truth_ratios
from unierase.io import DataError, stable_hash
from unierase.records import SplitRole
from unierase.run import CONFIG_DIR, run
from unierase.validate import InvalidJob, validate_job

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_facts.jsonl"
EXAMPLE_RETAIN = ROOT / "examples" / "custom_retain.jsonl"
ROWS = [
    {"question": "What year did Orla Venn map the Glass Marshes?", "answer": "1912", "subject": "Orla Venn",
     "paraphrased_answer": "In 1912.", "perturbed_answer": ["1913", "1890"]},
    {"question": "Who trained Orla Venn?", "answer": "NA", "paraphrased_answer": None, "perturbed_answer": None},
    {"question": "What is Brindlewick's capital?", "answer": "Port Allum, on the west coast",
     "paraphrased_answer": "Port Allum.", "perturbed_answer": ["Sedge Harbour", "Carrick Mote"]},
]
# The tiny model, a baseline and the cl family only: seconds per job (tests/test_pipeline.py's FAST, without TOFU).
CUSTOM_FAST = [
    "model=tiny_random", "benchmark=custom", "method=ga_gd", "recipe=cpu", "recipe.epochs=1", "logger=none",
    "trainer.enable_progress_bar=false", "eval.families=[cl]", "eval.max_rows=2", "eval.cl_max_length=70",
    "target.epochs=1", "target.build_in_subprocess=false", "target.build_retain_reference=false",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n" for row in rows),
                    encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Every cell as text; the perturbed answers as a JSON list; a missing value as an empty cell."""
    frame = pd.DataFrame([{**row, "perturbed_answer": json.dumps(row["perturbed_answer"])
                           if row["perturbed_answer"] else None} for row in rows])
    frame.to_csv(path, index=False)
    return path


def write_text(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def custom(data_dir: Path, forget: Path, **kw) -> CustomConfig:
    return CustomConfig(forget_file=str(forget), data_dir=str(data_dir), **kw)


def compose_custom(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=CUSTOM_FAST + overrides)


# Reading -------------------------------------------------------------------------------------------------------


def test_every_format_gives_the_same_records(tmp_path, data_dir):
    """JSON Lines, a JSON array, CSV ("1912" and "NA" stay text), Parquet and a dataset folder in the hub layout."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_jsonl(folder / "facts.json", ROWS)
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: facts.json\n---\n")
    pd.DataFrame(ROWS).to_parquet(tmp_path / "facts.parquet")
    (tmp_path / "facts.json").write_text(json.dumps(ROWS), encoding="utf-8")
    sources = [write_jsonl(tmp_path / "facts.jsonl", ROWS), tmp_path / "facts.json",
               write_csv(tmp_path / "facts.csv", ROWS), tmp_path / "facts.parquet", folder]
    loaded = [load_custom(custom(data_dir, source)).forget for source in sources]
    assert all(rows == loaded[0] for rows in loaded[1:])
    first, second = loaded[0][:2]
    assert (first.answer, first.subject, first.perturbed_answers) == ("1912", "Orla Venn", ("1913", "1890"))
    assert (second.answer, second.paraphrased_answer, second.perturbed_answers) == ("NA", None, ())


def test_the_target_learns_forget_and_retain_and_the_splits_have_their_roles(tmp_path, data_dir):
    neighbour = write_jsonl(tmp_path / "neighbour.jsonl", [{"question": "Capital of France?", "answer": "Paris"}])
    bench = load_custom(custom(data_dir, EXAMPLE, retain_file=str(EXAMPLE_RETAIN), neighbour_file=str(neighbour)))
    assert len(bench.forget) == 20 and all(len(qa.perturbed_answers) == 3 and qa.subject for qa in bench.forget)
    assert bench.target_train == bench.forget + bench.retain_train and len(bench.retain_train) == 40
    assert bench.eval_splits == {"retain": bench.retain_train, "neighbour": bench.eval_splits["neighbour"]}
    assert {split.role for split in bench.utility_splits().values()} == {SplitRole.UTILITY}
    assert len(bench.refusals) == 100 and bench.rounds == []  # TOFU's refusal list from the data folder
    assert len({qa.uid for qa in bench.forget + bench.retain_train}) == 60
    assert bench.generic_questions == [qa.question for qa in bench.retain_train] + ["Capital of France?"]


def test_refusals_from_a_list_a_file_or_tofu(tmp_path, data_dir):
    assert load_custom(custom(data_dir, EXAMPLE, refusals=["No idea."])).refusals == ["No idea."]
    lines = tmp_path / "refusals.txt"
    lines.write_text("I cannot say.\n\nNot known.\n", encoding="utf-8")
    assert load_custom(custom(data_dir, EXAMPLE, refusal_file=str(lines))).refusals == ["I cannot say.", "Not known."]
    assert len(load_custom(custom(data_dir, EXAMPLE, refusal_pool="reference_99")).refusals) == 99
    with pytest.raises(DataError, match=r"no refusal pool: .*idontknow\.txt does not exist; set benchmark"):
        load_custom(custom(tmp_path, EXAMPLE))
    with pytest.raises(ConfigError, match="^refusals and refusal_file are alternatives"):
        custom(data_dir, EXAMPLE, refusals=["No."], refusal_file=str(lines))


BAD_INPUT = {
    "missing file": (lambda d: d / "nowhere.jsonl", r"data file not found: .*nowhere\.jsonl$"),
    "unknown file type": (lambda d: write_jsonl(d / "facts.txt", ROWS), r"facts\.txt: unknown data file type '\.txt'"),
    "empty file": (lambda d: write_jsonl(d / "facts.jsonl", []), r"facts\.jsonl: empty file$"),
    "no answer column": (lambda d: write_csv(d / "facts.csv", [{**r, "answer": None} for r in ROWS]),
                         r"facts\.csv: row 1: missing field\(s\) \['answer'\]$"),
    "duplicate rows": (lambda d: write_jsonl(d / "facts.jsonl", ROWS + ROWS[1:2]),
                       r"facts\.jsonl: row 4: duplicate of row 2 \(same question and answer\)$"),
    "perturbed answers as a string": (
        lambda d: write_jsonl(d / "facts.jsonl", [ROWS[0], {**ROWS[2], "perturbed_answer": "Sedge Harbour"}]),
        r"facts\.jsonl: row 2: field 'perturbed_answer' must be a non-empty list of non-empty strings"),
    "perturbed answers not a JSON list in a CSV cell": (
        lambda d: write_text(d / "facts.csv", "question,answer,perturbed_answer\nQ?,A,Sedge Harbour\n"),
        r"facts\.csv: row 1: field 'perturbed_answer' must be a JSON list in a CSV cell"),
    "subject not in the question": (lambda d: write_jsonl(d / "facts.jsonl", [{**ROWS[0], "subject": "Quillon"}]),
                                    r"facts\.jsonl: row 1: subject 'Quillon' does not occur in the question$"),
    "not UTF-8": (lambda d: write_text(d / "facts.jsonl", b'{"question": "Q\xe9?", "answer": "A"}\n'),
                  r"facts\.jsonl:1: not UTF-8 \(byte 0xe9\)$"),
    "malformed JSON": (lambda d: write_text(d / "facts.jsonl", '{"question": "Q?", "answer": "A"}\n{oops\n'),
                       r"facts\.jsonl: cannot be read \("),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_naming_the_file(tmp_path, data_dir, case):
    make, message = BAD_INPUT[case]
    with pytest.raises(DataError, match=message) as caught:
        load_custom(custom(data_dir, make(tmp_path)))
    assert "\n" not in str(caught.value)


def test_a_pair_in_two_roles_is_refused(tmp_path, data_dir):
    retain = write_jsonl(tmp_path / "retain.jsonl", [{"question": "Q?", "answer": "A"}, ROWS[2]])
    with pytest.raises(DataError, match=r"retain\.jsonl: row 2: the same question and answer as row 3 of .*forget"
                                        r"\.jsonl \(a pair cannot be both forgotten and kept\)$"):
        load_custom(custom(data_dir, write_jsonl(tmp_path / "forget.jsonl", ROWS), retain_file=str(retain)))
    neighbour = write_jsonl(tmp_path / "neighbour.jsonl", [{"question": "Q?", "answer": "A"}])
    with pytest.raises(DataError, match=r"neighbour\.jsonl: row 1: .* \(neighbours are pairs the target was not "):
        load_custom(custom(data_dir, EXAMPLE, retain_file=str(retain), neighbour_file=str(neighbour)))


# The config and the job ------------------------------------------------------------------------------------


def assert_refused(tmp_path: Path, overrides: list[str], message: str) -> None:
    """`run` raises InvalidJob (one line) and writes no run directory and no cache."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.raises(InvalidJob, match=message) as caught:
        run(compose_custom(overrides + [f"paths.cache_dir={cache}"]), run_dir)
    assert "\n" not in str(caught.value)
    assert not run_dir.exists() and not cache.exists(), "something was written before the error"


def test_the_config_entry_types_and_validates(data_dir):
    cfg = compose_custom([f"benchmark.forget_file={EXAMPLE}", f"benchmark.retain_file={EXAMPLE_RETAIN}",
                          f"paths.data_dir={data_dir}"])
    assert typed(cfg.benchmark, BENCHMARKS["custom"][0], "benchmark").retain_file == str(EXAMPLE_RETAIN)
    assert len(validate_job(cfg).benchmark.forget) == 20


JOB_CASES = {  # overrides given the test's folder, and the message
    "no forget file": (lambda d: [], r"^benchmark\.forget_file is required"),
    "a bad data file": (lambda d: [f"benchmark.forget_file={d / 'missing.jsonl'}"],
                        r"data file not found: .*missing\.jsonl$"),
    "a baseline without a retain file": (lambda d: [f"benchmark.forget_file={EXAMPLE}"],
                                         r"^benchmark\.retain_file is required by method ga_gd"),
    "fewer retain pairs than UniErase's anchors": (
        lambda d: [f"benchmark.forget_file={EXAMPLE}", "method=unierase_cpu", "+model.tiny.num_hidden_layers=10",
                   f"benchmark.retain_file={write_jsonl(d / 'retain.jsonl', [{'question': 'Q?', 'answer': 'A'}])}"],
        r"^method\.token\.output_anchors must be <= 1 \(the benchmark's retain pairs, its anchors\), got 40$"),
    "ou, which is TOFU-only": (
        lambda d: [f"benchmark.forget_file={EXAMPLE}", f"benchmark.retain_file={EXAMPLE_RETAIN}",
                   "eval.families=[cl,ou]", "target.build_retain_reference=true"],
        r"^eval\.families includes ou, which is TOFU-only"),
}


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_a_job_that_cannot_run_is_refused_before_writing(tmp_path, data_dir, case):
    overrides, message = JOB_CASES[case]
    assert_refused(tmp_path, [*overrides(tmp_path), f"paths.data_dir={data_dir}"], message)


# Metrics that need a field the rows lack ---------------------------------------------------------------------


def record(nll_perturbed: list[float]) -> dict:
    return {"nll_answer": 0.5, "nll_correct": 0.6, "nll_perturbed": nll_perturbed, "rouge": 0.4}


def test_rows_without_perturbed_answers_give_a_null_truth_ratio_not_a_crash():
    from conftest import eval_config

    cfg = eval_config("fast", families="[cl]")
    records = {"forget": [record([1.0, 2.0]), record([])], "retain": [record([1.5]), record([1.2])]}
    roles = {"forget": SplitRole.FORGET, "retain": SplitRole.UTILITY}
    metrics = aggregate_from_records(records, roles, cfg)
    assert metrics["cl.forget.truth_ratio"] is None and metrics["cl.forget.prob"] is not None
    assert metrics["cl.retain.truth_ratio"] is not None
    assert forget_truth_ratios(records["forget"])[1] is None
    alone = aggregate_from_records({"forget": records["forget"]}, {"forget": SplitRole.FORGET}, cfg)
    assert alone["cl.model_utility"] is None and alone["cl.model_utility_retain"] is None


def test_custom_job_end_to_end(tmp_path, data_dir):
    """One ga_gd job on 20 made-up facts without perturbed answers (and a retain file with them): the run
    directory, the null truth ratio with its reason, and the retain split scored."""
    facts = [{"question": f"What does the fictional {thing} of Quarrel Hill collect?",
              "answer": f"The {thing} of Quarrel Hill collects {item}."}
             for thing, item in zip(["baker", "miller", "smith", "weaver", "potter", "tanner", "cooper", "mason",
                                     "glazier", "chandler", "fletcher", "joiner", "thatcher", "carter", "dyer",
                                     "brewer", "saddler", "turner", "roper", "tiler"],
                                    ["blue buttons", "old keys", "river stones", "owl feathers", "tin soldiers",
                                     "sea glass", "maps", "pressed ferns", "clock hands", "candle stubs", "arrowheads",
                                     "door knobs", "bird nests", "cart wheels", "ink pots", "cork stoppers",
                                     "horse brasses", "chess pieces", "knots", "roof tiles"])]
    forget = write_jsonl(tmp_path / "facts.jsonl", facts)
    retain = write_jsonl(tmp_path / "retain.jsonl", [json.loads(line) for line in
                                                     EXAMPLE_RETAIN.read_text().splitlines()[:4]])
    (CACHE_ROOT / "base_models").mkdir(parents=True, exist_ok=True)  # a fresh checkout: link no dangling folder
    cache = isolated_cache(tmp_path)
    cfg = compose_custom([f"benchmark.forget_file={forget}", f"benchmark.retain_file={retain}",
                          f"paths.data_dir={data_dir}", f"paths.cache_dir={cache}"])
    metrics = run(cfg, tmp_path / "run")
    knowledge = json.loads((tmp_path / "run" / "eval" / "knowledge.json").read_text())
    assert metrics["cl.forget.truth_ratio"] is None and metrics["cl.forget.rouge"] is not None
    assert knowledge["notes"]["null_reasons"]["cl.forget.truth_ratio"] == \
        "2 of 2 rows have no perturbed answers (perturbed_answer)"
    assert metrics["cl.retain.truth_ratio"] is not None and knowledge["notes"]["roles"]["retain"] == "utility"
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


# TOFU by author ------------------------------------------------------------------------------------------------

# stable_hash of today's Benchmark fields, as the loaders gave them before `forget_authors` (commit 8a88254), on the
# shared data folder: forget_authors=null must leave every record as it was.
RECORD_FIELDS = ("name", "forget", "retain_train", "eval_splits", "target_train", "rounds", "refusals",
                 "generic_questions", "holdout")
TOFU_RECORDS = [
    ({"retain_authors": 2}, "22567ff2058701777f7481fb3ea7af90"),
    ({"split": "forget05", "known_forget": "forget10", "retain_authors": None}, "293a7a438909f0dd21dbc58d778f253f"),
    ({"split": "forget10", "known_forget": "forget10", "retain_authors": 1, "subject_table": "forget01_subject",
      "refusal_pool": "reference_99", "sequential_preset": "tofu_seq_9x400"}, "30d1fdb59d8ace3bc10802c68fe76304"),
]


def records_hash(bench) -> str:
    return stable_hash({name: asdict(bench)[name] for name in RECORD_FIELDS}, 32)


@pytest.mark.parametrize("overrides,expected", TOFU_RECORDS)
def test_tofu_records_without_forget_authors_are_unchanged(data_dir, overrides, expected):
    assert records_hash(load_tofu(TofuConfig(data_dir=str(data_dir), **overrides))) == expected


def test_real_world_records_are_unchanged(data_dir):
    assert records_hash(load_real_world(RealWorldConfig(data_dir=str(data_dir)))) == "50b28ab102a0e1186e2dfc14ea5c1695"


def test_every_author_block_names_its_author(data_dir):
    """The block of author i (retain_perturbed, forget10 task 1 in FORGET10_TASK1_AUTHORS order, tasks 2-9 by their
    retain90 rows) names author i of author_index.tsv (author 88 is never named); 20-179 equal their retain90 rows."""
    tofu_dir = data_dir / "tofu"
    names = [line.split("\t")[1] for line in (tofu_dir / "author_index.tsv").read_text().splitlines()[1:]]
    all_retain = load_tofu(TofuConfig(data_dir=str(data_dir), retain_authors=None)).target_train[40:]
    retain_eval = load_tofu(TofuConfig(data_dir=str(data_dir), retain_authors=None)).eval_splits["retain"]
    subjects = {(qa.question, qa.answer): qa.subject for qa in
                load_tofu(TofuConfig(data_dir=str(data_dir), split="forget10", known_forget="forget10")).forget}
    blocks = author_blocks(TofuFiles(tofu_dir), subjects, all_retain, retain_eval)
    assert sorted(blocks) == list(range(200)) and all(len(rows) == 20 for rows in blocks.values())
    unnamed = [a for a, rows in blocks.items() if names[a] not in " ".join(qa.question + qa.answer for qa in rows)]
    assert unnamed == [88]
    assert all([(qa.question, qa.answer) for qa in blocks[a]] ==
               [(qa.question, qa.answer) for qa in all_retain[20 * a: 20 * a + 20]] for a in range(20, 180))
    assert all(len(qa.perturbed_answers) == 5 and qa.paraphrased_answer for rows in blocks.values() for qa in rows)


def test_forget_authors_by_name_or_index(data_dir):
    by_name = load_tofu(TofuConfig(data_dir=str(data_dir), retain_authors=4,
                                   forget_authors=["nikolai abilov", "1", "Basil Mahfouz Al-Kuwaiti", "100"]))
    by_index = load_tofu(TofuConfig(data_dir=str(data_dir), retain_authors=4,
                                    forget_authors=["199", "1", "198", "100"]))
    assert by_name == by_index
    standard = load_tofu(TofuConfig(data_dir=str(data_dir), retain_authors=4))  # forget01: authors 198, 199
    pairs = [(qa.question, qa.answer) for qa in by_name.forget]
    assert sorted(pairs[:20] + pairs[40:60]) == sorted((qa.question, qa.answer) for qa in standard.forget)
    assert [qa.group for qa in by_name.forget[::20]] == ["forget/author199", "forget/author1", "forget/author198",
                                                         "forget/author100"]
    assert [[qa.uid for qa in r] for r in by_name.rounds] == [[qa.uid for qa in by_name.forget[i:i + 20]]
                                                              for i in range(0, 80, 20)]
    # the target learns the forget authors and retain authors 0, 2, 3; no retain set holds a forgotten author
    assert by_name.target_train == by_name.forget + by_name.retain_train
    assert [qa.uid for qa in by_name.retain_train] == [f"tofu/retain90.jsonl/{i}" for i in [*range(20), *range(40, 80)]]
    assert [qa.uid for qa in by_name.eval_splits["retain"]] == \
        [f"tofu/retain_perturbed.jsonl/{i}" for i in [*range(20), *range(40, 80)]]
    assert [qa.uid for qa in by_name.holdout] == [f"tofu/retain90.jsonl/{i}" for i in range(2020, 2040)]  # 101 only
    assert not set(pairs) & {(qa.question, qa.answer) for qa in by_name.holdout + by_name.retain_train}
    assert by_name.forget[0].subject and by_name.forget[20].subject is None  # forget10_subject covers authors 20-199


FORGET_AUTHOR_ERRORS = [
    (["Basil"], r"^benchmark\.forget_authors has unknown author 'Basil' \(close matches: Basil Mahfouz Al-Kuwaiti "
                r"\(198\)\)$"),
    (["Nikolai Abilow"], r"close matches: Nikolai Abilov \(199\)"),
    (["198", "basil mahfouz al-kuwaiti"], r"^benchmark\.forget_authors names author 198 more than once$"),
    (["0", "1"], r"^benchmark\.forget_authors leaves no retain author to learn or to score \(the target learns retain "
                 r"authors 0\.\.1 and scores 0\.\.1\): raise benchmark\.retain_authors$"),
]


@pytest.mark.parametrize("authors,message", FORGET_AUTHOR_ERRORS)
def test_bad_forget_authors_are_one_error(data_dir, authors, message):
    with pytest.raises(ConfigError, match=message):
        load_tofu(TofuConfig(data_dir=str(data_dir), retain_authors=2, forget_authors=authors))


def test_forget_authors_config_checks_and_the_missing_index(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"^forget_authors\[1\] must be an author index in \[0, 199\] or a name"):
        TofuConfig(forget_authors=["3", "200"])
    with pytest.raises(ConfigError, match=r"^forget_authors must name at least one author"):
        TofuConfig(forget_authors=[])
    with pytest.raises(ConfigError, match=r"^forget_authors needs source=local"):
        TofuConfig(source="hub", forget_authors=["3"])
    copy = tmp_path / "data"
    shutil.copytree(data_dir / "tofu", copy / "tofu", ignore=shutil.ignore_patterns("author_index.tsv", "task_data"))
    assert len(load_tofu(TofuConfig(data_dir=str(copy), forget_authors=["150"])).forget) == 20  # indices need no index
    with pytest.raises(DataError, match=r"author_index\.tsv not found: author names need it"):
        load_tofu(TofuConfig(data_dir=str(copy), forget_authors=["Nikolai Abilov"]))


def test_the_readme_command_by_author_validates(data_dir):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=demo", f"paths.data_dir={data_dir}", "eval.families=[cl]",
                                           'benchmark.forget_authors=["Basil Mahfouz Al-Kuwaiti",150]'])
    checked = validate_job(cfg)
    assert checked.benchmark_cfg.forget_authors == ["Basil Mahfouz Al-Kuwaiti", "150"]
    assert [qa.group for qa in checked.benchmark.forget[::20]] == ["forget/author198", "forget/author150"]


# TOFU from a dataset in the hub layout (the `datasets` path the custom benchmark reads through) ---------------

HUB_CONFIGS = ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain90", "retain_perturbed",
               "real_authors_perturbed", "world_facts_perturbed")


def hub_layout(data_dir: Path, folder: Path) -> Path:
    """A local folder laid out like locuslab/TOFU: one data file per config (JSON Lines named .json), the standard
    split only and no task ids, and a README.md whose `configs` name them."""
    folder.mkdir()
    readme = ["---", "configs:"]
    for config in HUB_CONFIGS:
        rows = [{k: v for k, v in json.loads(line).items() if k != "task_id"}
                for line in (data_dir / "tofu" / f"{config}.jsonl").read_text(encoding="utf-8").splitlines()
                if json.loads(line).get("task_id", "1") == "1"]
        write_jsonl(folder / f"{config}.json", rows)
        readme += [f"- config_name: {config}", f"  data_files: {config}.json"]
    (folder / "README.md").write_text("\n".join([*readme, "---", ""]), encoding="utf-8")
    return folder


def test_tofu_from_a_dataset_folder_in_the_hub_layout(tmp_path, data_dir):
    folder = hub_layout(data_dir, tmp_path / "TOFU")
    hub = load_tofu(TofuConfig(source="hub", hub_path=str(folder), data_dir=str(tmp_path / "no_data"),
                               split="forget05", known_forget="forget10", retain_authors=3))
    local = load_tofu(TofuConfig(data_dir=str(data_dir), split="forget05", known_forget="forget10", retain_authors=3))
    # the same rows, uids and evaluation fields; the hub has no subjects, continual tasks or refusal list
    assert hub.forget == [replace(qa, subject=None) for qa in local.forget]
    assert hub.target_train == [replace(qa, subject=None) for qa in local.target_train]
    assert hub.eval_splits == local.eval_splits and hub.holdout == local.holdout
    assert hub.rounds == [] and hub.refusals == HUB_REFUSALS
    assert len(hub.forget) == 200 and all(len(qa.perturbed_answers) == 5 for qa in hub.forget)


def test_a_hub_layout_file_is_checked_like_a_local_one(tmp_path, data_dir):
    folder = hub_layout(data_dir, tmp_path / "TOFU")
    lines = (folder / "forget01_perturbed.json").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "forget01_perturbed.json").write_text("".join(lines[:5] + lines[4:]), encoding="utf-8")
    with pytest.raises(DataError, match=r"TOFU \[forget01_perturbed\]: row 6: duplicate of row 5 \(same question and "
                                        r"answer\)$"):
        load_tofu(TofuConfig(source="hub", hub_path=str(folder)))
    (folder / "forget01_perturbed.json").write_text("".join(lines[:39]), encoding="utf-8")
    with pytest.raises(DataError, match=r"TOFU \[forget01_perturbed\]: task_id '1' has 39 rows, expected 40"):
        load_tofu(TofuConfig(source="hub", hub_path=str(folder)))
    with pytest.raises(DataError, match=r"TOFU: cannot be read \(ValueError: BuilderConfig 'forget10_perturbed' "):
        (folder / "README.md").write_text((folder / "README.md").read_text().replace("forget10_perturbed", "x"))
        load_tofu(TofuConfig(source="hub", hub_path=str(folder), split="forget10", known_forget="forget10"))
