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
- Decode rows (q_len == 1) attend together: one padded gather index [B, L] and one key mask
  [B, 1, 1, L], built once per step and reused by every layer, then one masked SDPA over the
  whole decode batch (CUDA), or on CPU one gather + SDPA per chunk of rows whose gathered K/V fit
  in cache, through one scratch buffer reused by every chunk and layer (`decode_chunk`): a
  whole-batch copy is several MB per layer, which SDPA would read back from memory.

The per-step metadata (`AttentionMetadata`) is built by `AttentionMetaBuffers`: the index arithmetic
runs on the host in numpy, into one staging buffer allocated once (pinned on CUDA), copied to the
device with one non-blocking copy per step, as the runner's token inputs and the LoRA metadata are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from kernels import tuning


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
    decode_chunk: int = 0  # decode rows per gather + SDPA (0 = all at once; CPU: the copy stays in cache)
    decode_scratch: torch.Tensor | None = None  # flat K/V gather buffer reused by every chunk and layer, or None


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
    """The decode rows' attention, q: [B, H, D] -> [B, H, D]: a padded gather and one masked SDPA per chunk
    of `meta.decode_chunk` rows (all rows when 0). Each row's result is the same bits in any chunk."""
    gather, mask = meta.decode_gather, meta.decode_mask
    assert gather is not None
    b = gather.shape[0]
    rows = meta.decode_chunk or b
    if rows >= b:
        return _decode_rows(q, k_cache, v_cache, gather, mask, meta.decode_scratch, scale)
    out = torch.empty_like(q)
    for s in range(0, b, rows):
        e = min(b, s + rows)
        m = None if mask is None else mask[s:e]
        out[s:e] = _decode_rows(q[s:e], k_cache, v_cache, gather[s:e], m, meta.decode_scratch, scale)
    return out


def _decode_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, gather: torch.Tensor,
                 mask: torch.Tensor | None, scratch: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q: [b, H, D], gather: [b, L] kv_slots, mask: [b, 1, 1, L] or None; K/V gathered into `scratch` when given."""
    b, length = gather.shape
    idx = gather.reshape(-1)  # a row slice of the contiguous [B, L] index: a view
    shape = (idx.numel(), *k_cache.shape[1:])
    if scratch is None:
        kg, vg = k_cache.index_select(0, idx), v_cache.index_select(0, idx)
    else:
        n = idx.numel() * k_cache[0].numel()
        kg = torch.index_select(k_cache, 0, idx, out=scratch[:n].view(shape))
        vg = torch.index_select(v_cache, 0, idx, out=scratch[n : 2 * n].view(shape))
    kd = kg.view(b, length, *k_cache.shape[1:]).transpose(1, 2)  # [b, KVH, L, D]
    vd = vg.view(b, length, *v_cache.shape[1:]).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.squeeze(2)  # [b, H, D]


class AttentionMetaBuffers:
    """A step's attention metadata in buffers allocated once and refilled every step.

    `build` does the index arithmetic on the host with numpy, writing into one byte buffer: the int64
    indexes (decode gather, prefill-batch index/valid/rows/lengths, continued chunks' gathers) and after
    them the bool decode key mask. On CUDA that buffer is pinned and reaches the device with one
    non-blocking copy; elsewhere (`stage` False, the CPU default) it is the device buffer itself. The
    masks that would be large on the host (prefill causal masks, [P, 1, L, L]) are built on the device
    from a cached arange. Sized for `max_seqs` decode rows of `max_model_len` tokens (capped) up front,
    grown if a step ever needs more. The returned views stay valid until the next `build`: one step's
    metadata at a time, as the runner uses them.

    On CPU, given the pool's `kv_slot_shape` ([KVH, D]) and `kv_dtype`, decode rows attend in chunks of
    about `tuning.DECODE_CHUNK_BYTES` of gathered K/V, gathered into one scratch buffer that every chunk
    and layer reuses (`decode_chunk`, `decode_scratch`): SDPA then reads the copy from cache.
    """

    INITIAL_BYTES_CAP = 16 << 20  # the up-front staging size never exceeds this; larger steps grow it

    def __init__(self, device: torch.device | str, *, block_size: int, zero_kv_slot: int, max_seqs: int,
                 max_model_len: int, stage: bool | None = None, kv_slot_shape: tuple[int, ...] | None = None,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device)
        chunked = self.device.type == "cpu" and kv_slot_shape is not None and kv_dtype is not None
        self._kv_numel = math.prod(kv_slot_shape) if chunked and kv_slot_shape is not None else 0
        self._kv_dtype = kv_dtype or torch.float32
        self._scratch: torch.Tensor | None = None  # decode K/V gathers (CPU), allocated at first use
        self.stage = self.device.type != "cpu" if stage is None else stage
        self.block_size, self.zero_kv_slot = block_size, zero_kv_slot
        self._pin = self.device.type == "cuda"
        self._copied: torch.cuda.Event | None = None  # the last copy out of the staging buffer
        self._nbytes = 0
        self._reserve(min(9 * max_seqs * max_model_len, self.INITIAL_BYTES_CAP))  # int64 gather + bool mask
        self._table = np.zeros((max_seqs, -(-max_model_len // block_size)), dtype=np.int64)  # [B, blocks] scratch
        self._np_arange = np.arange(max(max_model_len, block_size), dtype=np.int64)
        self._arange = torch.arange(max_model_len, device=self.device)  # masks built on the device

    def _reserve(self, nbytes: int) -> None:
        nbytes = -(-nbytes // 8) * 8
        if nbytes <= self._nbytes:
            return
        self._host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)
        self._host64, self._host_bool = self._host.numpy().view(np.int64), self._host.numpy().view(np.bool_)
        self._dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device) if self.stage else self._host
        self._dev64, self._dev_bool = self._dev.view(torch.int64), self._dev.view(torch.bool)
        self._nbytes = nbytes

    def _ar_np(self, n: int) -> np.ndarray:
        if n > self._np_arange.size:
            self._np_arange = np.arange(2 * n, dtype=np.int64)
        return self._np_arange[:n]

    def _ar(self, n: int) -> torch.Tensor:
        if n > self._arange.numel():
            self._arange = torch.arange(2 * n, device=self.device)
        return self._arange[:n]

    def build(self, slot_mapping: torch.Tensor, prefills: list[PrefillSpan], prefill_tables: list[list[int]],
              decode_tables: list[list[int]], decode_lens: list[int]) -> AttentionMetadata:
        """The step's metadata: `prefills` in step order with each one's block table, then the decode rows
        (the last len(decode_lens) tokens of the step), each with its block table and length (context + 1)."""
        meta = AttentionMetadata(slot_mapping=slot_mapping, prefills=prefills)
        fresh = [p for p in prefills if p.ctx_start == 0]
        batched = len(fresh) >= 2  # one padded SDPA for all fresh prompts instead of one call each
        if batched:
            meta.prefills = [p for p in prefills if p.ctx_start > 0]
        continued = [(p, t) for p, t in zip(prefills, prefill_tables) if p.ctx_start > 0]
        b = len(decode_lens)
        lens = np.array(decode_lens, dtype=np.int64) if b else None
        length = int(lens.max()) if lens is not None else 0
        plens = np.array([p.end - p.start for p in fresh], dtype=np.int64) if batched else None
        plen = int(plens.max()) if plens is not None else 0
        # sizes first (int64 elements, then bool bytes), so one staging buffer holds the step
        n64 = b * length + sum(p.ctx_start + p.end - p.start for p, _ in continued)
        if plens is not None:
            n64 += len(fresh) * plen + 2 * int(plens.sum()) + len(fresh)
        decode_masked = lens is not None and int(lens.min()) != length
        nbool = b * length if decode_masked else 0
        if n64 + nbool == 0:
            return meta
        self._reserve(8 * n64 + nbool)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy may still read the pinned buffer
        cursor = _Cursor()
        gather = cursor.take(b * length) if b else None
        spans = [(p, cursor.take(p.end - p.start + p.ctx_start)) for p, _ in continued]
        batch = self._fill_prefill_batch(cursor, fresh, plens, plen) if plens is not None else None
        mask = None
        if lens is not None and gather is not None:
            mask = self._fill_decode(gather, decode_tables, lens, length, 8 * n64 if decode_masked else None)
        for (p, off), (_, table) in zip(spans, continued):
            self._fill_span_gather(self._host64[off : off + p.ctx_start + p.end - p.start], table)
        total = 8 * n64 + nbool
        if self.stage:
            self._dev[:total].copy_(self._host[:total], non_blocking=True)
            if self.device.type == "cuda":
                self._copied = torch.cuda.Event()
                self._copied.record()
        dev = self._dev64
        for p, off in spans:
            total_p = p.ctx_start + p.end - p.start
            p.gather = dev[off : off + total_p]  # [ctx + q] flat slots
            q_pos = self._ar(total_p)[p.ctx_start :, None]
            p.mask = (self._ar(total_p)[None, :] <= q_pos)[None, None]  # [1, 1, q, ctx + q]
        if batch is not None:
            meta.prefill_batch = self._prefill_batch_views(batch, len(fresh), plen, bool(plens.min() != plen))
        if gather is not None:
            meta.decode_start = slot_mapping.numel() - b
            meta.decode_gather = dev[gather : gather + b * length].view(b, length)  # [B, L]
            if mask is not None:
                meta.decode_mask = self._dev_bool[mask : mask + b * length].view(b, 1, 1, length)
            if self._kv_numel:
                self._chunk(meta, b, length)
        return meta

    def _chunk(self, meta: AttentionMetadata, b: int, length: int) -> None:
        """Rows per decode chunk (about DECODE_CHUNK_BYTES of gathered K + V) and the scratch they gather into."""
        row = 2 * length * self._kv_numel  # elements of one row's K + V
        rows = max(tuning.DECODE_CHUNK_MIN_ROWS, tuning.DECODE_CHUNK_BYTES // (row * self._kv_dtype.itemsize))
        meta.decode_chunk = rows if rows < b else 0
        need = min(rows, b) * row
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=self._kv_dtype, device=self.device)
        meta.decode_scratch = self._scratch

    def _fill_decode(self, off: int, tables: list[list[int]], lens: np.ndarray, length: int,
                     mask_off: int | None) -> int | None:
        """Gather [B, L] at int64 `off`: row i's kv_slots for positions < lens[i], the always-zero kv_slot
        after (padding, and the unwritten tail of its last block, which may hold a previous owner's K/V);
        the key mask at byte `mask_off` when lengths differ. Returns the mask's offset or None."""
        b, bs = len(tables), self.block_size
        nb = -(-length // bs)
        if b > self._table.shape[0] or nb > self._table.shape[1]:
            self._table = np.zeros((max(b, self._table.shape[0]), max(nb, self._table.shape[1])), dtype=np.int64)
        table = self._table[:b, :nb]  # stale entries past a row's own blocks lie past its length: masked below
        for i, bt in enumerate(tables):
            k = min(len(bt), nb)
            table[i, :k] = bt[:k]
        gather = self._host64[off : off + b * length].reshape(b, length)
        full = (table * bs)[:, :, None] + self._ar_np(bs)  # [B, nb, bs]
        np.copyto(gather, full.reshape(b, nb * bs)[:, :length])
        if mask_off is None:  # every row sees its whole gather (e.g. batch 1): no mask
            written = self._ar_np(length)[None, :] < lens[:, None]
        else:
            written = self._host_bool[mask_off : mask_off + b * length].reshape(b, length)
            np.less(self._ar_np(length)[None, :], lens[:, None], out=written)
        gather[~written] = self.zero_kv_slot
        return mask_off

    def _fill_span_gather(self, out: np.ndarray, table: list[int]) -> None:
        """A continued chunk's context + chunk kv_slots, positions [0, len(out))."""
        bs, n = self.block_size, out.size
        nb = -(-n // bs)
        blocks = np.array(table[:nb], dtype=np.int64)
        out[:] = ((blocks * bs)[:, None] + self._ar_np(bs)).reshape(-1)[:n]

    def _fill_prefill_batch(self, cursor: _Cursor, spans: list[PrefillSpan], lens: np.ndarray,
                            length: int) -> tuple[int, int, int, int, int]:
        """Fresh prompts padded to `length`: index [P, L] (padding repeats the prompt's own last row, so a
        padded position never reads another prompt's K/V: one prompt's NaN cannot reach another's), the
        padded positions of the real tokens and their rows; returns the int64 offsets and N."""
        p, n = len(spans), int(lens.sum())
        starts = np.array([s.start for s in spans], dtype=np.int64)
        index_off, valid_off, rows_off, lens_off = cursor.take(p * length), cursor.take(n), cursor.take(n), cursor.take(p)
        index = self._host64[index_off : index_off + p * length].reshape(p, length)
        np.minimum(starts[:, None] + self._ar_np(length)[None, :], (starts + lens - 1)[:, None], out=index)
        valid = self._host64[valid_off : valid_off + n]
        valid[:] = np.flatnonzero(self._ar_np(length)[None, :] < lens[:, None])
        np.take(index.reshape(-1), valid, out=self._host64[rows_off : rows_off + n])
        self._host64[lens_off : lens_off + p] = lens
        return index_off, valid_off, rows_off, lens_off, n

    def _prefill_batch_views(self, offs: tuple[int, int, int, int, int], p: int, length: int, masked: bool) -> PrefillBatch:
        index_off, valid_off, rows_off, lens_off, n = offs
        dev = self._dev64
        mask = None
        if masked:  # causal and key < the prompt's length, [P, 1, L, L], built on the device
            j = self._ar(length)
            lens = dev[lens_off : lens_off + p]
            mask = ((j[None, :] <= j[:, None])[None] & (j[None, None, :] < lens[:, None, None]))[:, None]
        return PrefillBatch(index=dev[index_off : index_off + p * length], mask=mask, valid=dev[valid_off : valid_off + n],
                            rows=dev[rows_off : rows_off + n], num=p, length=length)


class _Cursor:
    """Hands out consecutive int64 ranges of the staging buffer (offsets in elements)."""

    def __init__(self) -> None:
        self.pos = 0

    def take(self, n: int) -> int:
        off, self.pos = self.pos, self.pos + n
        return off
