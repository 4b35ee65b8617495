"""The CPU path's padded batched matmul ("bmm": many adapters, few rows each) against a float64 loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import LoraBatchMeta, lora_expand, lora_shrink
from tests.kernels.cases import Case, assert_close, expand_inputs, naive_expand, naive_shrink, shrink_inputs

pytestmark = pytest.mark.usefixtures("cpu_impl")  # each test on torch's paths and on kernels.native

GRID = [Case(dt, 16, size, T, pop, neg, padded=False, variant=variant)
        for dt, size, T, pop, neg, variant in itertools.product(
            ("fp32", "bf16"), (257,), (1, 3, 7, 133), ("distinct", "uniform", "zipf"), (False, True), (False, True))]


def _op_inputs(slots: list[int], *, R: int, K: int, N: int, S: int, extra_cols: int, seed: int,
               rank_scales: bool = True) -> tuple[torch.Tensor, ...]:
    """Seeded fp32 shrink/expand inputs: x [T, K], a [S, R, K], h [T, R], b [S, N, R],
    out [T, N + extra_cols], token slots [T] and scales [S, R] (or [S])."""
    gen = torch.Generator().manual_seed(seed)
    T = len(slots)
    x, a = torch.randn(T, K, generator=gen), torch.randn(S, R, K, generator=gen) / K ** 0.5
    h, b = torch.randn(T, R, generator=gen), torch.randn(S, N, R, generator=gen) / R ** 0.5
    out = torch.randn(T, N + extra_cols, generator=gen)
    scales = torch.rand(*((S, R) if rank_scales else (S,)), generator=gen) + 0.5
    return x, a, h, b, out, torch.tensor(slots), scales


def _meta(slots: torch.Tensor) -> LoraBatchMeta:
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    if len(meta.distinct_slots) >= 2:
        assert meta.cpu_path == "bmm" and meta.cpu_path_half == "bmm"
    return meta


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_bmm_path_shrink_matches_naive(case: Case, force_bmm: None) -> None:
    inp = shrink_inputs(case, seed=1)
    h = lora_shrink(**inp, meta=_meta(inp["token_lora_slots"]), backend="cpu")
    assert h.dtype == inp["x"].dtype and h.shape == (case.T, case.rank)
    assert_close(h, naive_shrink(**inp), case.dtype, f"bmm shrink {case.id}")
    assert torch.all(h[inp["token_lora_slots"] < 0] == 0)


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_bmm_path_expand_matches_naive(case: Case, force_bmm: None) -> None:
    inp = expand_inputs(case, seed=1)
    expected = naive_expand(**inp)
    out0 = inp["out"].clone()
    off, N = inp["out_offset"], inp["lora_b"].shape[1]
    assert lora_expand(**inp, meta=_meta(inp["token_lora_slots"]), backend="cpu") is inp["out"]
    out = inp["out"]
    assert_close(out, expected, case.dtype, f"bmm expand {case.id}")
    neg = inp["token_lora_slots"] < 0
    assert torch.equal(out[neg], out0[neg])  # -1 rows untouched
    assert torch.equal(out[:, :off], out0[:, :off]) and torch.equal(out[:, off + N:], out0[:, off + N:])


@pytest.mark.parametrize("slots", [
    [0, 1, 2, 3, 0, 1, 2, 3],          # contiguous slots from 0: weights used as a view of the stack
    [3, 4, 5, 3, 4, 5, 3],             # contiguous range not starting at 0
    [7, 0, 3, -1, 7, 3, 0, 5, -1, 5],  # scattered slots: the segments' weights gathered
    [2, 2, 2, 2, 2, 0, 1, 5],          # one long segment: rows padded to its length
])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bmm_path_slot_layouts(slots: list[int], dtype: str, force_bmm: None) -> None:
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    x, a, h, b, out, ts, scales = _op_inputs(slots, R=8, K=96, N=80, S=8, extra_cols=9, seed=0)
    meta = _meta(ts)
    distinct = sorted({s for s in slots if s >= 0})
    assert (meta.slot_base is not None) == (distinct == list(range(distinct[0], distinct[-1] + 1)))
    assert meta.pad_len == max(slots.count(s) for s in distinct)
    got = lora_shrink(x.to(dt), a.to(dt), ts, scales, meta=meta, backend="cpu")
    assert_close(got, naive_shrink(x.to(dt), a.to(dt), ts, scales), dtype, "shrink")
    expected = naive_expand(h.to(dt), b.to(dt), ts, out.to(dt), 4)
    got = lora_expand(h.to(dt), b.to(dt), ts, out.to(dt), meta=meta, out_offset=4, backend="cpu")
    assert_close(got, expected, dtype, "expand")


@pytest.mark.parametrize(("slots", "path", "half_path"), [
    ([0, 1, 2, 3, 4, 5, 6, 7] * 4, "bmm", "dense"),          # decode: 8 adapters, 4 rows each, interleaved
    ([0, 0, 1, 1, 2, 2, 3, 3, -1, 4, 4], "bmm", "dense"),    # sorted decode with a base-only row
    ([0, 1] * 8, "segments", "dense"),                       # 2 adapters interleaved: too few segments to batch
    ([0] * 40 + [1] * 40 + [2] * 40, "bmm", "bmm"),          # equal runs in slot order: zero-copy bmm views
    ([0] * 24 + [1] * 20 + [2] * 22, "runs", "dense"),       # prefill-like unequal runs: 16-bit batches them
    ([0] * 80 + [1] * 70 + [2] * 75, "runs", "dense"),       # prompt-length runs: one 16-bit matmul beats 3
    ([0] * 160 + [1] * 140 + [2] * 150, "runs", "runs"),     # long runs: zero-copy slices in every dtype
    ([0] * 30 + [1, 2, 3], "runs", "dense"),                 # one long segment: padding would be 10x
    ([4] * 6, "single", "single"),
    ([-1, -1], "none", "none"),
])
def test_cpu_path_choice(slots: list[int], path: str, half_path: str) -> None:
    """The default heuristics: batch many short segments (longer ones for bf16/fp16), keep zero-copy
    slices for long runs."""
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    assert (meta.cpu_path, meta.path_for(torch.float32)) == (path, path)
    assert (meta.path_for(torch.bfloat16), meta.path_for(torch.float16)) == (half_path, half_path)


@pytest.mark.parametrize("slots", [
    [0, 0, 1, 1, 2, 2, 3, 3],            # sorted decode batch, slots 0..3: views of rows and stack
    [2, 2, 2, 5, 5, 5, 7, 7, 7],         # sorted, equal segments, scattered slots
    list(range(16)) * 1,                 # one row per adapter
])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bmm_on_rows_already_grouped_in_place(slots: list[int], dtype: str, force_bmm: None) -> None:
    """Rows already in equal slot-ordered segments take the zero-copy path and stay exact."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    x, a, h, b, out, ts, scales = _op_inputs(slots, R=8, K=64, N=48, S=16, extra_cols=5, seed=1)
    N = b.shape[1]
    meta = _meta(ts)
    assert meta.pad_identity
    got = lora_shrink(x.to(dt), a.to(dt), ts, scales, meta=meta, backend="cpu")
    assert_close(got, naive_shrink(x.to(dt), a.to(dt), ts, scales), dtype, "shrink")
    before = out.to(dt)
    expected = naive_expand(h.to(dt), b.to(dt), ts, before.clone(), 3)
    got = lora_expand(h.to(dt), b.to(dt), ts, before.clone(), meta=meta, out_offset=3, backend="cpu")
    assert_close(got, expected, dtype, "expand")
    assert torch.equal(got[:, :3], before[:, :3]) and torch.equal(got[:, 3 + N:], before[:, 3 + N:])


@pytest.mark.parametrize(("slots", "split"), [
    ([3] * 20 + [0] * 9 + list(range(16)) * 2, 29),          # two prompts, then a decode row pair per adapter
    ([5] * 33 + sorted([0, 1, 2, 3, 4, 6, 7] * 3), 33),      # one prompt, sorted decode segments (bmm part)
    ([-1] * 12 + [2] * 7 + [0, 0, -1, 1, 1, 4, 4, 9, 9], 19),  # base-only prompt rows and a base decode row
    ([1] * 10 + [2] * 6 + [-1, -1, -1], 16),                 # decode rows all base: second part "none"
])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_prefill_then_decode_split_layout_matches_naive(slots: list[int], split: int, dtype: str) -> None:
    """A step of prefill chunks followed by decode rows: each part takes its own CPU path, and the
    shrink/expand results equal the float64 loop; columns outside the expanded slice are untouched."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    x, a, h, b, out, ts, scales = _op_inputs(slots, R=8, K=96, N=40, S=16, extra_cols=6, seed=7, rank_scales=False)
    T, N = len(slots), b.shape[1]
    meta = LoraBatchMeta.from_token_lora_slots(slots, split=split)
    assert meta.path_for(dt) == "split" and [(p0, p1) for p0, p1, _ in meta.parts] == [(0, split), (split, T)]
    whole = LoraBatchMeta.from_token_lora_slots(slots)
    assert whole.cpu_path != "split" and not whole.parts  # no split asked: one layout
    got = lora_shrink(x.to(dt), a.to(dt), ts, scales, meta=meta, backend="cpu")
    assert_close(got, naive_shrink(x.to(dt), a.to(dt), ts, scales), dtype, "shrink")
    assert torch.all(got[ts < 0] == 0)
    before = out.to(dt)
    expected = naive_expand(h.to(dt), b.to(dt), ts, before.clone(), 4)
    got = lora_expand(h.to(dt), b.to(dt), ts, before.clone(), meta=meta, out_offset=4, backend="cpu")
    assert_close(got, expected, dtype, "expand")
    assert torch.equal(got[:, :4], before[:, :4]) and torch.equal(got[:, 4 + N:], before[:, 4 + N:])
    assert torch.equal(got[ts < 0], before[ts < 0])  # base-only rows get no delta


@pytest.mark.parametrize("slots", [
    [0, 1, 2, 3, 4, 5, 6, 7] * 3 + [2, 5],                   # interleaved decode, unequal segments
    [3, 3, 3, 1, -1, 1, 0, 0, 0, 0, 7, -1],                  # base-only rows among them
    [9] * 5 + [2] * 3 + [11] * 7 + [4],                      # sorted runs of unequal length, scattered slots
    [0, 1] * 6,                                              # two adapters only
])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("rank_major", [True, False])
@pytest.mark.parametrize("R", [8, 64])  # 64: slots lo..hi span too many columns, the fallback path runs
def test_dense_path_matches_naive(slots: list[int], dtype: str, rank_major: bool, R: int) -> None:
    """16-bit short unequal segments: one dense matmul against the stacked adapters (B rank-major as
    the engine's CPU slots store it, or the plain layout, which falls back) equals the float64 loop."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x, a, h, b, out, ts, scales = _op_inputs(slots, R=R, K=80, N=36, S=16, extra_cols=3, seed=11)
    N = b.shape[1]
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    assert meta.path_for(dt) == "dense"
    b_dt = b.to(dt).transpose(1, 2).contiguous().transpose(1, 2) if rank_major else b.to(dt)
    assert (b_dt.stride(1) == 1) == rank_major and torch.equal(b_dt, b.to(dt))
    got = lora_shrink(x.to(dt), a.to(dt), ts, scales, meta=meta, backend="cpu")
    assert_close(got, naive_shrink(x.to(dt), a.to(dt), ts, scales), dtype, "shrink")
    assert torch.all(got[ts < 0] == 0)
    before = out.to(dt)
    expected = naive_expand(h.to(dt), b.to(dt), ts, before.clone(), 2)
    got = lora_expand(h.to(dt), b_dt, ts, before.clone(), meta=meta, out_offset=2, backend="cpu")
    assert_close(got, expected, dtype, "expand")
    assert torch.equal(got[:, :2], before[:, :2]) and torch.equal(got[:, 2 + N:], before[:, 2 + N:])
    assert torch.equal(got[ts < 0], before[ts < 0])


@pytest.mark.parametrize("upcast", [False, True], ids=["bf16-gemm", "fp32-upcast"])
@pytest.mark.parametrize("slots", [[0, 1, 2, 3] * 2, [5, 1, 3, -1, 5, 3, 1, 0]])
def test_bmm_path_half_either_way(slots: list[int], upcast: bool, force_bmm: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 "bmm" shrinks and expands agree with the reference whether they run as bf16 GEMMs (AMX) or upcast
    to fp32 (no AMX)."""
    monkeypatch.setattr("kernels.tuning.cpu_half_bmm_in_fp32", lambda fp32_bytes: upcast)
    x, a, h, b, out, ts, scales = _op_inputs(slots, R=8, K=96, N=80, S=8, extra_cols=5, seed=2)
    bf = torch.bfloat16
    got = lora_shrink(x.to(bf), a.to(bf), ts, scales, meta=_meta(ts), backend="cpu")
    assert got.dtype == bf
    assert_close(got, naive_shrink(x.to(bf), a.to(bf), ts, scales), "bf16", "shrink")
    assert torch.all(got[ts < 0] == 0)
    expected = naive_expand(h.to(bf), b.to(bf), ts, out.to(bf), 3)
    got = lora_expand(h.to(bf), b.to(bf), ts, out.to(bf), meta=_meta(ts), out_offset=3, backend="cpu")
    assert_close(got, expected, "bf16", "expand")


@pytest.mark.parametrize("ax", [False, True], ids=["x@A.T", "A@x.T"])
@pytest.mark.parametrize("slots", [[0, 1, 2, 3] * 2, [5, 1, 3, -1, 5, 3, 1, 0], [7, 6, 5, 4, 3, 2, 1, 0]])
def test_fp32_bmm_shrink_in_either_form(slots: list[int], ax: bool, force_bmm: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 "bmm" shrinks of short segments agree with the reference in both forms the CPU probe can pick
    (`tuning.cpu_shrink_ax`: A @ x.T on one CPU, x @ A.T on another)."""
    monkeypatch.setattr("kernels.tuning.cpu_shrink_ax", lambda: ax)
    x, a, _, _, _, ts, scales = _op_inputs(slots, R=8, K=96, N=80, S=8, extra_cols=0, seed=3)
    got = lora_shrink(x, a, ts, scales, meta=_meta(ts), backend="cpu")
    assert got.dtype == torch.float32
    assert_close(got, naive_shrink(x, a, ts, scales), "fp32", "shrink")
    assert torch.all(got[ts < 0] == 0)


@pytest.mark.parametrize("fp32_rows", [0, 8], ids=["bf16-gemm", "fp32-upcast"])
@pytest.mark.parametrize("T", [1, 5, 8, 24])
def test_single_adapter_half_either_way(T: int, fp32_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-adapter bf16 step agrees with the reference whether its few rows run as bf16 GEMMs or as fp32
    GEMMs on upcast copies (`tuning.CPU_HALF_SINGLE_FP32_MAX_ROWS`), with and without a rank below the slot's."""
    monkeypatch.setattr("kernels.tuning.CPU_HALF_SINGLE_FP32_MAX_ROWS", fp32_rows)
    slots = [3] * T
    x, a, h, b, out, ts, scales = _op_inputs(slots, R=8, K=96, N=80, S=8, extra_cols=5, seed=4)
    bf = torch.bfloat16
    meta = LoraBatchMeta.from_token_lora_slots(ts)
    assert meta.single_slot == 3
    for ranks in (None, [8] * 8, [5] * 8):
        if ranks is not None:
            a[:, ranks[0]:] = 0  # rows past a slot's rank are zero, as engine.lora.slots keeps them
            b[:, :, ranks[0]:] = 0
        got = lora_shrink(x.to(bf), a.to(bf), ts, scales, meta=meta, backend="cpu", slot_ranks=ranks)
        assert got.dtype == bf and got.shape == (T, 8)
        assert_close(got, naive_shrink(x.to(bf), a.to(bf), ts, scales), "bf16", f"shrink ranks={ranks}")
        expected = naive_expand(h.to(bf), b.to(bf), ts, out.to(bf), 3)
        got = lora_expand(h.to(bf), b.to(bf), ts, out.to(bf), meta=meta, out_offset=3, backend="cpu", slot_ranks=ranks)
        assert_close(got, expected, "bf16", f"expand ranks={ranks}")
