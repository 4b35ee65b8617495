"""Rotary position embeddings with the scalings Llama-family configs declare.

Supported `rope_type`s: default, linear, llama3, dynamic (exact only while the context stays
within the original length, which the engine enforces), yarn (via transformers' own function).
The cos/sin table is computed once for all positions and indexed per token.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.errors import ConfigError


def rope_params(cfg: Any) -> dict[str, Any]:
    """The config's rope parameters as one dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    scaling = getattr(cfg, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params["rope_theta"] = float(theta)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def inv_freq_and_scale(cfg: Any, head_dim: int, max_model_len: int) -> tuple[torch.Tensor, float]:
    """inv_freq [head_dim/2] (fp32) and the attention scaling applied to cos/sin."""
    p = rope_params(cfg)
    kind = p["rope_type"]
    inv_freq = 1.0 / (p["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(p["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, p), 1.0
    if kind == "dynamic":
        original = int(p.get("original_max_position_embeddings") or getattr(cfg, "max_position_embeddings"))
        if max_model_len > original:
            raise ConfigError(
                f"dynamic RoPE scaling is only supported up to the original context ({original} tokens)",
                hint=f"set max_model_len <= {original}",
            )
        return inv_freq, 1.0
    if kind == "yarn":
        try:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv, scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
            return inv.float(), float(scale)
        except Exception as e:  # pragma: no cover - depends on the transformers version
            raise ConfigError(f"cannot compute yarn RoPE parameters: {e}") from e
    raise ConfigError(f"unsupported RoPE scaling type {kind!r}", hint="supported: default, linear, llama3, dynamic, yarn")


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling (same math as transformers' _compute_llama3_parameters)."""
    factor = float(p["factor"])
    low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cache(cfg: Any, head_dim: int, max_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, head_dim] fp32 tables (rotate-half layout, as transformers uses)."""
    inv_freq, scale = inv_freq_and_scale(cfg, head_dim, max_len)
    pos = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [max_len, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(device), (emb.sin() * scale).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D] (already indexed by position). A new [T, heads, D] tensor.

    Semantics (transformers' rotate-half form, bit for bit): with x = [x1, x2] and the same split of cos/sin,
        out = x * cos + cat(-x2, x1) * sin = [x1*c1 - x2*s1, x2*c2 + x1*s2]
    computed in place on x * cos, without building the rotated copy (a + (-b) and a - b round alike).
    Callers rotate q and k in one call (heads = H + KVH) where they can: half the per-layer ops.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    out = x * cos
    out[..., :half].sub_(x2 * sin[..., :half])
    out[..., half:].add_(x1 * sin[..., half:])
    return out
