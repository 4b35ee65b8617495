"""The CPU path's rank-aware slicing (`slot_ranks`): adapters of smaller ranks than the slots, several
ranks in one batch, many distinct adapters, -1 rows, every CPU layout; against a float64 loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import LoraBatchMeta, lora_expand, lora_shrink
from kernels.cpu import step_rank
from kernels.meta import KernelError
from tests.kernels.cases import assert_close, naive_expand, naive_shrink

pytestmark = pytest.mark.usefixtures("cpu_impl")  # each test on torch's paths and on kernels.native

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _slots(T: int, S: int, layout: str, neg: bool, gen: torch.Generator) -> list[int]:
    if layout == "distinct":  # decode over many adapters: a row (or two) per adapter, interleaved
        slots = [i % S for i in range(T)]
    elif layout == "uniform":
        slots = torch.randint(0, S, (T,), generator=gen).tolist()
    else:  # grouped: prefill-like runs
        slots = sorted(torch.randint(0, S, (T,), generator=gen).tolist())
    if neg:
        slots = [-1 if (i * 7) % 3 == 0 else s for i, s in enumerate(slots)]
    return slots


def _inputs(slots: list[int], ranks: list[int], *, R: int, K: int, N: int, seed: int, rank_scales: bool):
    """fp32 x [T, K], a [S, R, K], b [S, N, R] with slot s zero past ranks[s], h [T, R], out, scales."""
    gen = torch.Generator().manual_seed(seed)
    S, T = len(ranks), len(slots)
    x, h = torch.randn(T, K, generator=gen), torch.randn(T, R, generator=gen)
    a, b = torch.randn(S, R, K, generator=gen) / K ** 0.5, torch.randn(S, N, R, generator=gen) / R ** 0.5
    for s, r in enumerate(ranks):
        a[s, r:], b[s, :, r:] = 0, 0
    out = torch.randn(T, N + 6, generator=gen)
    scales = torch.rand(*((S, R) if rank_scales else (S,)), generator=gen) + 0.5
    return x, a, h, b, out, torch.tensor(slots), scales


def _check(slots: list[int], ranks: list[int], dtype: str, *, R: int = 64, K: int = 96, N: int = 80,
           seed: int = 0, rank_scales: bool = False, split: int | None = None, rank_major: bool = True) -> None:
    dt = DT[dtype]
    x, a, h, b, out, ts, scales = _inputs(slots, ranks, R=R, K=K, N=N, seed=seed, rank_scales=rank_scales)
    x, a, h, b, out = (t.to(dt) for t in (x, a, h, b, out))
    if rank_major:  # as engine.lora.slots stores B on CPU
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    meta = LoraBatchMeta.from_token_lora_slots(slots, split=split)
    rk = tuple(ranks)
    got = lora_shrink(x, a, ts, scales, meta=meta, backend="cpu", slot_ranks=rk)
    assert got.shape == (len(slots), R)
    assert_close(got, naive_shrink(x, a, ts, scales), dtype, "shrink")
    assert torch.all(got[ts < 0] == 0)
    used = [ranks[s] for s in set(slots) if s >= 0]
    if used:  # columns past the step's largest rank are exact zeros, not garbage
        assert torch.all(got[:, max(used):] == 0)
    expected = naive_expand(h, b, ts, out.clone(), 3)
    res = lora_expand(h, b, ts, out.clone(), meta=meta, out_offset=3, backend="cpu", slot_ranks=rk)
    assert_close(res, expected, dtype, "expand")
    assert torch.equal(res[:, :3], out[:, :3]) and torch.equal(res[:, 3 + N:], out[:, 3 + N:])
    assert torch.equal(res[ts < 0], out[ts < 0])  # base-only rows untouched


GRID = list(itertools.product(("fp32", "bf16"), (1, 3, 7, 133), ("distinct", "uniform", "grouped"), (False, True)))


@pytest.mark.parametrize(("dtype", "T", "layout", "neg"), GRID)
def test_mixed_ranks_in_one_batch_match_naive(dtype: str, T: int, layout: str, neg: bool) -> None:
    """r8 and r64 adapters (and an empty slot) in r64 slots, every default CPU layout."""
    gen = torch.Generator().manual_seed(T)
    ranks = [8, 64, 8, 16, 64, 1, 8, 0] * 4  # 32 slots, rank 0 = an empty slot (all zero)
    slots = [s if ranks[s] else (s + 1) % 32 for s in _slots(T, 32, layout, neg, gen)]
    _check(slots, ranks, dtype, seed=T, rank_scales=T % 2 == 1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("N", [16, 32, 64])
def test_many_distinct_adapters_below_the_slot_rank(dtype: str, N: int) -> None:
    """Decode over N adapters of rank 16 in r64 slots: one row each (fp32 takes A @ x.T), or two."""
    ranks = [16] * N
    for T in (N, 2 * N):
        slots = [i % N for i in range(T)]
        meta = LoraBatchMeta.from_token_lora_slots(slots)
        assert step_rank(meta, tuple(ranks), 64) == 16
        _check(slots, ranks, dtype, K=72, N=40, seed=N + T, rank_scales=True)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("slots", [
    [3] * 7,                                   # one adapter: a plain matmul at its rank
    [0, 1] * 9 + [-1],                         # two adapters: per-segment matmuls, each at its own rank
    [2] * 20 + [0, 1, 3, 4, 5, 1, 0, 3],       # a prefill run, then decode rows ("split")
    [5, 5, 5, 0, 0, 1, 1, 1, 1, 4],            # sorted runs
])
def test_every_layout_at_each_slots_own_rank(slots: list[int], dtype: str) -> None:
    ranks = [8, 64, 4, 16, 32, 2]
    split = 20 if len(slots) == 28 else None
    _check(slots, ranks, dtype, split=split, rank_scales=True)
    _check(slots, ranks, dtype, split=split, rank_major=False)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("slots", [
    [0, 1, 2, 3, 4, 5],                        # one row per adapter, contiguous slots (views)
    [7, 0, 3, -1, 7, 3, 0, 5, -1, 5],          # scattered slots, base rows, padded segments
    [0, 0, 1, 1, 2, 2, 3, 3],                  # rows already grouped: zero-copy views
])
def test_bmm_path_at_the_steps_largest_rank(slots: list[int], dtype: str, force_bmm: None) -> None:
    ranks = [8, 16, 4, 8, 1, 16, 2, 12]
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    assert meta.path_for(DT[dtype]) == "bmm"
    _check(slots, ranks, dtype, rank_scales=True)
    _check(slots, ranks, dtype, seed=1)


def test_without_ranks_the_whole_slot_is_read() -> None:
    meta = LoraBatchMeta.from_token_lora_slots([0, 1, 2])
    assert step_rank(meta, None, 64) == 64
    assert step_rank(meta, (8, 4, 2, 64), 64) == 8
    assert step_rank(meta, (0, 0, 0), 64) == 1


@pytest.mark.parametrize("ranks", [(8, 8), (8, 8, 65), (8, -1, 8)])
def test_bad_slot_ranks_are_kernel_errors(ranks: tuple[int, ...]) -> None:
    x, a, h, b, out, ts, scales = _inputs([0, 1, 2], [8, 8, 8], R=64, K=16, N=8, seed=0, rank_scales=False)
    with pytest.raises(KernelError, match="slot_ranks"):
        lora_shrink(x, a, ts, scales, backend="cpu", slot_ranks=ranks)
    with pytest.raises(KernelError, match="slot_ranks"):
        lora_expand(h, b, ts, out, backend="cpu", slot_ranks=ranks)


@pytest.mark.parametrize(("slots", "ranks", "dtype"), [
    ([3] * 7, [8, 64, 4, 16], "fp32"),                      # single adapter
    ([3] * 7, [8, 64, 4, 16], "bf16"),
    ([0, 1] * 9 + [-1], [8, 64], "fp32"),                   # two adapters, interleaved: per-segment
    ([1, 1, 1, 0, 0, 0, 0, 2], [8, 64, 16], "fp32"),        # sorted runs
    ([i % 16 for i in range(32)], [16] * 16, "fp32"),       # many adapters of one rank below the slots': bmm
    ([i % 16 for i in range(32)], [16] * 16, "bf16"),
])
def test_rows_past_a_slots_rank_are_never_read(slots: list[int], ranks: list[int], dtype: str) -> None:
    """The cost follows the adapters' own ranks: poison the rows past each rank and get the exact result.
    (bf16's "dense" layout, a view of whole slots, reads them: the two middle layouts are fp32 only.)"""
    dt = DT[dtype]
    x, a, h, b, out, ts, scales = _inputs(slots, ranks, R=64, K=48, N=40, seed=5, rank_scales=False)
    x, a, h, b, out = (t.to(dt) for t in (x, a, h, b, out))
    b = b.transpose(1, 2).contiguous().transpose(1, 2)
    a_bad, b_bad = a.clone(), b.clone()
    for s, r in enumerate(ranks):
        a_bad[s, r:], b_bad[s, :, r:] = float("nan"), float("nan")
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    got = lora_shrink(x, a_bad, ts, scales, meta=meta, backend="cpu", slot_ranks=tuple(ranks))
    assert_close(got, naive_shrink(x, a, ts, scales), dtype, "shrink")
    res = lora_expand(got, b_bad, ts, out.clone(), meta=meta, backend="cpu", slot_ranks=tuple(ranks))
    assert_close(res, naive_expand(got, b, ts, out.clone(), 0), dtype, "expand")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(("ranks", "T"), [([8, 64] * 8, 32), ([8, 64] * 8, 16), ([4, 4, 32] * 5 + [4], 37)])
def test_rank_classes_of_evenly_spaced_and_scattered_slots(ranks: list[int], T: int, dtype: str) -> None:
    """`--rank 8,64`-style batches: one bmm per rank class, the class's weights a strided view of the
    stack (slots 0, 2, 4, ...) or gathered (scattered slots)."""
    slots = [i % len(ranks) for i in range(T)]
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    if dtype == "fp32":
        assert meta.cpu_path == "bmm"
    _check(slots, ranks, dtype, rank_scales=True, seed=T)
