"""LoRA expand: out[:, off:off+N] += h @ B[slot].T per row. Triton SGMV/BGMV kernels and the torch reference.

Semantics (T rows, S slots, R = max rank, N = out features of this slice):
    h: [T, R], lora_b: [S, N, R], token_slots: [T] int (-1 = no adapter), out: [T, >= off + N]
    for t in range(T):
        s = token_slots[t]
        if s != -1:
            out[t, off:off+N] += h[t] @ lora_b[s].T       # fp32 accumulation, one rounding to out.dtype
    out is updated in place and returned; rows with s == -1 and columns outside [off, off+N) are untouched.
`out_offset` (off) lets a fused projection (qkv, gate_up) write each slice of one output tensor:
e.g. for qkv, expand h_q into out_offset=0, h_k into q_size, h_v into q_size + kv_size.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kernels import _triton
from kernels.meta import LoraBatchMeta
from kernels.shrink import triton_cdiv

tl: Any = None  # triton.language, bound on the first Triton launch (the engine never imports triton)


def expand_reference(h: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor,
                     out_offset: int = 0) -> torch.Tensor:
    """The obviously-right version of the semantics above (fp32, one matmul per distinct slot)."""
    N = lora_b.shape[1]
    view = out[:, out_offset:out_offset + N]  # [T, N]
    slots = token_slots.to(torch.long)
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        rows = (slots == s).nonzero().squeeze(1)
        view[rows] = (view[rows].float() + h[rows].float() @ lora_b[s].float().T).to(out.dtype)
    return out


# ----------------------------------------------------------------------------- Triton kernels
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
        acc += tl.reduce(bt.to(tl.float32) * hv[None, :], 1, tl.standard._sum_combine)
    o_ptrs = out_ptr + t * so_t + out_offset + offs_n
    cur = tl.load(o_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (cur + acc).to(out_ptr.dtype.element_ty), mask=n_mask)


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    global tl
    _, tl = _triton.load()
    return _triton.jit(_expand_segment_kernel, interpret), _triton.jit(_expand_gather_kernel, interpret)


def expand_triton(h: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, meta: LoraBatchMeta,
                  out_offset: int, strategy: str) -> torch.Tensor:
    """Launch the SGMV ("segment") or BGMV ("gather") expand kernel; inputs already checked."""
    interpret = _triton.interpret_for(h.device)
    segment_kernel, gather_kernel = _kernels(interpret)
    T, R = h.shape
    N = lora_b.shape[1]
    if meta.num_lora_rows == 0:
        return out
    block_k = min(max(_triton.next_pow2(R), 16), 128)
    common = (N, R, h.stride(0), lora_b.stride(0), lora_b.stride(1), out.stride(0), out_offset)
    if strategy == "gather":
        block_n = max(16, (65536 if interpret else 4096) // block_k)
        gather_kernel[(T, triton_cdiv(N, block_n))](h, lora_b, out, meta.token_slots, *common,
                                                   BLOCK_N=block_n, BLOCK_K=block_k)
        return out
    if interpret:  # big blocks: numpy vectorises them, the per-program Python cost dominates
        block_m, block_n = min(max(_triton.next_pow2(meta.max_seg_len), 16), 128), 2048
    else:
        block_m, block_n, block_k = (16 if meta.max_seg_len <= 16 else 64), 64, min(block_k, 64)
    grid = (len(meta.segments), triton_cdiv(meta.max_seg_len, block_m), triton_cdiv(N, block_n))
    segment_kernel[grid](h, lora_b, out, meta.sorted_rows, meta.seg_starts, meta.seg_lens, meta.seg_slots,
                         *common, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                         IEEE=h.dtype == torch.float32)
    return out
