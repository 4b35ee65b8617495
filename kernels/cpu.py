"""Fast torch path for the LoRA ops (the "cpu" backend; `auto` picks it for non-CUDA tensors).

Same semantics as `kernels.shrink` / `kernels.expand`. Never gathers per-row weights (a
[T, R, K] copy would turn a weight read of N adapters into a T-adapter copy); instead, using
the step's `LoraBatchMeta`:

- single slot, no -1 rows (homogeneous batch): one plain matmul on the whole batch.
- many short adapter segments (decode over many adapters, `meta.cpu_path == "bmm"`): gather the
  rows into segments zero-padded to L rows ([G, L, K], index precomputed in the meta) and run ONE
  `bmm` against the G adapters' weights (a view of the stack when their slots are contiguous, else
  one copy of the G adapters), instead of G tiny matmuls whose per-call overhead dominated; expand
  gathers the out rows, `baddbmm_` (one rounding, like `addmm_`) and copies them back. Padding
  repeats a segment's first row, so its duplicate write is the same value to the same row.
  hidden 768, T=32 rows over 16 adapters, 1 thread: shrink 275 -> 90 us, expand 260 -> 116 us.
- few row runs (rows of an adapter contiguous, e.g. prefill or a sorted decode batch): one
  matmul per run on zero-copy row slices.
- bf16/fp16 short segments of unequal length (`"dense"`): one matmul against the stack's slots
  lo..hi stacked as [span * R, K] (shrink; each row then keeps its own R columns) or
  [span * R, N] (expand, needs B stored rank-major as engine.lora.slots does on CPU; rows are
  scattered into their own R columns of a zeroed [T, span * R]) - the 16-bit per-matmul
  overhead is paid once; bounded by DENSE_MAX_COLS since it does span times the useful FLOPs.
- prefill chunks followed by decode rows (`"split"`): each part runs its own path above on
  zero-copy row slices.
- otherwise (interleaved decode rows): gather the rows once in slot order (`index_select`),
  one matmul per adapter segment on contiguous slices, scatter back once (`index_copy_` /
  `index_add_`); when that gathered block would exceed ~L2 (`CHUNK_BYTES`), gather and scatter
  per segment instead, so each chunk is consumed while still in cache.
Measured (`python -m benchmarks.kernels --device cpu --threads 1`, 1 busy core, fp32, rank 16,
interleaved decode rows over N adapters, weights streamed from memory; us per call,
chosen / per-adapter mask loop / per-row weight gather + bmm):
    hidden 768,  T=16, N=1:   shrink 17 / 37 / 140     expand 18 / 41 / 149
    hidden 768,  T=64, N=16:  shrink 173 / 344 / 716   expand 200 / 417 / 728
    hidden 4096, T=64, N=1:   shrink 88 / 225 / 5312   expand 73 / 387 / 5555
    hidden 4096, T=64, N=4:   shrink 226 / 330 / 7689  expand 267 / 491 / 9988
    hidden 4096, T=64, N=16:  shrink 529 / 857 / 8272  expand 762 / 1673 / 11589
Whole-batch vs per-segment row gather (the CHUNK_BYTES switch), same setup:
    hidden 768,  T=64, N=16: shrink 192 / 224;  hidden 4096, T=64, N=4: shrink 244 / 189
Matmuls run in the input dtype (torch's CPU GEMMs accumulate fp16/bf16 in fp32); results match
the fp32 reference within the per-dtype tolerances of the tests. Works on any device.
"""

from __future__ import annotations

import torch

from kernels.meta import LoraBatchMeta

# Above this many bytes, a whole-batch row gather spills L2 and per-segment gathers win (see above).
CHUNK_BYTES = 512 << 10
# "dense" (meta): shrink/expand of many short 16-bit segments as ONE matmul against the stack's slots
# lo..hi (expand needs B stored rank-major, B[s].T contiguous, as engine.lora.slots does on CPU; the
# rows' h are scattered into their own R columns of a zeroed [T, span * R]). It does span times the
# useful FLOPs, so only while span * R stays small next to the base layer's width.
DENSE_MAX_COLS = 256


def _per_segment(stack: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """stack[seg_slots]: [G, ...], a view when the segments' slots are a contiguous range, else a copy
    of the G adapters' rows of the stack (each adapter read once: the op's traffic bound anyway)."""
    if meta.slot_base is not None:
        return stack[meta.slot_base:meta.slot_base + len(meta.distinct_slots)]
    return stack.index_select(0, meta.pad_slots)


def shrink_cpu(x: torch.Tensor, lora_a: torch.Tensor, scales: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """h[t] = scales[s] * x[t] @ lora_a[s].T (0 for s == -1); h: [T, R] in x.dtype."""
    T, R = x.shape[0], lora_a.shape[1]
    if meta.single_slot is not None:
        s = meta.single_slot
        return torch.mm(x, lora_a[s].T).mul_(scales[s])  # [T, R]
    h = (torch.zeros if meta.num_no_lora else torch.empty)(T, R, dtype=x.dtype, device=x.device)
    if meta.num_lora_rows == 0:
        return h
    path = meta.path_for(x.dtype)
    if path == "split":  # prefill rows then decode rows, each with its own layout (zero-copy row slices)
        for a, b, part in meta.parts:
            h[a:b] = shrink_cpu(x[a:b], lora_a, scales, part)
        return h
    if path == "dense":
        lo = meta.distinct_slots[0]
        span = meta.distinct_slots[-1] - lo + 1  # slots lo..hi: a view of the stack, no copy
        if span * R <= DENSE_MAX_COLS:
            a_cat = lora_a[lo:lo + span].reshape(span * R, x.shape[1])  # [span*R, K]
            hw = torch.mm(x, a_cat.T).view(T, span, R)  # [T, span, R]: every row against every slot
            hs = hw[meta.sorted_rows, meta.dense_cols]  # [T_lora, R]: each row's own adapter
            row_scales = scales.index_select(0, meta.sorted_slots)
            hs.mul_(row_scales.unsqueeze(1) if row_scales.dim() == 1 else row_scales)
            return h.index_copy_(0, meta.sorted_rows, hs)
        path = meta.dense_fallback
    if path == "bmm":
        G, L = len(meta.distinct_slots), meta.pad_len
        if meta.pad_identity:  # rows already in equal slot-ordered segments: zero-copy views
            xs = x.reshape(G, L, x.shape[1])  # [G, L, K]
        else:
            xs = x.index_select(0, meta.pad_rows).view(G, L, x.shape[1])  # [G, L, K] padded segments
        hs = torch.bmm(xs, _per_segment(lora_a, meta).transpose(1, 2))  # [G, L, R]
        sc = _per_segment(scales, meta)  # [G] or [G, R]
        hs.mul_(sc.view(G, 1, 1) if sc.dim() == 1 else sc.unsqueeze(1))
        if meta.pad_identity:
            return hs.view(T, R)
        return h.index_copy_(0, meta.pad_rows, hs.view(G * L, R))  # padding rewrites its row's own value
    if path == "runs":
        for a, b, s in meta.runs:
            if s >= 0:
                torch.mm(x[a:b], lora_a[s].T, out=h[a:b]).mul_(scales[s])
        return h
    hs = torch.empty(meta.num_lora_rows, R, dtype=x.dtype, device=x.device)  # [T_lora, R] in slot order
    if meta.num_lora_rows * x.shape[1] * x.element_size() > CHUNK_BYTES:
        for a, b, s in meta.segments:  # gather each segment's rows while the last one is still in cache
            torch.mm(x.index_select(0, meta.sorted_rows[a:b]), lora_a[s].T, out=hs[a:b])
    else:
        xs = x.index_select(0, meta.sorted_rows)  # [T_lora, K] rows in slot order
        for a, b, s in meta.segments:
            torch.mm(xs[a:b], lora_a[s].T, out=hs[a:b])
    row_scales = scales.index_select(0, meta.sorted_slots)  # [T_lora] or [T_lora, R]: one op, not one per segment
    hs.mul_(row_scales.unsqueeze(1) if row_scales.dim() == 1 else row_scales)
    return h.index_copy_(0, meta.sorted_rows, hs)


def expand_cpu(h: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, meta: LoraBatchMeta,
               out_offset: int = 0) -> torch.Tensor:
    """out[t, off:off+N] += h[t] @ lora_b[s].T for rows with s != -1; in place, returns out."""
    N = lora_b.shape[1]
    view = out[:, out_offset:out_offset + N]  # [T, N], strided when out has other slices
    if meta.single_slot is not None:
        view.addmm_(h, lora_b[meta.single_slot].T)
        return out
    if meta.num_lora_rows == 0:
        return out
    path = meta.path_for(h.dtype)
    if path == "split":
        for a, b, part in meta.parts:
            expand_cpu(h[a:b], lora_b, out[a:b], part, out_offset)
        return out
    if path == "dense":
        lo, R = meta.distinct_slots[0], h.shape[1]
        span = meta.distinct_slots[-1] - lo + 1  # slots lo..hi: a view of the stack, no copy
        if lora_b.stride(1) == 1 and span * R <= DENSE_MAX_COLS:  # rank-major B: [span * R, N] is a view
            bt = lora_b[lo:lo + span].transpose(1, 2).reshape(span * R, N)  # [span*R, N]
            hw = torch.zeros(h.shape[0], span, R, dtype=h.dtype, device=h.device)  # [T, span, R]
            hw[meta.sorted_rows, meta.dense_cols] = h.index_select(0, meta.sorted_rows)
            view.addmm_(hw.view(-1, span * R), bt)  # out + h @ B.T, rounded once
            return out
        path = meta.dense_fallback
    if path == "bmm":
        G, L = len(meta.distinct_slots), meta.pad_len
        if meta.pad_identity:  # rows already in equal slot-ordered segments: update out in place
            view.view(G, L, N).baddbmm_(h.reshape(G, L, h.shape[1]), _per_segment(lora_b, meta).transpose(1, 2))
            return out
        hs = h.index_select(0, meta.pad_rows).view(G, L, h.shape[1])  # [G, L, R] padded segments
        ys = view.index_select(0, meta.pad_rows).view(G, L, N)  # [G, L, N] current out rows
        ys.baddbmm_(hs, _per_segment(lora_b, meta).transpose(1, 2))  # out + h @ B.T, rounded once
        view.index_copy_(0, meta.pad_rows, ys.view(G * L, N))  # padding rewrites its row's own value
        return out
    if path == "runs":
        for a, b, s in meta.runs:
            if s >= 0:
                view[a:b].addmm_(h[a:b], lora_b[s].T)
        return out
    if meta.num_lora_rows * N * out.element_size() > CHUNK_BYTES:
        for a, b, s in meta.segments:
            rows = meta.sorted_rows[a:b]
            view.index_add_(0, rows, torch.mm(h.index_select(0, rows), lora_b[s].T))
        return out
    hs = h.index_select(0, meta.sorted_rows)  # [T_lora, R] rows in slot order
    ys = torch.empty(hs.shape[0], N, dtype=out.dtype, device=out.device)
    for a, b, s in meta.segments:
        torch.mm(hs[a:b], lora_b[s].T, out=ys[a:b])
    view.index_add_(0, meta.sorted_rows, ys)
    return out
