"""lora_compose: per-row weighted sums of several adapters' deltas (virtual rows) against an fp32 loop."""

from __future__ import annotations

import pytest
import torch

from kernels import ComposedRows, KernelError, lora_compose
from tests.kernels.conftest import needs_triton

TOL = {torch.float32: 1e-4, torch.float16: 3e-2}


def _inputs(dtype: torch.dtype, T: int = 7, S: int = 5, R: int = 8, K: int = 48, N: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(dtype)
    a = (torch.randn(S, R, K, generator=g) / K**0.5).to(dtype)
    b = (torch.randn(S, N, R, generator=g) / R**0.5).to(dtype)
    scales = torch.rand(S, generator=g) + 0.5
    out = torch.randn(T, N + 8, generator=g).to(dtype)
    return x, a, b, scales, out


def _reference(x, a, b, scales, out, pairs, off):
    """The Semantics block, one component at a time, in fp32."""
    ref = out.float().clone()
    N = b.shape[1]
    for row, comps in pairs:
        for s, w in comps:
            h = scales[s] * (x[row].float() @ a[s].float().T)
            ref[row, off:off + N] += w * (h @ b[s].float().T)
    return ref


# row 1 and 5 untouched; row 3 composes three adapters incl. one twice with different weights
PAIRS = [(0, [(1, 0.7), (3, 0.5)]), (2, [(0, 1.0)]), (3, [(4, 0.2), (1, -0.4), (2, 1.5)]), (4, [(3, 0.3), (1, 0.6)]),
         (6, [(1, 0.25), (0, 2.0)])]


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_compose_matches_weighted_sum_of_deltas(backend: str, dtype: torch.dtype) -> None:
    x, a, b, scales, out = _inputs(dtype)
    composed = ComposedRows.from_pairs(PAIRS)
    assert composed.meta.token_lora_slots.tolist() == [0, 0, 1, 1, 1, 1, 2, 3, 3, 4]  # grouped by slot: one run each
    assert composed.rows.tolist() == [2, 6, 0, 3, 4, 6, 3, 0, 4, 3]
    before = out.clone()
    res = lora_compose(x, a, b, scales, out, composed, out_offset=8, backend=backend)
    assert res is out
    ref = _reference(x, a, b, scales, before, PAIRS, 8)
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(out[[1, 5]], before[[1, 5]]), "rows that compose nothing are untouched"
    assert torch.equal(out[:, :8], before[:, :8]), "columns outside the slice are untouched"


def test_weight_one_single_component_equals_the_plain_ops() -> None:
    from kernels import LoraBatchMeta, lora_expand, lora_shrink

    x, a, b, scales, out = _inputs(torch.float32, seed=2)
    slots = [2, 0, 4, 1, 1, 3, 0]
    plain = out.clone()
    h = lora_shrink(x, a, torch.tensor(slots), scales, meta=LoraBatchMeta.from_token_lora_slots(slots))
    lora_expand(h, b, torch.tensor(slots), plain, meta=LoraBatchMeta.from_token_lora_slots(slots), out_offset=8)
    lora_compose(x, a, b, scales, out, ComposedRows.from_pairs([(t, [(s, 1.0)]) for t, s in enumerate(slots)]),
                 out_offset=8)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)


def test_bad_composed_rows_are_refused() -> None:
    x, a, b, scales, out = _inputs(torch.float32)
    with pytest.raises(KernelError, match="slot"):
        ComposedRows.from_pairs([(0, [(-1, 1.0)])])
    with pytest.raises(KernelError, match="rows must be < 7"):
        lora_compose(x, a, b, scales, out, ComposedRows.from_pairs([(9, [(0, 1.0)])]))
    empty = out.clone()
    lora_compose(x, a, b, scales, empty, ComposedRows.from_pairs([]))
    assert torch.equal(empty, out)
