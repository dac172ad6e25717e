"""Optional: fetch TOFU from the Hugging Face hub (`locuslab/TOFU`) into the local layout.

Only for users with network. The hub has no continual task ids or subjects, so every row is
task "1" and edits fall back to last-token keys.
"""
from __future__ import annotations

import os
from pathlib import Path

from unierase.io import atomic_write_jsonl, atomic_write_text

HUB_CONFIGS = {
    "forget01_perturbed": "forget01_perturbed", "forget05_perturbed": "forget05_perturbed",
    "forget10_perturbed": "forget10_perturbed", "retain90": "retain90",
    "retain_perturbed": "retain_perturbed", "real_authors_perturbed": "real_authors_perturbed",
    "world_facts_perturbed": "world_facts_perturbed",
}
REFUSALS = "I'm not sure.\nI don't know.\nThat's not something I'm familiar with.\n"


def download_tofu(cache: Path | None = None) -> Path:
    from datasets import load_dataset

    root = cache or Path(os.environ.get("UNIERASE_HUB_CACHE", "outputs/cache/hub_data"))
    tofu = root / "tofu"
    for file, config in HUB_CONFIGS.items():
        path = tofu / f"{file}.jsonl"
        if not path.exists():
            rows = [dict(row, task_id="1") for row in load_dataset("locuslab/TOFU", config, split="train")]
            atomic_write_jsonl(path, rows)
    if not (tofu / "idontknow.txt").exists():
        atomic_write_text(tofu / "idontknow.txt", REFUSALS)
    return root
