"""`unierase-data`: build the data folder from its public sources, or check a folder against the manifest.

    unierase-data DIR                     download every file into DIR (its layout: tofu/, real_world/, utility/,
                                          corpus/), convert it to the form the loaders read, keep it only if its
                                          sha256 is the manifest's, then verify DIR
    unierase-data --verify DIR            check DIR against the manifest: one line per problem, exit 1 on any
    unierase-data --write-manifest DIR    regenerate the manifest from DIR (the maintainers' folder)

The manifest (`data_manifest.json`, next to this file) lists every data file with its size and sha256; it was
written by `--write-manifest ../shared/data`. `PROVENANCE.md` is left out: it documents the folder, no loader
reads it and no public source holds it, so a fetched folder could never match it.

The sources are the pinned GitHub commits that `../shared/data/PROVENANCE.md` names, one function per source
below, each saying where a data file comes from and how it is converted. They, not the Hugging Face datasets,
are what the folder was made from: `locuslab/TOFU` lacks closer-look's task partition, `original_answer`
and the UniErase subjects, and `cais/mmlu` is a later release (14,042 test items, not 14,079), so neither
could reproduce these bytes. `tofu/author_index.tsv` has no source (UNFETCHABLE says why) and is not fetched.

The network is one function (`Download`): `--mirror DIR` reads the same files from a local copy laid out as
`DIR/<owner>/<repo>/<commit>/<path>` instead, which is also how the tests run the fetch path offline.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import http.client
import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unierase.io import atomic_write_json, atomic_write_text, file_digest

MANIFEST = Path(__file__).with_name("data_manifest.json")
EXCLUDED = {"PROVENANCE.md": "documentation of the folder, written by hand: no loader reads it, no source holds it"}
UNFETCHABLE = {
    "tofu/author_index.tsv": "derived by the data folder's maintainers (author names picked by a heuristic, "
                             "author 88 annotated by hand; PROVENANCE.md, 'Author counts'), so no public source "
                             "holds it; no loader reads it, so a folder without it works",
}

UNIERASE = ("shleeku/UniErase", "9c17bfbf557d6c4491478e6212e474c71ba2298d")
HENDRYCKS_TEST = ("hendrycks/test", "785eba57b455b9f9be12a0d3c1106d67274fea0e")
LLM_FOUNDRY = ("mosaicml/llm-foundry", "8c8dd48f72168c5d51e2f7b151595892a8fba43d")
TYLOQUANT = ("Tylogi/TyloQuant", "7989d038b13ca737da11a95fb90e77ae059f33c0")
PYTORCH_EXAMPLES = ("pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8")


class DataFetchError(ValueError):
    """Bad input to `unierase-data` (a folder, a manifest); the message names it."""


# ---------------------------------------------------------------- conversions (source bytes -> folder bytes)

def copy(raw: bytes) -> bytes:
    return raw


def crlf_to_lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def _dump(row: dict[str, Any]) -> str:
    # U+0085/2028/2029 are escaped so that str.splitlines() cannot split a record (PROVENANCE.md, conventions).
    text = json.dumps(row, ensure_ascii=False)
    return text.replace("\u0085", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _records(raw: bytes) -> list[dict[str, Any]]:
    """The objects of JSON Lines that may hold Python dict reprs (closer-look's `*_subject`, UniErase's utility
    sets) and CRLF endings. Split at LF only: a raw U+0085 inside a string is not a line break."""
    rows = []
    for number, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            try:
                row = ast.literal_eval(line)
            except (ValueError, SyntaxError):
                raise ValueError(f"line {number}: neither JSON nor a Python literal") from None
        if not isinstance(row, dict):
            raise ValueError(f"line {number}: not an object")
        rows.append(row)
    return rows


def json_lines(raw: bytes) -> bytes:
    return "".join(_dump(row) + "\n" for row in _records(raw)).encode("utf-8")


def triviaqa_lines(raw: bytes) -> bytes:
    """llm-foundry's rows with `question` added first: `context` less "Question: " and "\\nAnswer:"."""
    out = []
    for number, row in enumerate(_records(raw), start=1):
        context = row.get("context")
        match = re.fullmatch(r"Question: (.*)\nAnswer:", context, flags=re.DOTALL) if isinstance(context, str) else None
        if not match:
            raise ValueError(f"record {number}: context is not 'Question: ...\\nAnswer:'")
        out.append(_dump({"question": match.group(1), **row}) + "\n")
    return "".join(out).encode("utf-8")


# ---------------------------------------------------------------- sources: where each data file comes from

@dataclass(frozen=True)
class Origin:
    repo: str  # owner/name on GitHub
    commit: str
    path: str  # inside the repository
    convert: Callable[[bytes], bytes]

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.path}"


def closer_look(rel: str) -> Origin | None:
    """tofu/ and real_world/: closer-look's data as UniErase vendors it (`.json` files that are JSON Lines)."""
    if rel == "tofu/idontknow.txt":
        return Origin(*UNIERASE, "closer-look-LLM-unlearning/data/idontknow.txt", crlf_to_lf)
    if rel.split("/")[0] in ("tofu", "real_world") and rel.endswith(".jsonl"):
        return Origin(*UNIERASE, f"closer-look-LLM-unlearning/data/{rel.removesuffix('.jsonl')}.json", json_lines)
    return None


def unierase_utility(rel: str) -> Origin | None:
    """GSM8K (test) and HumanEval as UniErase's utility evaluation ships them (Python dict reprs)."""
    if rel in ("utility/gsm8k.jsonl", "utility/human_eval.jsonl"):
        return Origin(*UNIERASE, f"utility_evaluation/dataset/{rel.removeprefix('utility/')}", json_lines)
    return None


def hendrycks_mmlu(rel: str) -> Origin | None:
    """MMLU: the last commit of hendrycks/test that holds the CSVs in git, byte for byte."""
    if rel.startswith("utility/mmlu/"):
        return Origin(*HENDRYCKS_TEST, f"data/{rel.removeprefix('utility/mmlu/')}", copy)
    return None


def llm_foundry_triviaqa(rel: str) -> Origin | None:
    """TriviaQA: the MosaicML Eval Gauntlet's closed-book subset of 3,000 questions."""
    if rel == "utility/triviaqa.jsonl":
        return Origin(*LLM_FOUNDRY, "scripts/eval/local_data/world_knowledge/triviaqa_sm_sub.jsonl", triviaqa_lines)
    return None


def wikitext(rel: str) -> Origin | None:
    """WikiText-2: raw test (CRLF, empty lines dropped by the uploader) and tokenized validation, byte for byte."""
    if rel == "corpus/wikitext2_raw_test.txt":
        return Origin(*TYLOQUANT, "data/wikitext-2-raw/wiki.test.raw", copy)
    if rel == "corpus/wikitext2_tokenized_valid.txt":
        return Origin(*PYTORCH_EXAMPLES, "word_language_model/data/wikitext-2/valid.txt", copy)
    return None


SOURCES = (closer_look, unierase_utility, hendrycks_mmlu, llm_foundry_triviaqa, wikitext)


def origin_of(rel: str) -> Origin | None:
    return next((origin for source in SOURCES if (origin := source(rel)) is not None), None)


# ---------------------------------------------------------------- the network, injectable

Download = Callable[[Origin], bytes]


def github_download(origin: Origin) -> bytes:
    with urllib.request.urlopen(origin.url, timeout=120) as response:  # its errors are OSErrors
        return response.read()


def mirror_download(root: Path) -> Download:
    """Read the sources from a local copy, `root/<owner>/<repo>/<commit>/<path>` (offline use, tests)."""
    def download(origin: Origin) -> bytes:
        path = root / origin.repo / origin.commit / origin.path
        if not path.is_file():
            raise OSError(f"{path} not found in the mirror")
        return path.read_bytes()
    return download


# ---------------------------------------------------------------- manifest, verify, fetch

def load_manifest(path: Path = MANIFEST) -> dict[str, dict[str, Any]]:
    """{relative path: {"size": int, "sha256": hex}}, checked."""
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataFetchError(f"manifest {path}: cannot read its 'files' ({err})") from None
    if not isinstance(files, dict):
        raise DataFetchError(f"manifest {path}: 'files' must map relative paths to entries")
    for rel, entry in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:  # the fetch writes DIR/rel: never outside DIR
            raise DataFetchError(f"manifest {path}: entry {rel!r} must be a path inside the folder")
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))):
            raise DataFetchError(f"manifest {path}: entry {rel!r} must be {{\"size\": int, \"sha256\": 64 hex}}")
    return files


def data_files(folder: Path) -> list[str]:
    """Relative paths of the files under `folder`, less EXCLUDED and hidden ones (an interrupted atomic write's
    temporaries are hidden)."""
    paths = (path.relative_to(folder) for path in folder.rglob("*") if path.is_file())
    return sorted(rel.as_posix() for rel in paths
                  if rel.as_posix() not in EXCLUDED and not any(part.startswith(".") for part in rel.parts))


def _require_dir(folder: Path) -> None:
    if not folder.is_dir():
        raise DataFetchError(f"{folder}: not a directory")


def write_manifest(folder: Path, out: Path = MANIFEST) -> int:
    _require_dir(folder)
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": file_digest(folder / rel)}
             for rel in data_files(folder)}
    if not files:
        raise DataFetchError(f"{folder}: no data files")
    atomic_write_json(out, {
        "about": "Every file of the unierase data folder (paths.data_dir), its size in bytes and sha256. Regenerate "
                 "with `unierase-data --write-manifest DIR`; check a folder with `unierase-data --verify DIR`.",
        "excluded": EXCLUDED, "files": files})
    return len(files)


def verify(folder: Path, manifest: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(problems, notes): a missing file, a wrong size or sha256 is a problem; an extra file, or an UNFETCHABLE
    one that is absent, is a note."""
    _require_dir(folder)
    problems, notes = [], []
    for rel, entry in sorted(manifest.items()):
        path = folder / rel
        if not path.is_file():
            if rel in UNFETCHABLE:
                notes.append(f"absent: {rel}: not an error, it cannot be fetched: {UNFETCHABLE[rel]}")
            else:
                problems.append(f"missing: {rel}")
        elif (size := path.stat().st_size) != entry["size"]:
            problems.append(f"wrong size: {rel}: {size} bytes, the manifest says {entry['size']}")
        elif (digest := file_digest(path)) != entry["sha256"]:
            problems.append(f"wrong sha256: {rel}: {digest}, the manifest says {entry['sha256']}")
    notes += [f"extra: {rel} (not in the manifest; not an error)" for rel in data_files(folder) if rel not in manifest]
    return problems, notes


def fetch(folder: Path, manifest: dict[str, dict[str, Any]], download: Download = github_download) -> list[str]:
    """Write every fetchable manifest file into `folder`; the problems, one line each. A file is written only
    when its converted bytes have the manifest's sha256, so a changed source never yields a wrong file."""
    if folder.exists() and not folder.is_dir():
        raise DataFetchError(f"{folder}: not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    problems = []
    for rel, entry in sorted(manifest.items()):
        path, origin = folder / rel, origin_of(rel)
        if origin is None:
            if rel not in UNFETCHABLE:  # those are reported by verify
                problems.append(f"not fetched: {rel}: no source is known for it (add one to unierase/data_fetch.py)")
            continue
        if path.is_file() and path.stat().st_size == entry["size"] and file_digest(path) == entry["sha256"]:
            continue  # already there: a rerun only fetches what is missing or wrong
        try:
            data = origin.convert(download(origin))
        except (OSError, ValueError, http.client.HTTPException) as err:
            problems.append(f"failed: {rel}: {origin.url}: {err}")
            if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
                # No answer at all (offline, DNS, TLS): every other file would fail the same way.
                problems.append("stopped: the source cannot be reached; the files fetched so far are kept "
                                "(rerun when online, or pass --mirror)")
                break
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            problems.append(f"failed: {rel}: {origin.url} converts to sha256 {digest}, the manifest says "
                            f"{entry['sha256']}; not written")
            continue
        atomic_write_text(path, data.decode("utf-8"))  # every file is UTF-8; the digest above was of these bytes
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="unierase-data", description="Fetch the unierase data folder from its public sources, or verify one.")
    parser.add_argument("folder", type=Path, metavar="DIR", help="the data folder to write or check")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--verify", action="store_true", help="only check DIR against the manifest")
    mode.add_argument("--write-manifest", action="store_true", help="regenerate the manifest from DIR")
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help=f"manifest to use (default: {MANIFEST})")
    parser.add_argument("--mirror", type=Path, metavar="MIRROR",
                        help="read the sources from MIRROR/<owner>/<repo>/<commit>/<path> instead of GitHub")
    args = parser.parse_args(argv)
    try:
        if args.write_manifest:
            print(f"wrote {args.manifest}: {write_manifest(args.folder, args.manifest)} files of {args.folder}")
            return 0
        manifest = load_manifest(args.manifest)
        if args.mirror is not None:
            _require_dir(args.mirror)
        if not args.verify:
            print(f"fetching {len(manifest)} files into {args.folder} from {args.mirror or 'GitHub (pinned commits)'}",
                  flush=True)
        fetched = [] if args.verify else fetch(
            args.folder, manifest, github_download if args.mirror is None else mirror_download(args.mirror))
        for line in fetched:
            print(line)
        problems, notes = verify(args.folder, manifest)
    except DataFetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    # After a failed fetch its own lines name the files; verify's "missing" lines would repeat them.
    for line in notes + (problems if not fetched else []):
        print(line)
    if fetched or problems:
        return 1
    present = [entry["size"] for rel, entry in manifest.items() if (args.folder / rel).is_file()]
    print(f"ok: {args.folder}: {len(present)} files ({sum(present) / 1e6:.1f} MB) match the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
