"""lora_shrink: Triton SGMV and BGMV kernels against the fp32 torch reference over the issue-3 grid."""

from __future__ import annotations

import pytest
import torch

from kernels import LoraBatchMeta, lora_shrink, shrink
from tests.kernels.cases import Case, assert_close, shrink_inputs
from tests.kernels.conftest import needs_cuda, needs_triton, triton_params


def _check_triton_shrink(case: Case, device: str) -> None:
    inp = shrink_inputs(case, device)
    meta = LoraBatchMeta.from_token_lora_slots(inp["token_lora_slots"])
    expected = lora_shrink(**inp, meta=meta, backend="torch")
    neg = inp["token_lora_slots"] < 0
    for strategy in ("segment", "gather"):
        h = lora_shrink(**inp, meta=meta, backend="triton", strategy=strategy)
        assert h.shape == (case.T, case.rank) and h.dtype == inp["x"].dtype and h.device == inp["x"].device
        assert_close(h, expected, case.dtype, f"{strategy} shrink {case.id}")
        assert torch.all(h[neg] == 0), f"{strategy}: rows with slot -1 must be exactly 0"


@pytest.mark.parametrize(("case", "device"), triton_params())
def test_triton_shrink_matches_reference(case: Case, device: str) -> None:
    _check_triton_shrink(case, device)


@pytest.mark.parametrize(("case", "device"), triton_params(slow=True))
def test_triton_shrink_full_grid(case: Case, device: str) -> None:
    _check_triton_shrink(case, device)


SPLIT_CASES = [Case("fp32", 128, 14336, 3, "uniform", True, True, True),
               Case("fp16", 16, 14336, 7, "zipf", True, False, False),
               Case("fp32", 8, 4096, 1, "identical", False, False, True)]


@pytest.mark.parametrize(("case", "device"), [
    *[pytest.param(c, "cpu", id=f"interp-{c.id}", marks=needs_triton) for c in SPLIT_CASES],
    *[pytest.param(c, "cuda", id=f"cuda-{c.id}", marks=[pytest.mark.gpu, needs_cuda, needs_triton])
      for c in [*SPLIT_CASES, Case("bf16", 64, 4096, 7, "distinct", True, True, False)]],
])
def test_triton_shrink_split_k_matches_reference(case: Case, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A K split (fp32 atomics, used when a decode grid is too small for the GPU) gives the same h."""
    monkeypatch.setattr(shrink, "FORCE_SPLIT_K", 3)
    _check_triton_shrink(case, device)


def test_auto_strategy_picks_gather_for_distinct_and_segment_for_shared() -> None:
    assert LoraBatchMeta.from_token_lora_slots([0, 1, 2, 3]).strategy == "gather"
    assert LoraBatchMeta.from_token_lora_slots([0, 1, 1, 0, -1]).strategy == "gather"
    assert LoraBatchMeta.from_token_lora_slots([0] * 8 + [1] * 8).strategy == "segment"
    assert LoraBatchMeta.from_token_lora_slots([2, 0, 2, 2, 0, 2]).strategy == "segment"


def test_triton_shrink_auto_strategy_and_all_no_lora_rows() -> None:
    pytest.importorskip("triton")
    case = Case("fp32", 16, 257, 7, "uniform", False, False, False)
    inp = shrink_inputs(case)
    h = lora_shrink(**inp, backend="triton")
    assert_close(h, lora_shrink(**inp, backend="torch"), "fp32", "auto strategy")
    inp["token_lora_slots"] = torch.full((7,), -1, dtype=torch.int32)
    assert torch.equal(lora_shrink(**inp, backend="triton"), torch.zeros(7, 16))
