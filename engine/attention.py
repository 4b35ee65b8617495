"""Paged attention in plain torch: write new K/V into the block pool, attend over gathered blocks.

The KV pool of one layer is a flat view [num_blocks * block_size + 1, kv_heads, head_dim]; token t of
a sequence lives at slot `block_table[t // block_size] * block_size + t % block_size`. The extra last
kv_slot is never written and stays zero: gathers point padding at it, so attention never reads K/V
that belongs to another request or to an earlier owner of a reused block (a masked 0 * NaN is NaN).

A step's tokens are laid out as [prefill spans..., decode rows...] (the runner orders them so).
- Fresh prompts (prefill spans with no cached context) attend all at once when a step holds two
  or more: the runner builds one padded index [P, L] over the step's tokens and, when lengths
  differ, one causal + key-length mask [P, 1, L, L]; one SDPA then serves every prompt instead
  of a per-sequence loop of small calls (`PrefillBatch`).
- Other prefill spans (a single fresh prompt, or a chunk that continues a cached context) attend
  one by one: a fresh prompt uses its own K/V with a causal mask (no gather); a continued chunk
  gathers its context and uses an offset causal mask.
- Decode rows (q_len == 1) attend all at once: one padded gather index [B, L] and one key mask
  [B, 1, 1, L], built once per step by the runner and reused by every layer, then one masked
  SDPA over the whole decode batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence's multi-token chunk: tokens [start, end) of the step, positions [ctx_start, ctx_start + q_len)."""

    start: int
    end: int
    ctx_start: int  # tokens of this sequence already in the cache before this chunk
    gather: torch.Tensor | None = None  # [ctx_start + q_len] flat slots, only when ctx_start > 0
    mask: torch.Tensor | None = None  # [1, 1, q_len, ctx_start + q_len] bool, only when ctx_start > 0


@dataclass
class PrefillBatch:
    """Fresh prompts of one step padded to a common length L, attended with one SDPA."""

    index: torch.Tensor  # [P * L] step token row of each padded position (padding repeats the prompt's own last row)
    mask: torch.Tensor | None  # [P, 1, L, L] bool (causal and key < length), None when all lengths are L
    valid: torch.Tensor  # [N] padded positions of the real tokens, in step order
    rows: torch.Tensor  # [N] their step token rows
    num: int  # P
    length: int  # L


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, built once by the runner and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] flat KV slot of every new token
    prefills: list[PrefillSpan] = field(default_factory=list)  # spans attended one by one
    prefill_batch: PrefillBatch | None = None  # fresh prompts attended together
    decode_start: int = 0  # decode rows are tokens [decode_start, T)
    decode_gather: torch.Tensor | None = None  # [B, L] flat slots (padding points at the runner's always-zero kv_slot)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] bool, True = attend


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [S, KVH, D]
    v_cache: torch.Tensor,  # [S, KVH, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store k/v for the step's tokens, then attend; returns [T, H, D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.decode_gather is not None and meta.decode_start == 0:  # a decode-only step: no output to assemble
        return _decode(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    pb = meta.prefill_batch
    if pb is not None:
        shape = (pb.num, pb.length)
        qb = q.index_select(0, pb.index).view(*shape, *q.shape[1:]).transpose(1, 2)  # [P, H, L, D]
        kb = k.index_select(0, pb.index).view(*shape, *k.shape[1:]).transpose(1, 2)  # [P, KVH, L, D]
        vb = v.index_select(0, pb.index).view(*shape, *v.shape[1:]).transpose(1, 2)
        if pb.mask is None:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=pb.mask, scale=scale, enable_gqa=True)
        o = o.transpose(1, 2).reshape(pb.num * pb.length, *q.shape[1:])  # [P * L, H, D]
        out.index_copy_(0, pb.rows, o.index_select(0, pb.valid))
    for span in meta.prefills:
        qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        if span.ctx_start == 0:
            ks = k[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, KVH, q, D]
            vs = v[span.start : span.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ks = k_cache.index_select(0, span.gather).transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
            vs = v_cache.index_select(0, span.gather).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=scale, enable_gqa=True)
        out[span.start : span.end] = o.squeeze(0).transpose(0, 1)
    if meta.decode_gather is not None:
        out[meta.decode_start :] = _decode(q[meta.decode_start :], k_cache, v_cache, meta, scale)
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The decode rows' attention, q: [B, H, D] -> [B, H, D]: one padded gather, one masked SDPA."""
    assert meta.decode_gather is not None
    b, length = meta.decode_gather.shape
    idx = meta.decode_gather.reshape(-1)
    kd = k_cache.index_select(0, idx).view(b, length, *k_cache.shape[1:]).transpose(1, 2)  # [B, KVH, L, D]
    vd = v_cache.index_select(0, idx).view(b, length, *v_cache.shape[1:]).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
    return o.squeeze(2)  # [B, H, D]
