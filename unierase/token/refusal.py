"""Which refusal each question is trained to give: a stable pseudo-random pick from the refusal pool."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence


def refusal_index(question: str, pool_size: int, salt: str = "") -> int:
    """idx(q) = int.from_bytes(SHA-256(salt ‖ q)[0:8], "big") mod |pool|."""
    digest = hashlib.sha256(salt.encode("utf-8") + question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], byteorder="big") % pool_size


def refusal_for(question: str, pool: Sequence[str], salt: str = "") -> str:
    """The stable refusal of `question`: the same on every process and machine."""
    if not pool:
        raise ValueError("the refusal pool is empty")
    return pool[refusal_index(question, len(pool), salt)]
