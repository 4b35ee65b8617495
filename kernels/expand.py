"""LoRA expand: out[:, off:off+N] += h @ B[slot].T per row. Triton SGMV/BGMV kernels and the torch reference.

Semantics (T rows, S slots, R = max rank, N = out features of this slice):
    h: [T, R], lora_b: [S, N, R], token_lora_slots: [T] int (-1 = no adapter), out: [T, >= off + N]
    for t in range(T):
        s = token_lora_slots[t]
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

def expand_reference(h: torch.Tensor, lora_b: torch.Tensor, token_lora_slots: torch.Tensor, out: torch.Tensor,
                     out_offset: int = 0) -> torch.Tensor:
    """The obviously-right version of the semantics above (fp32, one matmul per distinct slot)."""
    N = lora_b.shape[1]
    view = out[:, out_offset:out_offset + N]  # [T, N]
    slots = token_lora_slots.to(torch.long)
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        rows = (slots == s).nonzero().squeeze(1)
        view[rows] = (view[rows].float() + h[rows].float() @ lora_b[s].float().T).to(out.dtype)
    return out


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """(segment kernel, gather kernel) wrapped for this mode; imports triton (through kernels._expand_kernels)."""
    _triton.load()  # a clear KernelError when triton is missing
    from kernels import _expand_kernels as k

    return _triton.jit(k._expand_segment_kernel, interpret), _triton.jit(k._expand_gather_kernel, interpret)


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
        gather_kernel[(T, triton_cdiv(N, block_n))](h, lora_b, out, meta.token_lora_slots, *common,
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
