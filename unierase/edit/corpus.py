"""The generic text corpus whose down_proj inputs stand for preserved knowledge.

A folder of WikiText-style *.txt files, read as articles and cut into token chunks for the second moments.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unierase.io import DataError

_TOP_HEADING = re.compile(r"^= [^=].* =$")  # " = Title = " (stripped); " = = Section = = " is a sub-heading
_ANY_HEADING = re.compile(r"^=( =)* .* =( =)*$")
_WIKITEXT_SPACING = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def corpus_files(corpus_dir: Path) -> list[Path]:
    """The corpus's *.txt files, sorted, so chunks and the cache key never depend on listing order."""
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise DataError(f"no *.txt corpus files in {corpus_dir} (WikiText-style text files; set edit.mom2_corpus)")
    return files


def read_documents(path: Path) -> Iterator[str]:
    """WikiText articles: split at top-level headings, headings and <unk> dropped, spacing undone."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as handle:  # text mode turns CRLF into LF
        for raw in handle:
            line = raw.strip()
            if _TOP_HEADING.match(line) and lines:
                yield "\n".join(lines)
                lines = []
            if not line or _ANY_HEADING.match(line):
                continue
            line = re.sub(r"\s*<unk>", "", line)
            for spaced, plain in _WIKITEXT_SPACING:
                line = line.replace(spaced, plain)
            if line.strip():
                lines.append(line.strip())
    if lines:
        yield "\n".join(lines)


def corpus_chunks(tokenizer: Any, corpus_dir: Path, chunk_tokens: int, n_samples: int | None) -> list[list[int]]:
    """Token chunks of at most `chunk_tokens` tokens (BOS included), per document, capped at `n_samples`."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = chunk_tokens - len(bos)
    if body < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} leaves no room after BOS")
    chunks: list[list[int]] = []
    for path in corpus_files(corpus_dir):
        for document in read_documents(path):
            ids = tokenizer(document, add_special_tokens=False).input_ids
            for start in range(0, len(ids), body):
                chunks.append(bos + ids[start:start + body])
                if n_samples is not None and len(chunks) >= n_samples:
                    return chunks
    return chunks
