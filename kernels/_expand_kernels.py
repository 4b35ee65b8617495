"""The Triton SGMV/BGMV expand kernels (semantics: kernels/expand.py). Imported only on the first Triton launch.

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



def _expand_segment_kernel(
    h_ptr, b_ptr, out_ptr, rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
    N, R, sh_t, sb_s, sb_n, so_t, out_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """SGMV: program (segment g, row block m, column block n) -> out[rows of g in block m, off + n-block]."""
    g = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + g)
    if pid_m * BLOCK_M >= seg_len:
        return
    seg_start = tl.load(seg_start_ptr + g)
    slot = tl.load(seg_slot_ptr + g).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    rows = tl.load(rows_ptr + seg_start + offs_m, mask=m_mask, other=0).to(tl.int64)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    h_base = h_ptr + rows[:, None] * sh_t  # [BM, 1]
    b_base = b_ptr + slot * sb_s + offs_n[None, :] * sb_n  # [1, BN]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < R
        ht = tl.load(h_base + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        bt = tl.load(b_base + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BK, BN]
        if IEEE:
            acc = tl.dot(ht, bt, acc, input_precision="ieee")
        else:
            acc = tl.dot(ht, bt, acc)
    o_ptrs = out_ptr + rows[:, None] * so_t + out_offset + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    cur = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (cur + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


def _expand_gather_kernel(
    h_ptr, b_ptr, out_ptr, slots_ptr,
    N, R, sh_t, sb_s, sb_n, so_t, out_offset,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """BGMV: program (row t, column block n) -> out[t, off + n-block], reading row t's own adapter."""
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    # block-shaped liveness: masks mixing a scalar and a block are not supported by the interpreter
    live_k = (offs_kb * 0 + slot) >= 0
    n_mask = (offs_n < N) & ((offs_n * 0 + slot) >= 0)
    slot = tl.maximum(slot, 0)
    b_base = b_ptr + slot * sb_s + offs_n[:, None] * sb_n  # [BN, 1]
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + offs_kb
        k_mask = (offs_k < R) & live_k
        hv = tl.load(h_ptr + t * sh_t + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BK]
        bt = tl.load(b_base + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BN, BK]
        acc += tl.reduce(bt.to(tl.float32) * hv[None, :], 1, tl.standard._sum_combine)  # = tl.sum
    o_ptrs = out_ptr + t * so_t + out_offset + offs_n
    cur = tl.load(o_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (cur + acc).to(out_ptr.dtype.element_ty), mask=n_mask)
