"""The Triton SGMV/BGMV shrink kernels (semantics: kernels/shrink.py). Imported only on the first Triton launch.

Plain functions, wrapped per mode by `kernels._triton.jit` (compiled for CUDA tensors, interpreted for
CPU tensors); see kernels/_triton.py for why they use `tl.full` and `tl.reduce` rather than triton's
`@jit` standard-library helpers (`tl.zeros`, `tl.sum`). `tl.reduce(v, axis, tl.standard._sum_combine)` is
what `tl.sum` does: the interpreter runs that combine function as one numpy sum (any other combine
function element by element), and triton exports no public name for it; it is spelled as an attribute
path in the kernel body because the JIT's dependency hash skips module attributes but rejects an
interpreted global (TRITON_INTERPRET=1 makes triton's own @jit functions interpreted).
"""
# ruff: noqa: N803 - Triton's constexpr parameters are upper case by convention

from __future__ import annotations

import triton.language as tl



def _shrink_segment_kernel(
    x_ptr, a_ptr, scale_ptr, h_ptr, rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
    K, R, sx_t, sa_s, sa_r, sh_t, ssc_s, ssc_r, R_BLOCKS, K_PER_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SCALE_PER_RANK: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """SGMV: program (segment g, row block m, rank block r x K split) -> h[rows of g in block m, r-block].

    With SPLIT_K > 1 each program reduces one K range and atomically adds into an fp32 h.
    """
    g = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2) % R_BLOCKS
    pid_k = tl.program_id(2) // R_BLOCKS
    seg_len = tl.load(seg_len_ptr + g)
    if pid_m * BLOCK_M >= seg_len:
        return
    seg_start = tl.load(seg_start_ptr + g)
    slot = tl.load(seg_slot_ptr + g).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    rows = tl.load(rows_ptr + seg_start + offs_m, mask=m_mask, other=0).to(tl.int64)  # [BM]
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    x_base = x_ptr + rows[:, None] * sx_t  # [BM, 1]
    a_base = a_ptr + slot * sa_s + offs_r[None, :] * sa_r  # [1, BR]
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        xt = tl.load(x_base + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        at = tl.load(a_base + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # [BK, BR]
        if IEEE:
            acc = tl.dot(xt, at, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, at, acc)
    if SCALE_PER_RANK:
        sc = tl.load(scale_ptr + slot * ssc_s + offs_r * ssc_r, mask=r_mask, other=0.0).to(tl.float32)
        acc = acc * sc[None, :]
    else:
        acc = acc * tl.load(scale_ptr + slot * ssc_s).to(tl.float32)
    h_ptrs = h_ptr + rows[:, None] * sh_t + offs_r[None, :]
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])
    else:
        tl.atomic_add(h_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


def _shrink_gather_kernel(
    x_ptr, a_ptr, scale_ptr, h_ptr, slots_ptr,
    K, R, sx_t, sa_s, sa_r, sh_t, ssc_s, ssc_r, R_BLOCKS, K_PER_SPLIT,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_PER_RANK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """BGMV: program (row t, rank block r x K split) -> h[t, r-block], reading row t's own adapter."""
    t = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1) % R_BLOCKS
    pid_k = tl.program_id(1) // R_BLOCKS
    slot = tl.load(slots_ptr + t).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_kb = tl.arange(0, BLOCK_K)
    # block-shaped liveness: masks mixing a scalar and a block are not supported by the interpreter
    live_k = (offs_kb * 0 + slot) >= 0
    live_r = (offs_r * 0 + slot) >= 0
    r_mask = offs_r < R
    slot = tl.maximum(slot, 0)
    a_base = a_ptr + slot * sa_s + offs_r[:, None] * sa_r  # [BR, 1]
    acc = tl.full((BLOCK_R,), 0.0, tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + offs_kb
        k_mask = (offs_k < k_hi) & live_k
        xv = tl.load(x_ptr + t * sx_t + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BK]
        at = tl.load(a_base + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BR, BK]
        acc += tl.reduce(at.to(tl.float32) * xv[None, :], 1, tl.standard._sum_combine)  # = tl.sum
    if SCALE_PER_RANK:
        acc = acc * tl.load(scale_ptr + slot * ssc_s + offs_r * ssc_r, mask=r_mask, other=0.0).to(tl.float32)
    else:
        acc = acc * tl.load(scale_ptr + slot * ssc_s).to(tl.float32)
    acc = tl.where(live_r, acc, 0.0)
    if SPLIT_K == 1:
        tl.store(h_ptr + t * sh_t + offs_r, acc.to(h_ptr.dtype.element_ty), mask=r_mask)
    else:
        tl.atomic_add(h_ptr + t * sh_t + offs_r, acc, mask=r_mask)
