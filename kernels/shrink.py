"""LoRA shrink: h = scale * x @ A[slot].T per row. Triton SGMV/BGMV kernels and the torch reference.

Semantics (T rows, S slots, R = max rank, K = in features):
    x: [T, K], lora_a: [S, R, K], token_slots: [T] int (-1 = no adapter), scales: [S] or [S, R]
    for t in range(T):
        s = token_slots[t]
        h[t] = 0                                          if s == -1
        h[t] = scales[s] * (x[t] @ lora_a[s].T)           otherwise   # fp32 accumulation
    h: [T, R] in x.dtype
Adapters with rank r < R are zero-padded in the stack (rows r..R of A are 0), so their extra
h columns are 0. `scales` of shape [S, R] scales each rank column separately, which lets one
shrink over a concatenated stack (e.g. A_q|A_k|A_v along R) apply per-module scalings.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kernels import _triton
from kernels.meta import LoraBatchMeta

tl: Any = None  # triton.language, bound on the first Triton launch (the engine never imports triton)


def shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:
    """The obviously-right version of the semantics above (fp32, one matmul per distinct slot)."""
    T, R = x.shape[0], lora_a.shape[1]
    h = torch.zeros(T, R, dtype=torch.float32, device=x.device)  # h: [T, R]
    slots = token_slots.to(torch.long)
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        rows = (slots == s).nonzero().squeeze(1)
        h[rows] = (x[rows].float() @ lora_a[s].float().T) * scales[s].float()
    return h.to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernels
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
        acc += tl.reduce(at.to(tl.float32) * xv[None, :], 1, tl.standard._sum_combine)
    if SCALE_PER_RANK:
        acc = acc * tl.load(scale_ptr + slot * ssc_s + offs_r * ssc_r, mask=r_mask, other=0.0).to(tl.float32)
    else:
        acc = acc * tl.load(scale_ptr + slot * ssc_s).to(tl.float32)
    acc = tl.where(live_r, acc, 0.0)
    if SPLIT_K == 1:
        tl.store(h_ptr + t * sh_t + offs_r, acc.to(h_ptr.dtype.element_ty), mask=r_mask)
    else:
        tl.atomic_add(h_ptr + t * sh_t + offs_r, acc, mask=r_mask)


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    global tl
    _, tl = _triton.load()
    return _triton.jit(_shrink_segment_kernel, interpret), _triton.jit(_shrink_gather_kernel, interpret)


# Tests set this to force a K split in the interpreter (which otherwise never splits).
FORCE_SPLIT_K: int | None = None


def _split_k(programs: int, K: int, block_k: int, device: torch.device, interpret: bool) -> int:
    """K splits so that a decode-sized grid still fills the GPU (each split keeps >= 4 K blocks)."""
    if FORCE_SPLIT_K is not None:
        return FORCE_SPLIT_K
    if interpret:
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while programs * split < target and K >= block_k * split * 8:
        split *= 2
    return split


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, scales: torch.Tensor, meta: LoraBatchMeta,
                  strategy: str) -> torch.Tensor:
    """Launch the SGMV ("segment") or BGMV ("gather") shrink kernel; inputs already checked."""
    interpret = _triton.interpret_for(x.device)
    segment_kernel, gather_kernel = _kernels(interpret)
    T, K = x.shape
    R = lora_a.shape[1]
    if meta.num_lora_rows == 0:
        return torch.zeros(T, R, dtype=x.dtype, device=x.device)
    per_rank = scales.dim() == 2
    ssc_r = scales.stride(1) if per_rank else 0
    block_r = min(max(_triton.next_pow2(R), 16), 128)
    r_blocks = triton_cdiv(R, block_r)
    if strategy == "gather":
        block_k = max(16, (65536 if interpret else 4096) // block_r)
        programs = T * r_blocks
    else:
        if interpret:  # big blocks: numpy vectorises them, the per-program Python cost dominates
            block_m, block_k = min(max(_triton.next_pow2(meta.max_seg_len), 16), 128), 2048
        else:
            block_m, block_k = (16 if meta.max_seg_len <= 16 else 64), 64
        m_blocks = triton_cdiv(meta.max_seg_len, block_m)
        programs = len(meta.segments) * m_blocks * r_blocks
    split = _split_k(programs, K, block_k, x.device, interpret)
    k_per_split = triton_cdiv(triton_cdiv(K, split), block_k) * block_k
    split = triton_cdiv(K, k_per_split)
    if split > 1:  # fp32 atomics into zeros; rows without an adapter stay 0
        h = torch.zeros(T, R, dtype=torch.float32, device=x.device)
    elif strategy == "gather":
        h = torch.empty(T, R, dtype=x.dtype, device=x.device)  # -1 rows get zeros from the kernel
    else:
        h = (torch.zeros if meta.num_no_lora else torch.empty)(T, R, dtype=x.dtype, device=x.device)
    common = (K, R, x.stride(0), lora_a.stride(0), lora_a.stride(1), h.stride(0), scales.stride(0), ssc_r,
              r_blocks, k_per_split)
    if strategy == "gather":
        gather_kernel[(T, r_blocks * split)](x, lora_a, scales, h, meta.token_slots, *common, BLOCK_R=block_r,
                                             BLOCK_K=block_k, SCALE_PER_RANK=per_rank, SPLIT_K=split)
    else:
        grid = (len(meta.segments), m_blocks, r_blocks * split)
        segment_kernel[grid](x, lora_a, scales, h, meta.sorted_rows, meta.seg_starts, meta.seg_lens,
                             meta.seg_slots, *common, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
                             SCALE_PER_RANK=per_rank, IEEE=x.dtype == torch.float32, SPLIT_K=split)
    return h if h.dtype == x.dtype else h.to(x.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
