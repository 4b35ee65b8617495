"""lora_expand: Triton SGMV and BGMV kernels against the fp32 torch reference over the issue-3 grid."""

from __future__ import annotations

import pytest
import torch

from kernels import LoraBatchMeta, lora_expand
from tests.kernels.cases import Case, assert_close, expand_inputs
from tests.kernels.conftest import triton_params


def _check_triton_expand(case: Case, device: str) -> None:
    inp = expand_inputs(case, device)
    meta = LoraBatchMeta.from_token_lora_slots(inp["token_lora_slots"])
    out0 = inp.pop("out")
    expected = lora_expand(**inp, out=out0.clone(), meta=meta, backend="torch")
    off, N = inp["out_offset"], inp["lora_b"].shape[1]
    neg = inp["token_lora_slots"] < 0
    for strategy in ("segment", "gather"):
        out = out0.clone()
        res = lora_expand(**inp, out=out, meta=meta, backend="triton", strategy=strategy)
        assert res is out, "expand works in place and returns out"
        assert_close(out, expected, case.dtype, f"{strategy} expand {case.id}")
        assert torch.equal(out[neg], out0[neg]), f"{strategy}: rows with slot -1 must be untouched"
        assert torch.equal(out[:, :off], out0[:, :off]) and torch.equal(out[:, off + N:], out0[:, off + N:]), \
            f"{strategy}: columns outside [out_offset, out_offset + N) must be untouched"


@pytest.mark.parametrize(("case", "device"), triton_params())
def test_triton_expand_matches_reference(case: Case, device: str) -> None:
    _check_triton_expand(case, device)


@pytest.mark.parametrize(("case", "device"), triton_params(slow=True))
def test_triton_expand_full_grid(case: Case, device: str) -> None:
    _check_triton_expand(case, device)


def test_triton_fused_qkv_slices_add_up_to_one_output() -> None:
    """Three expands into the column slices of one output == three separate outputs side by side."""
    pytest.importorskip("triton")
    T, R, sizes = 5, 8, (32, 16, 16)
    gen = torch.Generator().manual_seed(1)
    slots = torch.tensor([1, -1, 0, 1, 2], dtype=torch.int32)
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    hs = [torch.randn(T, R, generator=gen) for _ in sizes]
    bs = [torch.randn(3, n, R, generator=gen) for n in sizes]
    fused = torch.zeros(T, sum(sizes))
    off = 0
    for h, b, n in zip(hs, bs, sizes):
        lora_expand(h, b, slots, fused, meta=meta, out_offset=off, backend="triton")
        off += n
    parts = [lora_expand(h, b, slots, torch.zeros(T, n), backend="torch") for h, b, n in zip(hs, bs, sizes)]
    assert_close(fused, torch.cat(parts, dim=1), "fp32", "fused qkv")
