"""`unierase-data`: the manifest matches the data folder, verify names every bad file, and the fetch path
rebuilds files byte for byte from a local stand-in for GitHub (no network here)."""
from __future__ import annotations

import json
import shutil
import urllib.error
from pathlib import Path

import pytest

from unierase.data_fetch import UNFETCHABLE, fetch, json_lines, load_manifest, main, origin_of
from unierase.io import file_digest

# A file of each kind of source: Python-repr lines with CRLF, CRLF text, JSON plus a derived field, a CSV, and a
# text kept with its CRLF endings.
FETCHED = ("tofu/forget01_subject.jsonl", "tofu/idontknow.txt", "utility/triviaqa.jsonl",
           "utility/mmlu/dev/abstract_algebra_dev.csv", "corpus/wikitext2_raw_test.txt")


def sub_manifest(tmp_path: Path, rels: tuple[str, ...]) -> Path:
    """The committed manifest cut to `rels`, so a test needs only those files."""
    files = load_manifest()
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"files": {rel: files[rel] for rel in rels}}), encoding="utf-8")
    return path


def upstream_bytes(data_dir: Path, rel: str) -> bytes:
    """What the public source holds for `rel`, rebuilt from the folder by undoing the documented conversion."""
    text = (data_dir / rel).read_text(encoding="utf-8")
    if rel == "tofu/forget01_subject.jsonl":  # UniErase: Python dict reprs, CRLF
        return "".join(repr(json.loads(line)) + "\r\n" for line in text.splitlines()).encode()
    if rel == "tofu/idontknow.txt":
        return text.replace("\n", "\r\n").encode()
    if rel == "utility/triviaqa.jsonl":  # llm-foundry has no `question` field
        rows = [json.loads(line) for line in text.split("\n") if line]
        return "".join(json.dumps({k: v for k, v in row.items() if k != "question"}) + "\n" for row in rows).encode()
    return (data_dir / rel).read_bytes()


def make_mirror(data_dir: Path, root: Path, rels: tuple[str, ...]) -> Path:
    for rel in rels:
        origin = origin_of(rel)
        path = root / origin.repo / origin.commit / origin.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(upstream_bytes(data_dir, rel))
    return root


def test_verify_passes_on_the_data_folder(data_dir, capsys):
    assert main(["--verify", str(data_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok: {data_dir}: {len(load_manifest())} files (28.5 MB) match the manifest"]  # no extras


def test_every_manifest_file_has_a_source_or_a_reason():
    assert [rel for rel in load_manifest() if origin_of(rel) is None and rel not in UNFETCHABLE] == []
    assert set(UNFETCHABLE) <= set(load_manifest())


def test_verify_names_the_altered_and_the_missing_file(data_dir, tmp_path, capsys):
    rels = ("tofu/idontknow.txt", "tofu/real_authors_perturbed.jsonl", "utility/human_eval.jsonl")
    manifest, folder = sub_manifest(tmp_path, rels), tmp_path / "data"
    for rel in rels:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / rel, folder / rel)
    (folder / "notes.txt").write_text("mine\n")
    assert main(["--verify", str(folder), "--manifest", str(manifest)]) == 0
    assert "extra: notes.txt (not in the manifest; not an error)" in capsys.readouterr().out

    refusals = folder / "tofu/idontknow.txt"
    refusals.write_bytes(refusals.read_bytes().replace(b"I", b"i", 1))  # same size, other digest
    (folder / "tofu/real_authors_perturbed.jsonl").unlink()
    with open(folder / "utility/human_eval.jsonl", "ab") as handle:
        handle.write(b"\n")
    assert main(["--verify", str(folder), "--manifest", str(manifest)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if not line.startswith("extra:")] == [
        f"wrong sha256: tofu/idontknow.txt: {file_digest(refusals)}, the manifest says "
        f"{load_manifest()['tofu/idontknow.txt']['sha256']}",
        "missing: tofu/real_authors_perturbed.jsonl",
        f"wrong size: utility/human_eval.jsonl: {(data_dir / 'utility/human_eval.jsonl').stat().st_size + 1} bytes, "
        f"the manifest says {load_manifest()['utility/human_eval.jsonl']['size']}",
    ]


def test_fetch_rebuilds_files_from_a_local_mirror(data_dir, tmp_path, capsys):
    mirror = make_mirror(data_dir, tmp_path / "mirror", FETCHED)
    manifest, folder = sub_manifest(tmp_path, (*FETCHED, "tofu/author_index.tsv")), tmp_path / "fetched"
    assert main([str(folder), "--mirror", str(mirror), "--manifest", str(manifest)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"fetching {len(FETCHED) + 1} files into {folder} from {mirror}"
    assert out[1].startswith("absent: tofu/author_index.tsv: not an error, it cannot be fetched: derived")
    assert out[2].startswith(f"ok: {folder}: {len(FETCHED)} files")
    for rel in FETCHED:
        assert (folder / rel).read_bytes() == (data_dir / rel).read_bytes(), rel

    def no_network(origin):
        raise AssertionError(f"downloaded {origin.url} again")
    assert fetch(folder, load_manifest(manifest), no_network) == []  # a rerun keeps files that match


def test_fetch_writes_nothing_it_cannot_match(data_dir, tmp_path, capsys):
    mirror = make_mirror(data_dir, tmp_path / "mirror", FETCHED[:2])
    origin = origin_of(FETCHED[1])
    source = mirror / origin.repo / origin.commit / origin.path
    source.write_bytes(source.read_bytes().replace(b"I ", b"We ", 1))  # upstream changed
    manifest, folder = sub_manifest(tmp_path, FETCHED[1:3]), tmp_path / "fetched"
    assert main([str(folder), "--mirror", str(mirror), "--manifest", str(manifest)]) == 1
    out = capsys.readouterr().out.splitlines()[1:]
    assert out[0].startswith(f"failed: tofu/idontknow.txt: {origin.url} converts to sha256 ")
    assert out[0].endswith("; not written")
    assert out[1].startswith("failed: utility/triviaqa.jsonl: https://raw.githubusercontent.com/mosaicml/llm-foundry/")
    assert out[1].endswith("not found in the mirror")
    assert len(out) == 2 and not (folder / "tofu/idontknow.txt").exists()


def test_fetch_stops_when_the_source_cannot_be_reached(tmp_path):
    calls = []

    def offline(origin):
        calls.append(origin)
        raise urllib.error.URLError("Name or service not known")
    problems = fetch(tmp_path / "data", load_manifest(), offline)
    assert len(calls) == 1 and problems[1].startswith("stopped: the source cannot be reached")
    assert problems[0].startswith(f"failed: corpus/wikitext2_raw_test.txt: {calls[0].url}: <urlopen error ")


def test_json_lines_writes_the_folder_format(data_dir):
    """The conversion's writer reproduces the folder's JSON Lines byte for byte (escapes, field order, spacing)."""
    for rel in ("tofu/forget01_subject.jsonl", "real_world/forget_subject.jsonl", "utility/triviaqa.jsonl"):
        assert json_lines((data_dir / rel).read_bytes()) == (data_dir / rel).read_bytes(), rel


def test_write_manifest_lists_data_files_only(tmp_path, capsys):
    folder = tmp_path / "data"
    (folder / "tofu").mkdir(parents=True)
    (folder / "tofu/a.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (folder / "PROVENANCE.md").write_text("# where it came from\n")
    (folder / "tofu/.a.jsonl.tmp-host-1-x").write_text("half")  # an interrupted atomic write
    manifest = tmp_path / "manifest.json"
    assert main(["--write-manifest", str(folder), "--manifest", str(manifest)]) == 0
    files = load_manifest(manifest)
    assert list(files) == ["tofu/a.jsonl"] and files["tofu/a.jsonl"]["size"] == 33
    assert main(["--verify", str(folder), "--manifest", str(manifest)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"ok: {folder}: 1 files (0.0 MB) match the manifest"


@pytest.mark.parametrize(("args", "message"), [
    (["--verify", "{tmp}/absent"], "error: {tmp}/absent: not a directory"),
    (["--verify", "{tmp}", "--manifest", "{tmp}/m.json"], "error: manifest {tmp}/m.json: cannot read its 'files'"),
    (["--verify", "{tmp}", "--manifest", "{tmp}/bad.json"],
     "error: manifest {tmp}/bad.json: entry 'x' must be {\"size\": int, \"sha256\": 64 hex}"),
    (["{tmp}/out", "--manifest", "{tmp}/escape.json"],
     "error: manifest {tmp}/escape.json: entry '../x' must be a path inside the folder"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, args, message):
    (tmp_path / "bad.json").write_text(json.dumps({"files": {"x": {"size": 1, "sha256": "abc"}}}))
    (tmp_path / "escape.json").write_text(json.dumps({"files": {"../x": {"size": 1, "sha256": "0" * 64}}}))
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1
