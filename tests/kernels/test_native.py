"""kernels.native: the C++ LoRA loops for short segments, and how they are built, cached and turned off.

The numeric grids of test_torch_paths / test_cpu_bmm / test_cpu_ranks run on these loops too (their
`cpu_impl` fixture); this file covers what is the loops' own: tails of every vector width, strided views,
per-row independence (a row's bits do not depend on its batch), NaN staying in its row, the `auto`
choice, and the build (a missing compiler leaves the torch paths serving; the cache is keyed by CPU).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from kernels import LoraBatchMeta, lora_expand, lora_shrink, native, tuning
from tests.kernels.cases import assert_close, naive_expand, naive_shrink

needs_cxx = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler: the native loops cannot be built")
pytestmark = needs_cxx
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(slots: list[int], *, S: int, R: int, K: int, N: int, ranks: list[int] | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    T = len(slots)
    x = torch.randn(T, K + 5, generator=gen)[:, 2:K + 2]  # a row-strided view
    a = torch.randn(S, R, K, generator=gen) / K ** 0.5
    b = torch.randn(S, R, N, generator=gen).transpose(1, 2) / R ** 0.5  # rank-major, as engine.lora.slots keeps it
    for s, r in enumerate(ranks or []):
        a[s, r:], b[s, :, r:] = 0, 0
    scales = torch.rand(S, generator=gen) + 0.5
    out = torch.randn(T, N + 9, generator=gen)
    return x, a, b, scales, out, torch.tensor(slots)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("K,N", [(768, 2048), (64, 64), (37, 23), (16 * 5 + 3, 64 * 3 + 17)])
@pytest.mark.parametrize("ranks", [None, [16, 3, 8, 1, 13]])
def test_native_matches_float64_at_every_tail(dtype: str, K: int, N: int, ranks: list[int] | None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Widths that are not multiples of a vector (or of the 64-column block), ranks not multiples of the
    4-row block, -1 rows, a strided x and an expand into a column slice of a wider out."""
    monkeypatch.setenv(tuning.CPU_NATIVE_ENV, "1")
    dt = DT[dtype]
    slots = [0, 3, -1, 3, 1, 1, 4, 0, 2, 2, 2, 2, 2, 2, 2, -1, 4]
    x, a, b, scales, out, ts = _inputs(slots, S=5, R=16, K=K, N=N, ranks=ranks)
    x, a, b, out = x.to(dt), a.to(dt), b.to(dt), out.to(dt)
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    assert native.wants(meta, dt)
    rk = tuple(ranks) if ranks else None
    h = lora_shrink(x, a, ts, scales, meta=meta, backend="cpu", slot_ranks=rk)
    assert_close(h, naive_shrink(x, a, ts, scales), dtype, "native shrink")
    assert torch.all(h[ts < 0] == 0)
    if ranks:  # columns past each row's own rank are exact zeros
        for t, s in enumerate(slots):
            if s >= 0:
                assert torch.all(h[t, ranks[s]:] == 0)
    before = out.clone()
    expected = naive_expand(h, b, ts, out.clone(), 4)
    got = lora_expand(h, b, ts, out, out_offset=4, meta=meta, backend="cpu", slot_ranks=rk)
    assert got is out
    assert_close(out, expected, dtype, "native expand")
    assert torch.equal(out[ts < 0], before[ts < 0])  # base-model rows untouched
    assert torch.equal(out[:, :4], before[:, :4]) and torch.equal(out[:, 4 + N:], before[:, 4 + N:])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_rows_result_is_the_same_alone_or_in_any_batch(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit-identical per row: a request's LoRA delta does not depend on which tenants share its step
    (torch's 16-bit GEMMs pick kernels by row count, so there a row can round differently in a batch)."""
    monkeypatch.setenv(tuning.CPU_NATIVE_ENV, "1")
    dt = DT[dtype]
    slots = [i % 7 for i in range(29)] + [3, 3, 3]
    x, a, b, scales, out, ts = _inputs(slots, S=7, R=16, K=200, N=300, ranks=None, seed=1)
    x, a, b, out = x.to(dt), a.to(dt), b.to(dt), out.to(dt)
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    h = lora_shrink(x, a, ts, scales, meta=meta, backend="cpu")
    batch_out = lora_expand(h, b, ts, out.clone(), meta=meta, backend="cpu")
    for t in (0, 3, 29, 31):
        one = LoraBatchMeta.from_token_lora_slots([slots[t]])
        h1 = lora_shrink(x[t:t + 1], a, ts[t:t + 1], scales, meta=one, backend="cpu")
        assert torch.equal(h1, h[t:t + 1])
        o1 = lora_expand(h1, b, ts[t:t + 1], out[t:t + 1].clone(), meta=one, backend="cpu")
        assert torch.equal(o1, batch_out[t:t + 1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_nan_stays_in_its_own_row(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant whose activations blew up gets NaN in its own rows only (the sampler then ends that
    request alone); the other rows of its adapter, in its block of 4, are untouched."""
    monkeypatch.setenv(tuning.CPU_NATIVE_ENV, "1")
    dt = DT[dtype]
    slots = [2, 2, 2, 2, 2, 1, 1]
    x, a, b, scales, out, ts = _inputs(slots, S=3, R=8, K=48, N=40, ranks=None, seed=2)
    x, a, b, out = x.to(dt), a.to(dt), b.to(dt), out.to(dt)
    meta = LoraBatchMeta.from_token_lora_slots(slots)
    clean_h = lora_shrink(x, a, ts, scales, meta=meta, backend="cpu")
    clean = lora_expand(clean_h, b, ts, out.clone(), meta=meta, backend="cpu")
    x[1, 5] = float("nan")
    h = lora_shrink(x, a, ts, scales, meta=meta, backend="cpu")
    got = lora_expand(h, b, ts, out.clone(), meta=meta, backend="cpu")
    assert torch.isnan(h[1]).all() and torch.isnan(got[1, :40]).all()  # the expand's 40 columns of out
    assert torch.equal(got[1, 40:], out[1, 40:])
    keep = [t for t in range(len(slots)) if t != 1]
    assert torch.equal(h[keep], clean_h[keep]) and torch.equal(got[keep], clean[keep])


def test_auto_runs_bf16_decode_natively_and_leaves_the_rest_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tuning.CPU_NATIVE_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine runs in every measurement behind the choice
    try:
        _auto_choices(monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _auto_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    decode = LoraBatchMeta.from_token_lora_slots([i // 2 for i in range(32)])  # 16 adapters x 2 rows
    single = LoraBatchMeta.from_token_lora_slots([3] * 32)
    prefill = LoraBatchMeta.from_token_lora_slots([0] * 200 + [1] * 150)
    assert native.wants(decode, torch.bfloat16) and native.wants(single, torch.bfloat16)
    assert native.wants(decode, torch.float32)
    assert not native.wants(single, torch.float32)  # one adapter in fp32: MKL's GEMM is as fast (kernels.tuning)
    assert not native.wants(prefill, torch.bfloat16) and not native.wants(prefill, torch.float32)  # torch's GEMMs
    assert not native.wants(decode, torch.float16)  # no fp16 loops
    torch.set_num_threads(tuning.CPU_NATIVE_MAX_THREADS_HALF + 1)  # the loops use one thread: torch's matmuls serve
    assert not native.wants(decode, torch.bfloat16) and not native.wants(decode, torch.float32)
    torch.set_num_threads(2)
    assert native.wants(decode, torch.bfloat16) and not native.wants(decode, torch.float32)
    torch.set_num_threads(1)
    monkeypatch.setenv(tuning.CPU_NATIVE_ENV, "0")
    assert not native.wants(decode, torch.bfloat16)
    monkeypatch.setenv(tuning.CPU_NATIVE_ENV, "1")
    assert native.wants(prefill, torch.bfloat16) and native.wants(single, torch.float32)


def test_without_a_compiler_the_torch_paths_serve(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No C++ compiler: one warning, and the ops still give the right answer on torch's paths; asking for the
    loops explicitly (MLORA_CPU_NATIVE=1) is then a clear error instead of a silent fallback."""
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native._load.cache_clear()
    try:
        monkeypatch.delenv(tuning.CPU_NATIVE_ENV, raising=False)
        slots = [i // 2 for i in range(12)]
        x, a, b, scales, out, ts = _inputs(slots, S=6, R=8, K=32, N=24, ranks=None)
        x, a, b, out = x.to(torch.bfloat16), a.to(torch.bfloat16), b.to(torch.bfloat16), out.to(torch.bfloat16)
        meta = LoraBatchMeta.from_token_lora_slots(slots)
        with caplog.at_level(logging.WARNING, logger="kernels.native"):
            assert not native.wants(meta, torch.bfloat16)
            h = lora_shrink(x, a, ts, scales, meta=meta, backend="cpu")
        assert any("no C++ compiler" in r.getMessage() for r in caplog.records)
        assert_close(h, naive_shrink(x, a, ts, scales), "bf16", "torch shrink without the loops")
        monkeypatch.setenv(tuning.CPU_NATIVE_ENV, "1")
        with pytest.raises(native.NativeBuildError, match="MLORA_CPU_NATIVE=1"):
            native.wants(meta, torch.bfloat16)
    finally:
        native._load.cache_clear()


def test_the_build_is_cached_per_cpu_and_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One build per source, compiler and CPU: a second load reuses the file; another CPU's (or a changed
    source's) library gets another name, so a cache shared between machines never loads a foreign build."""
    monkeypatch.setenv("MLORA_CACHE_DIR", str(tmp_path))
    cxx = native._compiler()
    assert cxx is not None
    first = native._build(cxx)
    assert first.parent == tmp_path / "native" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native._build(cxx) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not list(first.parent.glob(".build-*"))  # no temporary left behind
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another cpu")
    assert native._build(cxx) != first


def test_native_ab_benchmark_times_both_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m benchmarks.native_ab` (the measurement behind kernels.tuning's native choices) runs both modes
    and leaves the process's MLORA_CPU_NATIVE as it found it."""
    from benchmarks import native_ab

    monkeypatch.setenv(tuning.CPU_NATIVE_ENV, "auto")
    rows = native_ab.main(["--preset", "tiny", "--rounds", "2", "--steps", "1", "--batch", "4", "--cases", "2:8:bfloat16"])
    assert [r["case"] for r in rows] == ["bfloat16 N=2 r8"]
    for mode in native_ab.MODES:
        assert rows[0][mode]["mixed_ms"] > 0 and rows[0][mode]["mixed_lora_ms"] > 0 and rows[0][mode]["ratio"] > 0
    assert rows[0]["lora_native_over_torch"] > 0
    assert os.environ[tuning.CPU_NATIVE_ENV] == "auto"
