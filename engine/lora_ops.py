"""The LoRA ops the model calls, resolved once: `kernels` when it provides them, else a torch fallback.

The fallback has the exact signature and semantics of `kernels.lora_shrink` / `lora_expand`
(issue 3), so the model code never changes when the kernels land:

    lora_shrink(x [T, in], lora_a [S, R, in], token_slots [T], scales [S]) -> h [T, R]
        h[t] = scales[s] * x[t] @ lora_a[s].T  with s = token_slots[t]; 0 where s == -1
    lora_expand(h [T, R], lora_b [S, out, R], token_slots [T], out [T, N], out_offset=0) -> out
        out[t, off:off+out] += h[t] @ lora_b[s].T  (nothing where s == -1)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch


class _FallbackMeta:
    """Grouping of token rows by slot, computed once per step (same role as kernels.LoraBatchMeta)."""

    def __init__(self, token_slots: torch.Tensor) -> None:
        slots = token_slots.tolist()
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            if s >= 0:
                groups.setdefault(s, []).append(i)
        dev = token_slots.device
        self.groups = [(s, torch.tensor(rows, dtype=torch.long, device=dev)) for s, rows in groups.items()]

    @classmethod
    def from_token_slots(cls, token_slots: torch.Tensor) -> "_FallbackMeta":
        return cls(token_slots)


def _fallback_shrink(x, lora_a, token_slots, scales, *, meta=None, backend="auto"):  # type: ignore[no-untyped-def]
    meta = meta if isinstance(meta, _FallbackMeta) else _FallbackMeta(token_slots)
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=x.dtype, device=x.device)
    for s, rows in meta.groups:
        h[rows] = (x[rows] @ lora_a[s].T.to(x.dtype)) * scales[s].to(x.dtype)
    return h


def _fallback_expand(h, lora_b, token_slots, out, *, meta=None, out_offset=0, backend="auto"):  # type: ignore[no-untyped-def]
    meta = meta if isinstance(meta, _FallbackMeta) else _FallbackMeta(token_slots)
    n = lora_b.shape[1]
    for s, rows in meta.groups:
        out[rows, out_offset : out_offset + n] += h[rows] @ lora_b[s].T.to(h.dtype)
    return out


@lru_cache(maxsize=1)
def lora_ops() -> tuple[Callable[..., Any], Callable[..., Any], Any]:
    """(lora_shrink, lora_expand, LoraBatchMeta) from `kernels` if available, else the fallback."""
    try:
        from kernels import LoraBatchMeta, lora_expand, lora_shrink

        return lora_shrink, lora_expand, LoraBatchMeta
    except ImportError:
        return _fallback_shrink, _fallback_expand, _FallbackMeta
