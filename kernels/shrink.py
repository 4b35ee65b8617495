"""LoRA shrink: h = scale * x @ A[slot].T per row. Triton SGMV/BGMV kernels and the torch reference.

Semantics (T rows, S slots, R = max rank, K = in features):
    x: [T, K], lora_a: [S, R, K], token_lora_slots: [T] int (-1 = no adapter), scales: [S] or [S, R]
    for t in range(T):
        s = token_lora_slots[t]
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

def shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, token_lora_slots: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:
    """The obviously-right version of the semantics above (fp32, one matmul per distinct slot)."""
    T, R = x.shape[0], lora_a.shape[1]
    h = torch.zeros(T, R, dtype=torch.float32, device=x.device)  # h: [T, R]
    slots = token_lora_slots.to(torch.long)
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        rows = (slots == s).nonzero().squeeze(1)
        h[rows] = (x[rows].float() @ lora_a[s].float().T) * scales[s].float()
    return h.to(x.dtype)


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """(segment kernel, gather kernel) wrapped for this mode; imports triton (through kernels._shrink_kernels)."""
    _triton.load()  # a clear KernelError when triton is missing
    from kernels import _shrink_kernels as k

    return _triton.jit(k._shrink_segment_kernel, interpret), _triton.jit(k._shrink_gather_kernel, interpret)


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
        gather_kernel[(T, r_blocks * split)](x, lora_a, scales, h, meta.token_lora_slots, *common, BLOCK_R=block_r,
                                             BLOCK_K=block_k, SCALE_PER_RANK=per_rank, SPLIT_K=split)
    else:
        grid = (len(meta.segments), m_blocks, r_blocks * split)
        segment_kernel[grid](x, lora_a, scales, h, meta.sorted_rows, meta.seg_starts, meta.seg_lens,
                             meta.seg_slots, *common, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
                             SCALE_PER_RANK=per_rank, IEEE=x.dtype == torch.float32, SPLIT_K=split)
    return h if h.dtype == x.dtype else h.to(x.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
