"""PEFT state-dict key names -> what each tensor is, without touching tensor data.

PEFT saves, e.g. for a Llama q_proj in layer 3:
    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight          [r, in]
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight          [out, r]
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.bias            [out]     (lora_bias=True)
    base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector  [out]     (use_dora=True)
    base_model.model.model.embed_tokens.lora_embedding_A                     [r, vocab] (embedding LoRA)
and full tensors for modules_to_save / bias="all" / trainable tokens. Older or hand-made
files may carry the adapter name (`lora_A.default.weight`) or lack the `base_model.model.` prefix.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from engine.adapters.config import SERVABLE_MODULES

LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

# "model.layers.3.self_attn.q_proj" (also under language_model / decoder wrappers) -> (3, "q_proj").
_DECODER_MODULE = re.compile(
    r"^(?:(?:model|language_model|decoder|transformer)\.)*layers\.(?P<layer>\d+)\."
    r"(?:self_attn|mlp)\.(?P<module>" + "|".join(SERVABLE_MODULES) + r")$"
)


@dataclass(frozen=True)
class LoraKey:
    """One LoRA tensor: `module_path` is the PEFT module key (e.g. "model.layers.3.self_attn.q_proj"),
    `role` is "A", "B", "bias", "magnitude", "embedding_A" or "embedding_B"; `layer`/`module` are set
    only when the path is a servable decoder linear."""

    key: str
    module_path: str
    role: str
    layer: int | None
    module: str | None


def strip_prefix(key: str) -> str:
    return key[len("base_model.model."):] if key.startswith("base_model.model.") else key


def decoder_module(module_path: str) -> tuple[int, str] | None:
    """(layer index, module name) if `module_path` is a q/k/v/o/gate/up/down linear of a decoder layer."""
    m = _DECODER_MODULE.match(module_path)
    return (int(m.group("layer")), m.group("module")) if m else None


def parse_lora_key(key: str) -> LoraKey | None:
    """Parse a LoRA tensor key; None when the key is not a LoRA tensor (see `classify_other_key`).

    Memoised for ordinary-length keys: every adapter of a model repeats the same few hundred names,
    and registering or re-reading 1,000 adapters would otherwise parse each one 1,000 times."""
    return _parse_cached(key) if len(key) <= _CACHED_KEY_CHARS else _parse(key)


_CACHED_KEY_CHARS = 256  # longer (hand-made or hostile) names are parsed every time, never kept


@functools.lru_cache(maxsize=16384)
def _parse_cached(key: str) -> LoraKey | None:
    return _parse(key)


def _parse(key: str) -> LoraKey | None:
    parts = strip_prefix(key).split(".")
    idx = next((i for i in range(len(parts) - 1, 0, -1) if parts[i] in LORA_PARTS), None)
    if idx is None:
        return None
    part, rest = parts[idx], parts[idx + 1:]
    param = rest[-1] if rest and rest[-1] in ("weight", "bias") else None
    adapter_segments = rest[:-1] if param else rest
    if len(adapter_segments) > 1:
        return None
    if part == "lora_A":
        role = "A" if param in (None, "weight") else None
    elif part == "lora_B":
        role = "bias" if param == "bias" else "B"
    elif part == "lora_magnitude_vector":
        role = "magnitude" if param in (None, "weight") else None
    else:
        role = ("embedding_A" if part.endswith("A") else "embedding_B") if param in (None, "weight") else None
    if role is None:
        return None
    path = ".".join(parts[:idx])
    dm = decoder_module(path) if role in ("A", "B", "bias", "magnitude") else None
    return LoraKey(key, path, role, dm[0] if dm else None, dm[1] if dm else None)


def classify_other_key(key: str) -> str:
    """What a non-LoRA tensor in an adapter file is, as a short reason it cannot live in a slot."""
    k = strip_prefix(key)
    if "trainable_tokens" in k or "token_adapter" in k:
        return "trainable token embeddings (trainable_token_indices)"
    if ".modules_to_save." in k:
        return "a full trained copy of a base module (modules_to_save)"
    if k.endswith(".bias"):
        return "a trained base-model bias (bias='all' or 'lora_only')"
    if k.endswith(".weight"):
        return "a full base-model weight (modules_to_save or saved embedding layers)"
    return "an unrecognised tensor"
