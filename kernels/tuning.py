"""CPU tuning: every machine-dependent constant and choice of the CPU paths, one line of reason each.

The measurements behind these numbers are in `benchmarks/README.md`, with the commands that
reproduce them on another machine. What depends on the CPU's instruction set (bf16 matrix units:
AMX or not) is decided here from a probe, `cpu_has_amx()`, not from constants tuned on one machine.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- what the CPU has
_CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def cpu_has_amx() -> bool:
    """True when the CPU has AMX bf16 tiles (Sapphire Rapids and later), where bf16 GEMMs beat fp32.

    Read from the kernel's cpuinfo flags (`amx_bf16`), else from torch's own probe; False when neither says.
    `MLORA_CPU_AMX=0|1` overrides the probe (the test suite pins it, so `auto` means fp32 on every machine).
    """
    forced = os.environ.get("MLORA_CPU_AMX", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        for line in _CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return "amx_bf16" in line.split(":", 1)[1].split()
    except OSError:
        pass
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.3; not on every build
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - a probe that fails means "not known to have AMX"
        return False


def cpu_auto_dtype() -> torch.dtype:
    """The weights dtype `auto` picks on CPU: the faster of fp32 and bf16 for this CPU.

    With AMX, bf16 GEMMs run on the tile units (about 2x fp32's throughput, half the bytes);
    without it (AVX-512 bf16 or less) a bf16 GEMM peaks at about half an fp32 one (94 vs 179
    GFLOP/s on the 2-core EPYC of benchmarks/README.md), so fp32 is both faster and exact there.
    """
    return torch.bfloat16 if cpu_has_amx() else torch.float32


# ----------------------------------------------------------------------------- base linears (engine.model)
# fp32 batches of these many rows (a decode batch) run as W @ x.T: MKL streams the [out, in] weight
# in its own layout instead of packing it for x @ W.T; 1-7 rows and prefill-sized batches lose.
SMALL_BATCH_ROWS = range(8, 49)
# bf16/fp16 (oneDNN): W @ x.T wins from 2 rows up to 64.
SMALL_BATCH_ROWS_HALF = range(2, 65)


def half_one_row_mv() -> bool:
    """A single bf16/fp16 row as torch.mv (matrix-vector)? Only with AMX: there mv streams the weights
    fastest (16.2 vs 21.5 ms per `small` step); without AMX mv streams them at ~4.5 GB/s against ~8.4 for
    F.linear (bf16 batch-1 decode 16.6 -> 29.9 tok/s by using F.linear)."""
    return cpu_has_amx()


def small_batch_path(rows: int, half: bool) -> str:
    """How `engine.model.small_batch_linear` runs x @ W.T for `rows` rows on CPU:
    "mv" (torch.mv of the one row), "wxt" (W @ x.T, then transposed) or "linear" (F.linear)."""
    if half:
        if rows == 1:
            return "mv" if half_one_row_mv() else "linear"
        return "wxt" if rows in SMALL_BATCH_ROWS_HALF else "linear"
    return "wxt" if rows in SMALL_BATCH_ROWS else "linear"


# oneDNN-prepacked base weights (engine.model.prepack_cpu_linears): packed once at load into oneDNN's
# blocked layout, so no matmul re-packs (or streams unpacked) the weight per call.
PREPACK_ENV = "MLORA_CPU_PREPACK"  # "auto" (default) | "1" (every weight, whatever its size) | "0" (off)
# The row count oneDNN tunes the packed layout for (a decode batch); any row count still runs.
PREPACK_BATCH_HINT = 32
# auto packs weights of at least this many elements (512 x 512): a packed matmul has ~14 us of fixed
# per-call cost on top of F.linear's ~4 us, which only weights of this size amortise. `small` (hidden 768):
# packed wins at every row count 1..256, fp32 1.06-1.9x, bf16 1.1-1.5x (benchmarks/cpu_choices.py linear);
# `tiny` (hidden 64): packed decode is 0.75x.
PREPACK_MIN_NUMEL = 512 * 512


def mkldnn_prepack_available(dtype: torch.dtype) -> bool:
    """Can torch run a linear on an oneDNN-prepacked weight of this dtype here (x86 CPU with mkldnn)?
    fp16 is left out: without AMX-FP16 oneDNN has no fast fp16 GEMM."""
    return (torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
            and dtype in (torch.float32, torch.bfloat16))


def cpu_prepack(dtype: torch.dtype, numel: int) -> bool:
    """Pack a CPU base linear's W (numel elements) for oneDNN at load? auto: wherever torch can and the
    weight is big enough to amortise the packed call's fixed cost, except fp32 on a CPU with AMX.
    bf16: packed wins with or without AMX (no AMX: 1.11x at batch 32, 1.92x over torch.mv at batch 1;
    AMX: 1.02x at 32, ties torch.mv at 1). fp32: packed wins without AMX (the EPYC: 1.21x at batch 32)
    but loses on the AMX Xeon, where MKL's own fp32 GEMM is faster at decode sizes (0.85x at batch 1,
    0.88x at 32); AMX stands in for "a recent Intel core" here (benchmarks/README.md, cpu_choices)."""
    mode = os.environ.get(PREPACK_ENV, "auto").strip().lower()
    if mode in ("0", "off", "false", "no") or not mkldnn_prepack_available(dtype):
        return False
    if mode in ("1", "on", "true", "yes"):
        return True
    return numel >= PREPACK_MIN_NUMEL and not (dtype == torch.float32 and cpu_has_amx())


# ----------------------------------------------------------------------------- LoRA layout (kernels.meta)
# Mean rows per adapter segment at or below which "gather" (BGMV) beats "segment" (SGMV) (Triton).
GATHER_MAX_ROWS_PER_SEGMENT = 2
# Loop over row runs (zero-copy slices) up to this many runs per distinct slot; past it one gather +
# one scatter of the rows is cheaper than many tiny matmuls.
CPU_MAX_RUNS_PER_SLOT = 2
# "bmm" (one padded batched matmul over the segments) from this many segments on: below it the
# per-matmul overhead it saves is small.
CPU_BMM_MIN_SEGMENTS = 3
# fp32: "bmm" while segments average at most this many rows; longer ones amortise the per-matmul
# overhead and the padded row copies cost more than they save.
CPU_BMM_MAX_MEAN_ROWS = 4
# bf16/fp16: a 16-bit CPU matmul costs ~2x an fp32 one in fixed (oneDNN dispatch) overhead, so "bmm"
# pays up to this many rows per segment.
CPU_BMM_MAX_MEAN_ROWS_HALF = 32
# "bmm" only while the padded rows (segments x longest segment) stay within this factor of the real rows.
CPU_BMM_MAX_PAD_FACTOR = 1.5
# bf16/fp16 unequal segments up to this many rows on average take "dense" (one matmul over slots lo..hi);
# past it the span x useful FLOPs cost more than the per-segment overhead saved.
CPU_DENSE_MAX_MEAN_ROWS_HALF = 128


# ----------------------------------------------------------------------------- LoRA ops (kernels.cpu)
# Above this many bytes a whole-batch row gather spills L2, and per-segment gathers (each chunk used while
# still in cache) win.
CHUNK_BYTES = 512 << 10
# "dense" does span x the useful FLOPs (one matmul over slots lo..hi), so only while span * R stays small
# next to the base layer's width.
DENSE_MAX_COLS = 256
# fp32 "bmm" shrinks of segments up to this many rows may run as A @ x.T instead of x @ A.T, when
# `cpu_shrink_ax()` finds that form faster on this CPU.
CPU_SHRINK_AX_MAX_ROWS = 8
SHRINK_AX_ENV = "MLORA_CPU_SHRINK_AX"  # "auto" (default: measured) | "1" | "0"


@functools.cache
def cpu_shrink_ax() -> bool:
    """Run fp32 "bmm" shrinks of short segments as A @ x.T? Which form is faster depends on the CPU's BLAS,
    with a 2-3x swing either way (cold weights, hidden 768, rank 16, 16 adapters x 2 rows; us, x @ A.T vs
    A @ x.T): the AMD EPYC 84 vs 51 (1 x 32: 131 vs 64), the AMX Xeon 40 vs 129 (1 x 32: 162 vs 377). So it
    is measured once per process (~16 ms, the first time a shrink asks), not fixed; `MLORA_CPU_SHRINK_AX=0|1`
    sets it."""
    forced = os.environ.get(SHRINK_AX_ENV, "auto").strip().lower()
    if forced in ("0", "1"):
        return forced == "1"
    gen = torch.Generator().manual_seed(0)
    stacks = [torch.randn(16, 16, 768, generator=gen) for _ in range(6)]  # 4.7 MB: mostly out of L2, as in a step
    xs = torch.randn(16, 2, 768, generator=gen)
    forms = {"xa": lambda a: torch.bmm(xs, a.transpose(1, 2)), "ax": lambda a: torch.bmm(a, xs.transpose(1, 2))}
    best = {name: float("inf") for name in forms}
    with torch.no_grad():
        for _ in range(5):  # rounds alternate the forms, so a busy moment hits both
            for name, form in forms.items():
                t = time.perf_counter()
                for a in stacks:
                    form(a)
                best[name] = min(best[name], time.perf_counter() - t)
    return best["ax"] < 0.9 * best["xa"]  # only a clear win changes the default form


def cpu_half_bmm_in_fp32(fp32_bytes: int) -> bool:
    """Run a bf16/fp16 "bmm" shrink/expand upcast to fp32 (rounded once back), when the G adapters' weights
    upcast to `fp32_bytes`? Only without AMX, where a batch of tiny 16-bit GEMMs is overhead-bound, and only
    while that fp32 copy stays in L2 (see CPU_HALF_FP32_MAX_BYTES)."""
    return not cpu_has_amx() and fp32_bytes <= CPU_HALF_FP32_MAX_BYTES


# Largest fp32 copy of a bf16 "bmm"'s weights worth making (no AMX): 16 x [2, 768] x [768, 16] shrink 84 ->
# 71 us (0.8 MB), 32 x 1 rows 146 -> 98 (1.5 MB), but 16 x [768, 2048] expand 179 -> 223 (2 MB) and rank 64 loses.
CPU_HALF_FP32_MAX_BYTES = 1536 << 10


# A single-adapter ("single") bf16/fp16 shrink or expand of at most this many rows runs as an fp32 GEMM on
# upcast copies (rounded once back): a 16-bit oneDNN GEMM has ~25 us of fixed cost whatever its size, an fp32
# one ~4 us. AMX Xeon, shrink + expand of one adapter (rank 16, hidden 768): 1 row 92 -> 37 us, 32 rows
# 102 -> 80 (768 -> 768) but 120 -> 150 (768 -> 2048) (benchmarks/README.md).
CPU_HALF_SINGLE_FP32_MAX_ROWS = 8


def cpu_half_single_in_fp32(rows: int) -> bool:
    """Run a one-adapter bf16/fp16 shrink/expand of `rows` rows as an fp32 GEMM (see CPU_HALF_SINGLE_FP32_MAX_ROWS)."""
    return rows <= CPU_HALF_SINGLE_FP32_MAX_ROWS


# "bmm" over adapters of several ranks: one batched matmul per rank class (instead of all at the step's
# largest rank) once padding to the largest rank would read this many times the real rows.
RANK_CLASS_MIN_WASTE = 1.25


# ----------------------------------------------------------------------------- decode attention (engine.attention)
# Decode rows gather their K/V and attend in chunks of about this many gathered bytes, so SDPA reads the
# copy while it is still in L2 (one whole-batch copy is several MB per layer and comes back from memory).
DECODE_CHUNK_BYTES = 2 << 20
# ... but never fewer rows than this per chunk: below it the per-op overhead of gather + SDPA shows.
DECODE_CHUNK_MIN_ROWS = 4


# ----------------------------------------------------------------------------- greedy sampling (engine.sampler)
# Greedy argmax on CPU in two passes: the max of each block of this many logits (amax vectorises; max with
# indices does not), then the first block holding the row's max, then the first max inside it. Batch 32 x
# 32000 fp32, 1 thread, AMX Xeon: 1.35 ms -> 0.29 ms (block 64: 0.37, 256: 0.32); 128 x 32000 5.4 -> 1.4 ms.
ARGMAX_BLOCK = 128


# ----------------------------------------------------------------------------- native LoRA loops (kernels.native)
CPU_NATIVE_ENV = "MLORA_CPU_NATIVE"  # "auto" (default) | "1" (every op the loops can run) | "0" (off)
# When the native loops beat torch's matmuls. In a decode step (batch 32, `small` preset, rank 16, AMX Xeon, 1
# thread; `python -m benchmarks.native_ab`, both in one process, rounds alternating), LoRA-op ms native/torch:
# bf16 mixed-16 0.45, one adapter (32 rows) 0.49-0.52; fp32 mixed-16 0.85, mixed-32 0.80, mixed-16 rank 64
# 0.94, but one adapter 0.87-1.09 (MKL's fp32 GEMM has a small fixed cost), so fp32 single-adapter steps stay on
# torch. Per op, hot weights (`python -m benchmarks.cpu_choices lora`, 768 -> 2048, us torch's best path vs
# native): bf16 1 x 32 rows 93 vs 85, 4 x 40 270 vs 295, 2 x 100 316 vs 361 (prefill stays on torch).
CPU_NATIVE_MAX_MEAN_ROWS_HALF = 32
CPU_NATIVE_MAX_MEAN_ROWS = 8
# The loops run on the calling thread only; torch's matmuls use every intra-op thread. With 2 torch threads
# (`native_ab --threads 2`, engine-thread CPU time, so torch's second thread is not even counted) bf16 still
# took 0.50-0.62 of torch's LoRA ms, fp32 1.06-1.20: so auto uses them for bf16 up to this many torch threads,
# for fp32 with one; more threads were not measured here (a 2-core machine), so torch serves there.
CPU_NATIVE_MAX_THREADS_HALF = 2
# auto uses the loops only where they were built with vectors of at least this many floats (AVX2 and up):
# an x86-64 baseline (SSE) build ran 16 x 2 rows 2.2x slower than the AVX2 one, which is itself 2x the AVX-512 one.
CPU_NATIVE_MIN_LANES = 8


def cpu_native_wants(rows: int, segments: int, dtype: torch.dtype, threads: int = 1) -> bool:
    """Run a step's LoRA ops (`rows` LoRA rows over `segments` adapters, torch running `threads` intra-op
    threads) in the native loops (auto mode)?"""
    if dtype == torch.float32:
        return threads == 1 and segments > 1 and rows <= CPU_NATIVE_MAX_MEAN_ROWS * segments
    return (dtype == torch.bfloat16 and threads <= CPU_NATIVE_MAX_THREADS_HALF
            and rows <= CPU_NATIVE_MAX_MEAN_ROWS_HALF * segments)
