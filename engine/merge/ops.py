"""The merge math, exactly as PEFT's `merge_and_unload()` does it, computed in float32.

Semantics (per base tensor W, base layout; s = alpha/r or alpha/sqrt(r) with rsLoRA, per module):
    lora:       delta = s * B @ A                           # [out, in]; .T when fan_in_fan_out (Conv1D W is [in, out])
                W'    = W + delta
    dora:       n     = ||W + delta||_row                   # per output feature (PEFT's get_weight_norm)
                W'    = (m / n) * (W + delta)               # m = lora_magnitude_vector [out]
    embedding:  delta = s * (B @ A).T                       # A [r, vocab], B [dim, r] -> [vocab, dim]
    bias:       b'    = b + s * lora_B.bias                 # lora_bias=True
    replace:    W'    = T                                   # modules_to_save (the trained copy)
    base:       W    <- T  before the adapter's LoRA         # saved embedding base_layer (save_embedding_layers)
Several adapters with weights w_i:  W' = W + sum_i w_i * (W'_i - W), with W'_i - W = delta_i
exactly for the linear kinds. A single adapter with weight 1 is applied directly (bit-identical
to PEFT for float32 bases). PEFT returns delta in the adapter's dtype; so do we, before adding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.errors import AdapterError


@dataclass(frozen=True)
class Contribution:
    """One adapter's change to one base tensor. `keys` name the adapter tensors it reads:
    lora (A, B) or (A, B, magnitude) for DoRA; embedding (A, B); bias (lora_B.bias,); replace/base (T,)."""

    adapter: int
    weight: float
    kind: str  # "lora" | "embedding" | "bias" | "replace" | "base" (a saved base_layer: replaces W before the LoRA)
    keys: tuple[str, ...]
    scaling: float = 1.0
    fan_in_fan_out: bool = False
    module: str = ""  # PEFT module path, for messages

    @property
    def is_dora(self) -> bool:
        return self.kind == "lora" and len(self.keys) == 3


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """PEFT's Linear.get_delta_weight in float32: [out, in], or [in, out] with fan_in_fan_out."""
    d = ((b.float() @ a.float()) * scaling).to(b.dtype).float()  # a: [r, in], b: [out, r]
    return d.T if fan_in_fan_out else d


def embedding_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's Embedding.get_delta_weight in float32: [vocab, dim] from A [r, vocab], B [dim, r]."""
    return ((b.float() @ a.float()).T * scaling).to(a.dtype).float()


def dora_merge(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """PEFT's DoraLinearVariant.merge: (m / ||W + delta||_row) * (W + delta), all float32."""
    merged = w + delta  # base layout
    rows = merged.T if fan_in_fan_out else merged  # [out, in]
    norm = torch.linalg.norm(rows, dim=1)  # [out]
    factor = (magnitude.float() / norm).view(-1, 1)  # [out, 1]
    return (factor.T if fan_in_fan_out else factor) * merged


def apply(w32: torch.Tensor, c: Contribution, get: Callable[[int, str], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(W'_c, is_delta): the merged tensor for one contribution, or just its delta when the
    kind is linear in W (lora, embedding, bias) so callers can sum deltas without cancellation."""
    t = [get(c.adapter, k) for k in c.keys]
    if c.kind in ("replace", "base"):
        if tuple(t[0].shape) != tuple(w32.shape):
            raise AdapterError(
                f"{c.module}: the adapter's saved module is {list(t[0].shape)} but the base tensor is {list(w32.shape)}: "
                "this adapter was trained for a different base model"
            )
        return t[0].float(), False
    if c.kind == "bias":
        return (t[0] * c.scaling).float(), True
    if c.kind == "embedding":
        return embedding_delta(t[0], t[1], c.scaling), True
    delta = lora_delta(t[0], t[1], c.scaling, c.fan_in_fan_out)
    if c.is_dora:
        return dora_merge(w32, delta, t[2], c.fan_in_fan_out), False
    return delta, True


def _adapter_result(w32: torch.Tensor, group: list[Contribution], get: Callable[[int, str], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """One adapter's (W'_i, is_delta) for a tensor: its saved base layer (if any), then its change."""
    start, is_delta = w32, False
    main = [c for c in group if c.kind != "base"]
    for c in group:
        if c.kind == "base":
            start, _ = apply(w32, c, get)
    if not main:
        return start, False
    out, is_delta = apply(start, main[0], get)
    if is_delta and start is not w32:
        return start + out, False
    return out, is_delta


def merge_tensor(w32: torch.Tensor, contributions: tuple[Contribution, ...], get: Callable[[int, str], torch.Tensor]) -> torch.Tensor:
    """W' in float32 for one base tensor (see the module docstring)."""
    groups: dict[int, list[Contribution]] = {}
    for c in contributions:
        groups.setdefault(c.adapter, []).append(c)
    if len(groups) == 1 and contributions[0].weight == 1.0:
        out, is_delta = _adapter_result(w32, list(contributions), get)
        return w32 + out if is_delta else out
    acc = w32.clone()
    for group in groups.values():
        out, is_delta = _adapter_result(w32, group, get)
        acc += group[0].weight * (out if is_delta else out - w32)
    return acc
