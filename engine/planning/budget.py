"""Exact memory math for multi-LoRA serving: the ONE source of truth for sizes (torch-free).

Every byte count a user reads in `mlora budget`, and every LoRA stack the engine's slot
allocator creates, comes from the functions here, derived from the model's own config:

- A LoRA module on a linear `W: [out, in]` stores A `[r, in]` and B `[out, r]`, i.e.
  `r * (in + out)` elements per layer (not the folklore `2 * r * out`).
- A slot is one adapter's worth of A/B stacks for every target module of every layer, padded to
  the slot rank. `adapter_slot_bytes` is computed from `slot_stack_shapes` itself, so what the
  allocator allocates (`slot_stack_shapes(..., max_loras=N)`) is `N * adapter_slot_bytes` by
  construction.
- KV cache per token: `2 (K and V) * layers * kv_heads * head_dim * dtype_bytes` (GQA-aware).

`head_dim` is the config's `head_dim` when present (Qwen3, Llama-3.2, some Mistral), else
`hidden_size // num_attention_heads`; q_proj out = heads*head_dim, k/v out = kv_heads*head_dim,
o_proj in = heads*head_dim — exactly as transformers builds the Llama-family linears.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

from engine.config import dtype_name
from engine.errors import ConfigError

LORA_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_MODULES: tuple[str, ...] = LORA_MODULES[:4]
MLP_MODULES: tuple[str, ...] = LORA_MODULES[4:]

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def normalize_dtype(dtype: object) -> str:
    """Canonical dtype name ("float16" | "bfloat16" | "float32") from a name, alias or torch.dtype."""
    text = dtype_name(dtype)
    if text not in _DTYPE_BYTES:
        raise ConfigError(
            f"unsupported dtype {dtype!s}; use one of float16, bfloat16, float32 (or fp16, bf16, fp32)",
            exit_code=2,
        )
    return text


def dtype_bytes(dtype: object) -> int:
    """Bytes per element of `dtype` (a name like "bf16"/"bfloat16", or a torch.dtype)."""
    return _DTYPE_BYTES[normalize_dtype(dtype)]


_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ModelDims:
    """The config facts the byte math needs, for a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3).

    `bias_modules`: which of LORA_MODULES carry a bias (Qwen2: q,k,v; Llama: per attention_bias /
    mlp_bias). `qk_norm`: per-layer RMSNorm on q and k over head_dim (Qwen3). Both only affect
    base-weight bytes, never LoRA slots.
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    max_position_embeddings: int | None = None
    model_type: str = "llama"
    bias_modules: tuple[str, ...] = ()
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise ConfigError(
                f"model config: num_attention_heads ({self.heads}) is not a multiple of "
                f"num_key_value_heads ({self.kv_heads})"
            )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Any) -> ModelDims:
        """Dims from a config.json dict or a transformers PretrainedConfig; ConfigError names missing fields."""
        d = _config_dict(cfg)
        if "hidden_size" not in d and isinstance(d.get("text_config"), Mapping):
            d = dict(d["text_config"])  # multimodal wrappers keep the LM config nested
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ConfigError(
                f"model config is missing required field(s): {', '.join(missing)}",
                hint="a Llama-family config.json needs " + ", ".join(_REQUIRED),
            )
        hidden, heads = _as_int(d, "hidden_size"), _as_int(d, "num_attention_heads")
        kv_heads = _as_int(d, "num_key_value_heads") if d.get("num_key_value_heads") else heads
        if d.get("head_dim"):
            head_dim = _as_int(d, "head_dim")
        elif hidden % heads == 0:
            head_dim = hidden // heads
        else:
            raise ConfigError(f"model config: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        model_type = str(d.get("model_type") or "llama")
        raw_dtype = d.get("torch_dtype") or d.get("dtype")
        try:
            torch_dtype = normalize_dtype(raw_dtype) if raw_dtype else None
        except ConfigError:
            torch_dtype = None  # e.g. float8 checkpoints: the caller must pick --dtype
        max_pos = d.get("max_position_embeddings")
        return cls(
            hidden=hidden,
            intermediate=_as_int(d, "intermediate_size"),
            layers=_as_int(d, "num_hidden_layers"),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=_as_int(d, "vocab_size"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            torch_dtype=torch_dtype,
            max_position_embeddings=int(max_pos) if max_pos else None,
            model_type=model_type,
            bias_modules=_bias_modules(model_type, d),
            qk_norm=model_type == "qwen3",
        )


def _config_dict(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):  # transformers.PretrainedConfig, without importing transformers
        d = cfg.to_dict()
        for key in ("head_dim", "num_key_value_heads"):  # attributes some configs compute lazily
            if d.get(key) is None and getattr(cfg, key, None) is not None:
                d[key] = getattr(cfg, key)
        return d
    raise ConfigError(f"expected a config dict or a transformers PretrainedConfig, got {type(cfg).__name__}")


def _as_int(d: Mapping[str, Any], key: str) -> int:
    value = d[key]
    # a float must be integral and finite: int(NaN) / int(inf) would raise ValueError / OverflowError
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"model config: {key} must be an integer, got {value!r}")
    return int(value)


def _bias_modules(model_type: str, d: Mapping[str, Any]) -> tuple[str, ...]:
    if model_type == "qwen2":  # transformers hard-codes bias=True on q/k/v (not o) for Qwen2
        return ("q_proj", "k_proj", "v_proj")
    if model_type == "mistral":  # Mistral's linears never take a bias
        return ()
    out: tuple[str, ...] = ATTN_MODULES if d.get("attention_bias") else ()
    return out + (MLP_MODULES if d.get("mlp_bias") else ())


def normalize_modules(modules: Iterable[str] | str) -> tuple[str, ...]:
    """Target modules in canonical order; accepts "q" or "q_proj", comma strings, "all"/"all-linear"."""
    items = modules.split(",") if isinstance(modules, str) else list(modules)
    out: set[str] = set()
    for raw in items:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name in ("all", "all-linear", "all_linear"):
            out.update(LORA_MODULES)
            continue
        full = name if name.endswith("_proj") else name + "_proj"
        if full not in LORA_MODULES:
            raise ConfigError(
                f"unknown target module {raw!r}; choose from {', '.join(LORA_MODULES)} (or 'all')", exit_code=2
            )
        out.add(full)
    if not out:
        raise ConfigError("no target modules given", exit_code=2)
    return tuple(m for m in LORA_MODULES if m in out)


def lora_module_shape(dims: ModelDims, module: str) -> tuple[int, int]:
    """(in_features, out_features) of decoder linear `module`, as transformers builds it."""
    q_out, kv_out = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    shapes = {
        "q_proj": (dims.hidden, q_out),
        "k_proj": (dims.hidden, kv_out),
        "v_proj": (dims.hidden, kv_out),
        "o_proj": (q_out, dims.hidden),
        "gate_proj": (dims.hidden, dims.intermediate),
        "up_proj": (dims.hidden, dims.intermediate),
        "down_proj": (dims.intermediate, dims.hidden),
    }
    if module not in shapes:
        raise ConfigError(f"unknown LoRA module {module!r}; choose from {', '.join(LORA_MODULES)}")
    return shapes[module]


def slot_stack_shapes(
    dims: ModelDims, *, max_loras: int, max_rank: int, modules: Iterable[str] = LORA_MODULES
) -> dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Per target module, the shapes of ONE layer's LoRA stacks: A `[max_loras, max_rank, in]`, B `[max_loras, out, max_rank]`.

    The slot allocator allocates these for each of `dims.layers` layers; budget sizes come from here too.
    """
    _check_positive(max_loras=max_loras, max_rank=max_rank)
    out: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {}
    for module in normalize_modules(modules):
        in_f, out_f = lora_module_shape(dims, module)
        out[module] = ((max_loras, max_rank, in_f), (max_loras, out_f, max_rank))
    return out


def total_slot_bytes(
    dims: ModelDims, *, max_loras: int, max_rank: int, modules: Iterable[str] = LORA_MODULES, dtype: object
) -> int:
    """Bytes the slot allocator allocates: every layer's A and B stacks for `max_loras` slots."""
    stacks = slot_stack_shapes(dims, max_loras=max_loras, max_rank=max_rank, modules=modules)
    per_layer = sum(prod(a) + prod(b) for a, b in stacks.values())
    return dims.layers * per_layer * dtype_bytes(dtype)


def adapter_slot_bytes(dims: ModelDims, *, rank: int, modules: Iterable[str] = LORA_MODULES, dtype: object) -> int:
    """Bytes of ONE adapter slot at slot rank `rank`, over all layers (= total_slot_bytes with max_loras=1)."""
    return total_slot_bytes(dims, max_loras=1, max_rank=rank, modules=modules, dtype=dtype)


def lora_params_per_rank(dims: ModelDims, modules: Iterable[str] = LORA_MODULES) -> int:
    """LoRA elements per unit of rank for one adapter over all layers: layers * sum(in + out)."""
    return dims.layers * sum(sum(lora_module_shape(dims, m)) for m in normalize_modules(modules))


def linear_weight_bytes(dims: ModelDims, dtype: object) -> int:
    """W: bytes of all decoder-layer linears (q,k,v,o,gate,up,down weights + their biases), all layers.

    This is what a decode step streams through the LoRA-carrying linears. It excludes the
    lm_head (see `lm_head_bytes`), which a decode step also reads in full: a memory-traffic
    bound for one decode step is `linear_weight_bytes + lm_head_bytes` (+ KV reads); the
    embedding is a gather of a few rows and the norms are negligible.
    """
    per_layer = 0
    for module in LORA_MODULES:
        in_f, out_f = lora_module_shape(dims, module)
        per_layer += in_f * out_f + (out_f if module in dims.bias_modules else 0)
    return dims.layers * per_layer * dtype_bytes(dtype)


def lm_head_bytes(dims: ModelDims, dtype: object) -> int:
    """Bytes of the output projection [vocab, hidden]; read every decode step even when tied to the embedding."""
    return dims.vocab * dims.hidden * dtype_bytes(dtype)


def base_weight_breakdown(dims: ModelDims, dtype: object) -> dict[str, int]:
    """Base-model parameter bytes by part: embed_tokens, lm_head (0 when tied), decoder_linears, norms."""
    nbytes = dtype_bytes(dtype)
    norms_per_layer = 2 * dims.hidden + (2 * dims.head_dim if dims.qk_norm else 0)
    return {
        "embed_tokens": dims.vocab * dims.hidden * nbytes,
        "lm_head": 0 if dims.tie_word_embeddings else lm_head_bytes(dims, dtype),
        "decoder_linears": linear_weight_bytes(dims, dtype),
        "norms": (dims.layers * norms_per_layer + dims.hidden) * nbytes,
    }


def base_weight_bytes(dims: ModelDims, dtype: object) -> int:
    """Bytes of every base-model parameter in `dtype` (tied embeddings counted once)."""
    return sum(base_weight_breakdown(dims, dtype).values())


def kv_bytes_per_token(dims: ModelDims, dtype: object) -> int:
    """KV-cache bytes per token: 2 (K, V) * layers * kv_heads * head_dim * dtype bytes."""
    return 2 * dims.layers * dims.kv_heads * dims.head_dim * dtype_bytes(dtype)


def kv_tokens(available_bytes: int, dims: ModelDims, dtype: object, *, block_size: int) -> int:
    """Tokens of KV cache that fit in `available_bytes`, rounded down to whole blocks of `block_size`."""
    _check_positive(block_size=block_size)
    if available_bytes <= 0:
        return 0
    return available_bytes // kv_bytes_per_token(dims, dtype) // block_size * block_size


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}", exit_code=2)



__all__ = [
    "LORA_MODULES",
    "ModelDims",
    "adapter_slot_bytes",
    "base_weight_breakdown",
    "base_weight_bytes",
    "dtype_bytes",
    "kv_bytes_per_token",
    "kv_tokens",
    "linear_weight_bytes",
    "lm_head_bytes",
    "lora_module_shape",
    "lora_params_per_rank",
    "normalize_dtype",
    "normalize_modules",
    "slot_stack_shapes",
    "total_slot_bytes",
]
