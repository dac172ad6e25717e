"""Stage A's result on disk: the trained rows plus what produced them, re-applied to a fresh model
on a cache hit, and the cache key that names it."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedModel

from unierase.io import atomic_dir, atomic_write_json, stable_hash
from unierase.models import ModelConfig, save_model, untie_output_embeddings
from unierase.token.config import TokenConfig
from unierase.token.vocabulary import is_tied, register_tokens, write_embedding_rows


@dataclass
class TokenArtifact:
    """Everything Stage A changed: enough to re-apply the token to a fresh model."""

    tokens: list[str]
    token_ids: list[int]
    input_rows: torch.Tensor  # (K, d) fp32
    output_rows: torch.Tensor | None  # (K, d) fp32 for an untied model, else None
    tied: bool
    refusals: dict[str, str]  # question -> assigned refusal
    token_of: dict[str, str]  # question -> its token string
    pool: list[str]
    losses: dict[str, list[float]]
    config: dict[str, Any]
    sanity: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # questions dropped by on_truncation=skip
    rendered_example: str = ""  # one rendered chat-format training text (template record)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def _meta(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens, "token_ids": self.token_ids, "tied": self.tied,
            "hidden_size": int(self.input_rows.shape[1]), "refusals": self.refusals,
            "token_of": self.token_of, "pool": self.pool, "losses": self.losses, "config": self.config,
            "sanity": self.sanity, "skipped": self.skipped, "rendered_example": self.rendered_example,
        }

    def save(self, directory: Path, model: PreTrainedModel | None = None) -> Path:
        """Write rows (safetensors), token.json and the tokenizer atomically into `directory`.

        With `config.save_full_model` and a `model`, the enlarged model is saved under `model/` too.
        """
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            tensors = {"input_rows": self.input_rows.detach().float().contiguous().cpu()}
            if self.output_rows is not None:
                tensors["output_rows"] = self.output_rows.detach().float().contiguous().cpu()
            save_file(tensors, str(tmp / "rows.safetensors"))
            atomic_write_json(tmp / "token.json", self._meta())
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            if model is not None and self.config.get("save_full_model"):
                save_model(model, self.tokenizer, tmp / "model")
        return directory

    @classmethod
    def load(cls, directory: Path) -> TokenArtifact:
        directory = Path(directory)
        meta = json.loads((directory / "token.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / "rows.safetensors"))
        tokenizer = None
        if (directory / "tokenizer").is_dir():
            tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        return cls(
            tokens=meta["tokens"], token_ids=meta["token_ids"], input_rows=tensors["input_rows"],
            output_rows=tensors.get("output_rows"), tied=meta["tied"], refusals=meta["refusals"],
            token_of=meta["token_of"], pool=meta["pool"], losses=meta["losses"], config=meta["config"],
            sanity=meta.get("sanity", {}), skipped=meta.get("skipped", []),
            rendered_example=meta.get("rendered_example", ""), tokenizer=tokenizer,
        )

    def apply(self, model: PreTrainedModel, tokenizer: Any) -> list[int]:
        """Add the tokens to a fresh tokenizer/model (ids must match) and write the trained rows.

        A tokenizer that already holds the tokens at the same ids (e.g. a saved enlarged model) is
        accepted as is. Output rows: a tied model uses the input rows (refused if the artifact has
        different untied output rows); an untied model gets `output_rows`, or the input rows when
        the artifact was trained on a tied model (the share rule). An artifact trained with
        `untie_output` unties a tied model first.
        """
        if self.config.get("untie_output"):
            untie_output_embeddings(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        if hidden != self.input_rows.shape[1]:
            raise ValueError(f"artifact rows have width {self.input_rows.shape[1]}, the model {hidden}")
        vocab = tokenizer.get_vocab()
        if all(t in vocab for t in self.tokens):
            ids = tokenizer.convert_tokens_to_ids(list(self.tokens))
            size = max(model.get_input_embeddings().weight.shape[0], max(ids) + 1)
            if size != model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(size, mean_resizing=False)
        elif any(t in vocab for t in self.tokens):
            raise ValueError("tokenizer holds only some of the artifact's tokens")
        else:
            ids = register_tokens(model, tokenizer, self.tokens)
        if list(ids) != list(self.token_ids):
            raise ValueError(f"token ids differ: artifact {self.token_ids}, this tokenizer {list(ids)}")
        write_embedding_rows(model.get_input_embeddings().weight, ids, self.input_rows)
        if is_tied(model):
            if self.output_rows is not None and not torch.equal(self.output_rows, self.input_rows):
                raise ValueError("artifact was trained with separate output rows; this model is tied")
        else:
            out = self.output_rows if self.output_rows is not None else self.input_rows
            write_embedding_rows(model.get_output_embeddings().weight, ids, out)
        return list(ids)


def artifact_key(model_id: str, cfg: TokenConfig, questions: Sequence[str], pool: Sequence[str],
                 model_cfg: ModelConfig, perturb_layers: Sequence[int],
                 anchors: Sequence[tuple[str, str]] = ()) -> str:
    """Cache key of a token artifact: model identity, token config, the exact data and format."""
    return stable_hash({
        "model": model_id, "token": asdict(cfg), "questions": list(questions), "pool": list(pool),
        "format": [model_cfg.system_prompt, model_cfg.date_string], "perturb_layers": list(perturb_layers),
        "anchors": [list(pair) for pair in anchors[: cfg.output_anchors]],
    })
