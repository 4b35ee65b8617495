"""Fused projections: one shrink over a concatenated A stack (per-rank scales) + sliced expands."""

from __future__ import annotations

import pytest
import torch

from kernels import (KernelError, LoraBatchMeta, lora_expand, lora_expand_slices, lora_shrink, lora_shrink_slices,
                     native, tuning)
from tests.kernels.cases import assert_close
from tests.kernels.conftest import needs_triton


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=needs_triton)])
def test_fused_qkv_equals_three_separate_lora_linears(backend: str) -> None:
    """A_q|A_k|A_v along R with scales [S, 3R], then h[:, iR:(i+1)R] expanded into out columns of q, k, v."""
    gen = torch.Generator().manual_seed(2)
    T, K, R, S, sizes = 9, 96, 8, 3, (64, 32, 32)
    slots = torch.tensor([2, 0, -1, 1, 2, 2, 0, -1, 1], dtype=torch.int32)
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    x = torch.randn(T, K, generator=gen)
    a = [torch.randn(S, R, K, generator=gen) / K ** 0.5 for _ in sizes]
    b = [torch.randn(S, n, R, generator=gen) / R ** 0.5 for n in sizes]
    sc = [torch.rand(S, generator=gen) + 0.5 for _ in sizes]
    base = torch.randn(T, sum(sizes), generator=gen)

    # separate: three LoRA linears, each with its own [S] scales, each into its own output
    expected = []
    for i, n in enumerate(sizes):
        h = lora_shrink(x, a[i], slots, sc[i], backend="torch")
        expected.append(lora_expand(h, b[i], slots, base[:, sum(sizes[:i]):sum(sizes[:i + 1])].clone(),
                                    backend="torch"))

    # fused: one shrink over [S, 3R, K] with per-rank scales [S, 3R], expands into column slices
    a_cat = torch.cat(a, dim=1)  # [S, 3R, K]
    sc_cat = torch.cat([s.unsqueeze(1).expand(S, R) for s in sc], dim=1).contiguous()  # [S, 3R]
    h_cat = lora_shrink(x, a_cat, slots, sc_cat, meta=meta, backend=backend)  # [T, 3R]
    out = base.clone()
    for i, n in enumerate(sizes):
        lora_expand(h_cat[:, i * R:(i + 1) * R], b[i], slots, out, meta=meta, out_offset=sum(sizes[:i]),
                    backend=backend)
    assert_close(out, torch.cat(expected, dim=1), "fp32", f"fused qkv ({backend})")


# bf16 not on the Triton interpreter: its bf16 tl.dot is wrong (triton-lang/triton#11584)
_SLICE_CASES = [pytest.param(b, d, marks=[needs_triton] if b == "triton" else [])
                for b in ("cpu", "native", "triton") for d in (torch.float32, torch.float16, torch.bfloat16)
                if not (b == "triton" and d == torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", _SLICE_CASES)
def test_slices_ops_equal_one_op_per_slice(backend: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """lora_shrink_slices / lora_expand_slices (one call for q, k, v) give exactly the per-slice ops' result
    ("native": the CPU backend on kernels.native's loops, all slices in one native call)."""
    rank_major = backend == "native"  # engine.lora.slots' CPU layout, which the loops need for B
    if backend == "native":
        if native._compiler() is None:
            pytest.skip("no C++ compiler: the native loops cannot be built here")
        monkeypatch.setenv(tuning.CPU_NATIVE_ENV, "1")
        backend = "cpu"
    gen = torch.Generator().manual_seed(5)
    T, K, S, ranks, sizes = 11, 64, 4, (8, 4, 4), (48, 16, 16)
    slots = torch.tensor([3, 0, -1, 1, 3, 3, 0, -1, 1, 2, 2], dtype=torch.int32)
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    x = torch.randn(T, K, generator=gen).to(dtype)
    a = [(torch.randn(S, r, K, generator=gen) / K ** 0.5).to(dtype) for r in ranks]
    b = [(torch.randn(S, n, r, generator=gen) / r ** 0.5).to(dtype) for n, r in zip(sizes, ranks)]
    if rank_major:
        b = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in b]
    sc = [torch.rand(S, generator=gen) + 0.5 for _ in sizes]
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    base = torch.randn(T, sum(sizes), generator=gen).to(dtype)

    ref_out = base.clone()
    ref_h = [lora_shrink(x, a[i], slots, sc[i], meta=meta, backend=backend) for i in range(3)]
    for i in range(3):
        lora_expand(ref_h[i], b[i], slots, ref_out, meta=meta, out_offset=offs[i], backend=backend)

    hs = lora_shrink_slices(x, list(zip(a, sc)), slots, meta=meta, backend=backend)
    out = lora_expand_slices(hs, list(zip(b, offs)), slots, base.clone(), meta=meta, backend=backend)
    assert all(torch.equal(h, r) for h, r in zip(hs, ref_h))
    assert torch.equal(out, ref_out)


def test_slices_ops_check_their_arguments() -> None:
    slots = torch.tensor([0, 1], dtype=torch.int32)
    x, a, sc = torch.randn(2, 8), torch.randn(2, 4, 8), torch.ones(2)
    with pytest.raises(KernelError, match="features"):
        lora_shrink_slices(x, [(a, sc), (torch.randn(2, 4, 9), sc)], slots)
    with pytest.raises(KernelError, match="shrink outputs"):
        lora_expand_slices([torch.randn(2, 4)], [], slots, torch.zeros(2, 8))
