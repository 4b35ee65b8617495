"""The torch reference and the fast torch path against a naive per-row float64 loop; metadata."""

from __future__ import annotations

import pytest
import torch

from kernels import LoraBatchMeta, lora_expand, lora_shrink
from tests.kernels.cases import (Case, assert_close, expand_inputs, naive_expand, naive_shrink,
                                 shrink_inputs)
from tests.kernels.conftest import torch_params

pytestmark = pytest.mark.usefixtures("cpu_impl")  # each test on torch's paths and on kernels.native

PATHS = ("torch", "cpu")


def _check_shrink(case: Case) -> None:
    inp = shrink_inputs(case)
    expected = naive_shrink(**inp)
    meta = LoraBatchMeta.from_token_lora_slots(inp["token_lora_slots"])
    for backend in PATHS:
        h = lora_shrink(**inp, meta=meta, backend=backend)
        assert h.dtype == inp["x"].dtype and h.shape == (case.T, case.rank)
        assert_close(h, expected, case.dtype, f"{backend} shrink {case.id}")
        assert torch.all(h[inp["token_lora_slots"] < 0] == 0)


def _check_expand(case: Case) -> None:
    inp = expand_inputs(case)
    expected = naive_expand(**inp)
    meta = LoraBatchMeta.from_token_lora_slots(inp["token_lora_slots"])
    out0 = inp.pop("out")
    off, N = inp["out_offset"], inp["lora_b"].shape[1]
    for backend in PATHS:
        out = out0.clone()
        assert lora_expand(**inp, out=out, meta=meta, backend=backend) is out
        assert_close(out, expected, case.dtype, f"{backend} expand {case.id}")
        neg = inp["token_lora_slots"] < 0
        assert torch.equal(out[neg], out0[neg])
        assert torch.equal(out[:, :off], out0[:, :off]) and torch.equal(out[:, off + N:], out0[:, off + N:])


@pytest.mark.parametrize("case", torch_params())
def test_torch_paths_shrink_match_naive_float64(case: Case) -> None:
    _check_shrink(case)


@pytest.mark.parametrize("case", torch_params())
def test_torch_paths_expand_match_naive_float64(case: Case) -> None:
    _check_expand(case)


@pytest.mark.parametrize("case", torch_params(slow=True))
def test_torch_paths_full_grid(case: Case) -> None:
    _check_shrink(case)
    _check_expand(case)


@pytest.mark.parametrize(("slots", "K"), [
    ([3, 3, 3, 3], 64),                  # single slot: plain matmul
    ([0, 0, 1, 1, 1, -1, -1, 2], 64),    # grouped runs: zero-copy slices
    ([0, 1, 2, 0, 1, 2, 0, 1, -1], 64),  # interleaved: sort-gather / scatter
    ([0, 1, 2, -1] * 10, 4096),          # interleaved, rows over CHUNK_BYTES: per-segment gather
    ([-1, -1], 64),                      # no adapter at all
])
def test_cpu_path_layouts_match_naive(slots: list[int], K: int) -> None:
    gen = torch.Generator().manual_seed(0)
    T, R, N, S = len(slots), 8, K, 4
    x, a = torch.randn(T, K, generator=gen), torch.randn(S, R, K, generator=gen) / K ** 0.5  # h ~ O(1)
    b, h, out = torch.randn(S, N, R, generator=gen), torch.randn(T, R, generator=gen), torch.randn(T, N, generator=gen)
    ts, scales = torch.tensor(slots), torch.rand(S, generator=gen) + 0.5
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    assert_close(lora_shrink(x, a, ts, scales, meta=meta, backend="cpu"), naive_shrink(x, a, ts, scales), "fp32", "shrink")
    expected = naive_expand(h, b, ts, out, 0)
    assert_close(lora_expand(h, b, ts, out, meta=meta, backend="cpu"), expected, "fp32", "expand")


def test_meta_layout() -> None:
    meta = LoraBatchMeta.from_token_lora_slots(torch.tensor([2, 0, -1, 2, 0, 2]))
    assert meta.num_tokens == 6 and meta.num_no_lora == 1 and meta.distinct_slots == (0, 2)
    assert meta.sorted_rows.tolist() == [1, 4, 0, 3, 5]  # stable: rows of slot 0, then slot 2
    assert meta.sorted_slots.tolist() == [0, 0, 2, 2, 2]
    assert meta.segments == ((0, 2, 0), (2, 5, 2))
    assert (meta.seg_starts.tolist(), meta.seg_lens.tolist(), meta.seg_slots.tolist()) == ([0, 2], [2, 3], [0, 2])
    assert meta.runs == ((0, 1, 2), (1, 2, 0), (2, 3, -1), (3, 4, 2), (4, 5, 0), (5, 6, 2)) and meta.max_seg_len == 3
    assert meta.single_slot is None and meta.strategy == "segment"
    a, b, slot = meta.segments[1]
    assert slot == 2 and meta.sorted_rows[a:b].tolist() == [0, 3, 5]
    assert LoraBatchMeta.from_token_lora_slots([1, 1, -1, 0, 0]).runs == ((0, 2, 1), (2, 3, -1), (3, 5, 0))  # grouped
    assert LoraBatchMeta.from_token_lora_slots([5, 5]).single_slot == 5
    assert LoraBatchMeta.from_token_lora_slots([5, -1]).single_slot is None
    assert LoraBatchMeta.from_token_lora_slots(torch.tensor([1, 0])).token_lora_slots.dtype == torch.int32


def test_zero_rows() -> None:
    x, a, slots, scales = torch.empty(0, 8), torch.randn(2, 4, 8), torch.empty(0, dtype=torch.long), torch.ones(2)
    for backend in ("torch", "cpu", "auto"):
        assert lora_shrink(x, a, slots, scales, backend=backend).shape == (0, 4)
        out = torch.empty(0, 6)
        assert lora_expand(torch.empty(0, 4), torch.randn(2, 6, 4), slots, out, backend=backend) is out
