"""Fused projections: one shrink over a concatenated A stack (per-rank scales) + sliced expands."""

from __future__ import annotations

import pytest
import torch

from kernels import LoraBatchMeta, lora_expand, lora_shrink
from tests.kernels.cases import assert_close
from tests.kernels.conftest import needs_triton


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=needs_triton)])
def test_fused_qkv_equals_three_separate_lora_linears(backend: str) -> None:
    """A_q|A_k|A_v along R with scales [S, 3R], then h[:, iR:(i+1)R] expanded into out columns of q, k, v."""
    gen = torch.Generator().manual_seed(2)
    T, K, R, S, sizes = 9, 96, 8, 3, (64, 32, 32)
    slots = torch.tensor([2, 0, -1, 1, 2, 2, 0, -1, 1], dtype=torch.int32)
    meta = LoraBatchMeta.from_token_slots(slots)
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
