"""Fast torch path for the LoRA ops (the "cpu" backend; `auto` picks it for non-CUDA tensors).

Same semantics as `kernels.shrink` / `kernels.expand`. Decode-shaped steps (short adapter segments, bf16, or
fp32 over several adapters, few torch threads) go first to `kernels.native`'s C++ loops when they are built
(`kernels.tuning.cpu_native_wants`; `*_cpu_slices` hand a fused projection's slices over in one call); the
torch paths below serve everything else, and everything when the loops are off or cannot be built. Never gathers per-row weights (a
[T, R, K] copy would turn a weight read of N adapters into a T-adapter copy); instead, using
the step's `LoraBatchMeta`:

- single slot, no -1 rows (homogeneous batch): one plain matmul on the whole batch.
- many short adapter segments (decode over many adapters, `meta.cpu_path == "bmm"`): gather the
  rows into segments zero-padded to L rows ([G, L, K], index precomputed in the meta) and run ONE
  `bmm` against the G adapters' weights (a view of the stack when their slots are contiguous, else
  one copy of the G adapters), instead of G tiny matmuls whose per-call overhead dominated; expand
  gathers the out rows, `baddbmm_` (one rounding, like `addmm_`) and copies them back. Padding
  repeats a segment's first row, so its duplicate write is the same value to the same row.
- few row runs (rows of an adapter contiguous, e.g. prefill or a sorted decode batch): one
  matmul per run on zero-copy row slices.
- bf16/fp16 short segments of unequal length (`"dense"`): one matmul against the stack's slots
  lo..hi stacked as [span * R, K] (shrink; each row then keeps its own R columns) or
  [span * R, N] (expand, needs B stored rank-major as engine.lora.slots does on CPU; rows are
  scattered into their own R columns of a zeroed [T, span * R]) - the 16-bit per-matmul
  overhead is paid once; bounded by tuning.DENSE_MAX_COLS since it does span times the useful FLOPs.
- prefill chunks followed by decode rows (`"split"`): each part runs its own path above on
  zero-copy row slices.
- otherwise (interleaved decode rows): gather the rows once in slot order (`index_select`),
  one matmul per adapter segment on contiguous slices, scatter back once (`index_copy_` /
  `index_add_`); when that gathered block would exceed ~L2 (`tuning.CHUNK_BYTES`), gather and scatter
  per segment instead, so each chunk is consumed while still in cache.
The per-call measurements behind these choices are in benchmarks/README.md ("CPU LoRA op vs
alternatives"), with the command that reproduces them; the thresholds live in kernels.tuning.
Rank-aware (`slot_ranks`, slot s holds rank slot_ranks[s] <= R in its first rows, zeros after them, as
engine.lora.slots keeps them): every path reads only the rows that can be non-zero: the per-slot paths
("single", "runs", "segments") slice each slot to its own rank, "bmm" to the largest rank among the
step's slots, so an r8 adapter in slots sized for r64 costs r8, and an r8 + r64 batch costs r8 + r64, not
two r64. The skipped rows are exact zeros (zero A rows give h = 0), so results are unchanged; h's
columns past the step's rank are zero. "dense" keeps the full R (its [span * R, K] view needs it).
fp32 "bmm" with short segments (up to tuning.CPU_SHRINK_AX_MAX_ROWS rows: decode over many adapters) runs
the shrink as A @ x.T where a probe at first use finds that form faster on this CPU (`tuning.cpu_shrink_ax`:
it is on an AMD EPYC, 2-3x slower on an AMX Xeon); longer segments keep x @ A.T.
Matmuls run in the input dtype (torch's CPU GEMMs accumulate fp16/bf16 in fp32), except bf16/fp16 "bmm"
on a CPU without AMX, which upcasts to one fp32 bmm while that copy is small
(tuning.cpu_half_bmm_in_fp32) and rounds once back, and a one-adapter ("single") 16-bit step of a few rows
(tuning.cpu_half_single_in_fp32), which runs fp32 GEMMs on upcast copies and rounds once back; results match
the fp32 reference within the per-dtype tolerances of the tests. Works on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch

from kernels.meta import LoraBatchMeta
from kernels import native, tuning


@dataclass(frozen=True, eq=False)
class _RankPlan:
    """How one step's slots use a slot-rank table: the largest rank `r`, and for "bmm" the rank classes
    (rank, segment indices [G_c] int64, their slots [G_c] int64) when padding to `r` would waste reads."""

    ranks: Sequence[int]  # the table this plan was built from (kept alive so its id is not reused)
    r: int
    classes: tuple[tuple[int, torch.Tensor, slice | torch.Tensor], ...] = ()


def _slot_select(slots: list[int], dev: torch.device) -> slice | torch.Tensor:
    """A slice when the slots are evenly spaced (their weights are then a strided view of the stack, no
    copy), else an int64 index tensor (index_select copies those slots' rows)."""
    step = slots[1] - slots[0] if len(slots) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(slots, slots[1:])):
        return slice(slots[0], slots[-1] + 1, step)
    return torch.tensor(slots, dtype=torch.int64, device=dev)


def _take(stack: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    return stack[sel] if isinstance(sel, slice) else stack.index_select(0, sel)


_PLANS: WeakKeyDictionary[LoraBatchMeta, dict[tuple[int, int], _RankPlan]] = WeakKeyDictionary()


def _plan(meta: LoraBatchMeta, slot_ranks: Sequence[int], R: int) -> _RankPlan:
    """The step's rank plan for one slot-rank table, built once per step and table (168 op calls share it)."""
    per_meta = _PLANS.setdefault(meta, {})
    plan = per_meta.get((id(slot_ranks), R))
    if plan is not None and plan.ranks is slot_ranks:
        return plan
    seg_ranks = [_rank_of(slot_ranks, s, R) for s in meta.distinct_slots]
    r = max(seg_ranks)
    classes: tuple[tuple[int, torch.Tensor, slice | torch.Tensor], ...] = ()
    if len(set(seg_ranks)) > 1 and len(seg_ranks) * r > tuning.RANK_CLASS_MIN_WASTE * sum(seg_ranks):
        dev = meta.sorted_rows.device
        by_rank: dict[int, list[int]] = {}
        for g, rg in enumerate(seg_ranks):
            by_rank.setdefault(rg, []).append(g)
        classes = tuple((rc, torch.tensor(gs, dtype=torch.int64, device=dev), _slot_select([meta.distinct_slots[g] for g in gs], dev))
                        for rc, gs in sorted(by_rank.items()))
    plan = _RankPlan(slot_ranks, r, classes)
    per_meta[(id(slot_ranks), R)] = plan
    return plan


def step_rank(meta: LoraBatchMeta, slot_ranks: Sequence[int] | None, R: int) -> int:
    """The largest rank among the slots `meta` uses (R when the ranks are unknown), at least 1."""
    if slot_ranks is None or not meta.distinct_slots:
        return R
    return _plan(meta, slot_ranks, R).r


def _rank_of(slot_ranks: Sequence[int] | None, s: int, R: int) -> int:
    return R if slot_ranks is None else max(1, min(R, slot_ranks[s]))


def _dense_span(meta: LoraBatchMeta) -> int:
    """Slots lo..hi that the "dense" path multiplies every row against (0 without LoRA rows)."""
    return meta.distinct_slots[-1] - meta.distinct_slots[0] + 1 if meta.distinct_slots else 0


def _per_segment(stack: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """stack[seg_slots]: [G, ...], a view when the segments' slots are a contiguous range, else a copy
    of the G adapters' rows of the stack (each adapter read once: the op's traffic bound anyway)."""
    if meta.slot_base is not None:
        return stack[meta.slot_base:meta.slot_base + len(meta.distinct_slots)]
    return stack.index_select(0, meta.pad_slots)


def _shrink_bmm(xs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """xs [G, L, K] @ a[g].T -> [G, L, r]; fp32 short segments as A @ x.T where that form is the faster one
    on this CPU (`tuning.cpu_shrink_ax`)."""
    if xs.dtype == torch.float32 and xs.shape[1] <= tuning.CPU_SHRINK_AX_MAX_ROWS and tuning.cpu_shrink_ax():
        return torch.bmm(a, xs.transpose(1, 2)).transpose(1, 2)  # [G, L, r] (strided)
    if xs.dtype != torch.float32 and tuning.cpu_half_bmm_in_fp32(a.numel() * 4):
        return torch.bmm(xs.float(), a.float().transpose(1, 2)).to(xs.dtype)  # [G, L, r], rounded once
    return torch.bmm(xs, a.transpose(1, 2))


def _expand_bmm_(ys: torch.Tensor, hs: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """ys [G, L, N] += hs [G, L, r] @ bt [G, r, N], in place, rounded once (16-bit types: see `_shrink_bmm`)."""
    if ys.dtype != torch.float32 and tuning.cpu_half_bmm_in_fp32(bt.numel() * 4):
        return ys.add_(torch.bmm(hs.float(), bt.float()))  # fp32 sum, one rounding to ys.dtype
    return ys.baddbmm_(hs, bt)


def shrink_cpu_slices(x: torch.Tensor, slices: Sequence[tuple[torch.Tensor, torch.Tensor]], meta: LoraBatchMeta,
                      slot_ranks: Sequence[Sequence[int] | None]) -> list[torch.Tensor]:
    """`shrink_cpu` of each slice of a fused projection; one native call for all of them when the loops take them."""
    if (meta.path_for(x.dtype) != "split" and native.wants(meta, x.dtype)
            and all(native.can_shrink(x, a, sc) for a, sc in slices)):
        return native.shrink(x, [(a, sc, r) for (a, sc), r in zip(slices, slot_ranks)], meta)
    return [shrink_cpu(x, a, sc, meta, r) for (a, sc), r in zip(slices, slot_ranks)]


def expand_cpu_slices(hs: Sequence[torch.Tensor], slices: Sequence[tuple[torch.Tensor, int]], out: torch.Tensor,
                      meta: LoraBatchMeta, slot_ranks: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """`expand_cpu` of each slice into its columns of `out`; one native call for all when the loops take them."""
    if (meta.path_for(out.dtype) != "split" and native.wants(meta, out.dtype)
            and all(native.can_expand(h, b, out) for h, (b, _) in zip(hs, slices))):
        return native.expand(hs, [(b, off, r) for (b, off), r in zip(slices, slot_ranks)], out, meta)
    for h, (b, off), r in zip(hs, slices, slot_ranks):
        expand_cpu(h, b, out, meta, off, r)
    return out


def shrink_cpu(x: torch.Tensor, lora_a: torch.Tensor, scales: torch.Tensor, meta: LoraBatchMeta,
               slot_ranks: Sequence[int] | None = None) -> torch.Tensor:
    """h[t] = scales[s] * x[t] @ lora_a[s].T (0 for s == -1); h: [T, R] in x.dtype.
    `slot_ranks[s]`: rows of slot s that may be non-zero (the rest are zero and skipped)."""
    T, R = x.shape[0], lora_a.shape[1]
    path = meta.path_for(x.dtype)
    if path != "split" and native.wants(meta, x.dtype) and native.can_shrink(x, lora_a, scales):
        return native.shrink(x, [(lora_a, scales, slot_ranks)], meta)[0]
    if path == "dense" and _dense_span(meta) * R > tuning.DENSE_MAX_COLS:
        path = meta.dense_fallback
    r = R if path == "dense" else step_rank(meta, slot_ranks, R)  # columns of h this step can fill
    if meta.single_slot is not None:
        s = meta.single_slot
        up = x.dtype != torch.float32 and tuning.cpu_half_single_in_fp32(T)  # few 16-bit rows: fp32 GEMM, one rounding
        xx, a = (x.float(), lora_a[s, :r].float()) if up else (x, lora_a[s, :r])
        hr = torch.mm(xx, a.T).mul_(scales[s] if scales.dim() == 1 else scales[s, :r])  # [T, r]
        if r == R:
            return hr.to(x.dtype) if up else hr
        h = torch.zeros(T, R, dtype=x.dtype, device=x.device)
        h[:, :r] = hr
        return h
    # zeros: -1 rows, and columns past a slot's rank that its path leaves unwritten
    h = (torch.zeros if meta.num_no_lora or slot_ranks is not None else torch.empty)(T, R, dtype=x.dtype, device=x.device)
    if meta.num_lora_rows == 0:
        return h
    if path == "split":  # prefill rows then decode rows, each with its own layout (zero-copy row slices)
        for a, b, part in meta.parts:
            h[a:b] = shrink_cpu(x[a:b], lora_a, scales, part, slot_ranks)
        return h
    if path == "dense":
        lo, span = meta.distinct_slots[0], _dense_span(meta)  # slots lo..hi: a view of the stack, no copy
        a_cat = lora_a[lo:lo + span].reshape(span * R, x.shape[1])  # [span*R, K]
        hw = torch.mm(x, a_cat.T).view(T, span, R)  # [T, span, R]: every row against every slot
        hs = hw[meta.sorted_rows, meta.dense_cols]  # [T_lora, R]: each row's own adapter
        row_scales = scales.index_select(0, meta.sorted_slots)
        hs.mul_(row_scales.unsqueeze(1) if row_scales.dim() == 1 else row_scales)
        return h.index_copy_(0, meta.sorted_rows, hs)
    if path == "bmm":
        G, L = len(meta.distinct_slots), meta.pad_len
        if meta.pad_identity:  # rows already in equal slot-ordered segments: zero-copy views
            xs = x.reshape(G, L, x.shape[1])  # [G, L, K]
        else:
            xs = x.index_select(0, meta.pad_rows).view(G, L, x.shape[1])  # [G, L, K] padded segments
        sc = _per_segment(scales, meta)  # [G] or [G, R]
        sc = sc.view(G, 1, 1) if sc.dim() == 1 else sc[:, :r].unsqueeze(1)  # broadcasts over [G, L, r]
        classes = _plan(meta, slot_ranks, R).classes if slot_ranks is not None else ()
        if classes:  # adapters of several ranks: one bmm per rank class, each at its own rank
            hs = x.new_zeros(G, L, r)
            for rc, gs, cs in classes:
                hs[gs, :, :rc] = _shrink_bmm(xs.index_select(0, gs), _take(lora_a[:, :rc], cs))
        else:
            hs = _shrink_bmm(xs, _per_segment(lora_a[:, :r] if r < R else lora_a, meta))  # [G, L, r]
        hs.mul_(sc)
        if meta.pad_identity and r == R:
            return hs.reshape(T, R)
        if meta.pad_identity:
            h.view(G, L, R)[:, :, :r] = hs
            return h
        hv = h if r == R else h[:, :r]
        hv.index_copy_(0, meta.pad_rows, hs.reshape(G * L, r))  # padding rewrites its row's own value
        return h
    if path == "runs":
        for a, b, s in meta.runs:
            if s >= 0:
                rs = _rank_of(slot_ranks, s, R)
                if rs == R:
                    torch.mm(x[a:b], lora_a[s].T, out=h[a:b]).mul_(scales[s])
                else:
                    h[a:b, :rs] = torch.mm(x[a:b], lora_a[s, :rs].T).mul_(scales[s] if scales.dim() == 1 else scales[s, :rs])
        return h
    hs = h.new_zeros(meta.num_lora_rows, r) if slot_ranks is not None else h.new_empty(meta.num_lora_rows, r)  # [T_lora, r] in slot order
    per_chunk = meta.num_lora_rows * x.shape[1] * x.element_size() > tuning.CHUNK_BYTES
    xs = None if per_chunk else x.index_select(0, meta.sorted_rows)  # [T_lora, K] rows in slot order
    for a, b, s in meta.segments:  # per chunk: gather each segment's rows while the last one is still in cache
        rows = x.index_select(0, meta.sorted_rows[a:b]) if xs is None else xs[a:b]
        rs = min(r, _rank_of(slot_ranks, s, R))
        if rs == r:
            torch.mm(rows, lora_a[s, :r].T, out=hs[a:b])
        else:
            hs[a:b, :rs] = torch.mm(rows, lora_a[s, :rs].T)
    row_scales = scales.index_select(0, meta.sorted_slots)  # [T_lora] or [T_lora, R]: one op, not one per segment
    hs.mul_(row_scales.unsqueeze(1) if row_scales.dim() == 1 else row_scales[:, :r])
    (h if r == R else h[:, :r]).index_copy_(0, meta.sorted_rows, hs)
    return h


def expand_cpu(h: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, meta: LoraBatchMeta,
               out_offset: int = 0, slot_ranks: Sequence[int] | None = None) -> torch.Tensor:
    """out[t, off:off+N] += h[t] @ lora_b[s].T for rows with s != -1; in place, returns out.
    `slot_ranks[s]`: columns of slot s's B that may be non-zero (the rest are zero and skipped)."""
    N, R = lora_b.shape[1], lora_b.shape[2]
    view = out[:, out_offset:out_offset + N]  # [T, N], strided when out has other slices
    path = meta.path_for(h.dtype)
    if path != "split" and native.wants(meta, h.dtype) and native.can_expand(h, lora_b, out):
        return native.expand([h], [(lora_b, out_offset, slot_ranks)], out, meta)
    if path == "dense" and (lora_b.stride(1) != 1 or _dense_span(meta) * R > tuning.DENSE_MAX_COLS):
        path = meta.dense_fallback  # the dense layout needs rank-major B ([span * R, N] a view) and few columns
    r = R if path == "dense" else step_rank(meta, slot_ranks, R)
    if r < R:  # columns past the step's rank multiply zero columns of B: skip them
        h, lora_b = h[:, :r], lora_b[:, :, :r]
    if meta.single_slot is not None:
        if h.dtype != torch.float32 and tuning.cpu_half_single_in_fp32(h.shape[0]):
            view.add_(torch.mm(h.float(), lora_b[meta.single_slot].T.float()))  # fp32 sum, one rounding
        else:
            view.addmm_(h, lora_b[meta.single_slot].T)
        return out
    if meta.num_lora_rows == 0:
        return out
    if path == "split":
        for a, b, part in meta.parts:
            expand_cpu(h[a:b], lora_b, out[a:b], part, out_offset, slot_ranks)
        return out
    if path == "dense":
        lo, span = meta.distinct_slots[0], _dense_span(meta)  # slots lo..hi: a view of the stack, no copy
        bt = lora_b[lo:lo + span].transpose(1, 2).reshape(span * R, N)  # [span*R, N], rank-major B: a view
        hw = torch.zeros(h.shape[0], span, R, dtype=h.dtype, device=h.device)  # [T, span, R]
        hw[meta.sorted_rows, meta.dense_cols] = h.index_select(0, meta.sorted_rows)
        view.addmm_(hw.view(-1, span * R), bt)  # out + h @ B.T, rounded once
        return out
    if path == "bmm":
        G, L = len(meta.distinct_slots), meta.pad_len
        classes = _plan(meta, slot_ranks, R).classes if slot_ranks is not None else ()
        if classes:  # adapters of several ranks: one baddbmm per rank class, each at its own rank
            hs = h.index_select(0, meta.pad_rows).view(G, L, h.shape[1])  # [G, L, r] padded segments
            ys = view.index_select(0, meta.pad_rows).view(G, L, N)  # [G, L, N] current out rows
            for rc, gs, cs in classes:
                bt = _take(lora_b.transpose(1, 2)[:, :rc], cs)  # [G_c, rc, N] (rank-major rows)
                ys[gs] = ys.index_select(0, gs).baddbmm_(hs.index_select(0, gs)[:, :, :rc], bt)
            view.index_copy_(0, meta.pad_rows, ys.view(G * L, N))  # padding rewrites its row's own value
            return out
        if meta.pad_identity:  # rows already in equal slot-ordered segments: update out in place
            _expand_bmm_(view.view(G, L, N), h.reshape(G, L, h.shape[1]), _per_segment(lora_b, meta).transpose(1, 2))
            return out
        hs = h.index_select(0, meta.pad_rows).view(G, L, h.shape[1])  # [G, L, R] padded segments
        ys = view.index_select(0, meta.pad_rows).view(G, L, N)  # [G, L, N] current out rows
        _expand_bmm_(ys, hs, _per_segment(lora_b, meta).transpose(1, 2))  # out + h @ B.T, rounded once
        view.index_copy_(0, meta.pad_rows, ys.view(G * L, N))  # padding rewrites its row's own value
        return out
    r = h.shape[1]
    if path == "runs":
        for a, b, s in meta.runs:
            if s >= 0:
                rs = min(r, _rank_of(slot_ranks, s, r))
                view[a:b].addmm_(h[a:b, :rs], lora_b[s, :, :rs].T)
        return out
    if meta.num_lora_rows * N * out.element_size() > tuning.CHUNK_BYTES:
        for a, b, s in meta.segments:
            rows, rs = meta.sorted_rows[a:b], min(r, _rank_of(slot_ranks, s, r))
            view.index_add_(0, rows, torch.mm(h.index_select(0, rows)[:, :rs], lora_b[s, :, :rs].T))
        return out
    hs = h.index_select(0, meta.sorted_rows)  # [T_lora, r] rows in slot order
    ys = torch.empty(hs.shape[0], N, dtype=out.dtype, device=out.device)
    for a, b, s in meta.segments:
        rs = min(r, _rank_of(slot_ranks, s, r))
        torch.mm(hs[a:b, :rs], lora_b[s, :, :rs].T, out=ys[a:b])
    view.index_add_(0, meta.sorted_rows, ys)
    return out
