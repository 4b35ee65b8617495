"""Native CPU LoRA loops for short adapter segments (decode): `kernels/csrc/lora_cpu.cpp`, built once per machine.

A decode step runs 168 tiny LoRA matmuls (12 layers x 7 modules x shrink + expand) and every torch
CPU matmul has ~15-30 us of fixed cost (oneDNN/MKL dispatch, packing) whatever its size, more than
reading the adapter rows takes. The C++ loops read each segment's adapter rows once for up to 4 rows at
a time, accumulate in fp32 and round once, with one ctypes call per op (~2 us). They serve fp32 and
bf16 when segments are short (`kernels.tuning.cpu_native_wants`); long segments (prefill) stay on torch's
GEMMs, which are compute-bound there and faster.

Built with the machine's C++ compiler (`$CXX`, else g++ / c++ / clang++) at `-O3 -march=native` into
`$MLORA_CACHE_DIR/native` (default `~/.cache/mlora/native`), named by a hash of the source, the flags,
the compiler and this CPU's model and flags, so a cache shared between machines never loads a library
built for another CPU; the build (~1 s) happens once, at the first op that wants it, and is written
atomically (concurrent processes are safe). No compiler, or a failed build: the torch paths serve,
with one warning. `MLORA_CPU_NATIVE=0` turns the loops off, `=1` uses them for every op they can run
(tests), `auto` (default) where `cpu_native_wants` says.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from weakref import WeakKeyDictionary

import torch

from kernels import tuning
from kernels.meta import LoraBatchMeta

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.cpp"
ABI_VERSION = 1
_FLAGS = ("-O3", "-march=native", "-Wno-psabi", "-std=c++17", "-shared", "-fPIC")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class NativeBuildError(RuntimeError):
    """The native loops were asked for (MLORA_CPU_NATIVE=1) but cannot be built or loaded here."""


def _cache_dir() -> Path:
    root = os.environ.get("MLORA_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                             os.path.expanduser("~/.cache"), "mlora")
    return Path(root) / "native"


def _cpu_identity() -> str:
    """This CPU's model and instruction-set flags (what -march=native compiles for)."""
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    seen = {ln.split(":", 1)[0].strip(): ln for ln in lines if ln.split(":", 1)[0].strip() in wanted}
    return "\n".join([platform.machine(), platform.processor(), *sorted(seen.values())])


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _build(cxx: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(_FLAGS).encode(), cxx.encode(), _cpu_identity().encode(),
                                     str(ABI_VERSION).encode()])).hexdigest()[:20]
    out = _cache_dir() / f"lora_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cxx, *_FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise NativeBuildError(f"{cxx} failed: {res.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: another process sees the whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _mode() -> str:
    mode = os.environ.get(tuning.CPU_NATIVE_ENV, "auto").strip().lower()
    return mode if mode in ("0", "1") else "auto"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded native library, or None (turned off, no compiler, or the build failed: one warning)."""
    mode = _mode()
    if mode == "0":
        return None
    try:
        cxx = _compiler()
        if cxx is None:
            raise NativeBuildError("no C++ compiler found ($CXX, g++, c++, clang++)")
        lib = ctypes.CDLL(str(_build(cxx)))
        if lib.mlora_abi_version() != ABI_VERSION:
            raise NativeBuildError("stale native library (ABI version)")
    except (OSError, subprocess.SubprocessError, NativeBuildError) as e:
        if mode == "1":
            raise NativeBuildError(f"{tuning.CPU_NATIVE_ENV}=1 but the native LoRA loops are unavailable: {e}") from e
        log.warning("native CPU LoRA loops unavailable, using torch's matmuls: %s", e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mlora_shrink.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64]
    lib.mlora_expand.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, ptr, i64]
    lib.mlora_shrink.restype = lib.mlora_expand.restype = ctypes.c_int
    return lib


def wants(meta: LoraBatchMeta, dtype: torch.dtype) -> bool:
    """Should this step's CPU LoRA ops run natively (the layout and dtype allow, and the loops are built)?"""
    mode = _mode()
    if mode == "0" or dtype not in _DTYPES or not meta.distinct_slots:
        return False
    rows = meta.sorted_rows
    if rows.device.type != "cpu" or rows.dtype != torch.int64 or not rows.is_contiguous():
        return False
    if mode == "auto" and not tuning.cpu_native_wants(meta.num_lora_rows, len(meta.distinct_slots), dtype):
        return False
    lib = library()
    return lib is not None and (mode == "1" or lanes() >= tuning.CPU_NATIVE_MIN_LANES)


@functools.cache
def lanes() -> int:
    """Float lanes per vector of the built loops (16 with AVX-512, 8 with AVX2; 0 when not built)."""
    lib = library()
    return int(lib.mlora_vector_lanes()) if lib is not None else 0


_SEGS: WeakKeyDictionary[LoraBatchMeta, dict[tuple[int, int], tuple[Sequence[int] | None, torch.Tensor]]] = WeakKeyDictionary()


def _segments(meta: LoraBatchMeta, slot_ranks: Sequence[int] | None, R: int) -> torch.Tensor:
    """[G, 4] int64 (start, end, slot, rank) into meta.sorted_rows; built once per step and rank table."""
    per_meta = _SEGS.setdefault(meta, {})
    hit = per_meta.get((id(slot_ranks), R))
    if hit is not None and hit[0] is slot_ranks:
        return hit[1]
    rank = (lambda s: R) if slot_ranks is None else (lambda s: max(1, min(R, slot_ranks[s])))  # noqa: E731
    seg = torch.tensor([(a, b, s, rank(s)) for a, b, s in meta.segments], dtype=torch.int64)
    per_meta[(id(slot_ranks), R)] = (slot_ranks, seg)
    return seg


def _inner_contiguous(*ts: torch.Tensor) -> bool:
    return all(t.stride(-1) == 1 or t.shape[-1] <= 1 for t in ts)


def can_shrink(x: torch.Tensor, lora_a: torch.Tensor, scales: torch.Tensor) -> bool:
    """The shapes, dtypes and strides the native shrink takes (else the torch paths serve)."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and lora_a.dtype == x.dtype and scales.dim() == 1
            and scales.dtype == torch.float32 and lora_a.device.type == "cpu" and _inner_contiguous(x, lora_a))


def can_expand(h: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor) -> bool:
    """As `can_shrink`; B must be rank-major ([S, N, R] with N of stride 1, as engine.lora.slots keeps it on CPU)."""
    return (out.device.type == "cpu" and out.dtype in _DTYPES and h.dtype == out.dtype and lora_b.dtype == out.dtype
            and lora_b.device.type == "cpu" and (lora_b.stride(1) == 1 or lora_b.shape[1] <= 1) and _inner_contiguous(h, out))


def shrink(x: torch.Tensor, lora_a: torch.Tensor, scales: torch.Tensor, meta: LoraBatchMeta,
           slot_ranks: Sequence[int] | None) -> torch.Tensor:
    """h [T, R] in x.dtype: h[t] = scales[s] * x[t] @ lora_a[s].T (rows past a slot's rank and -1 rows 0)."""
    lib = library()
    assert lib is not None
    T, R = x.shape[0], lora_a.shape[1]
    h = (torch.zeros if meta.num_no_lora else torch.empty)(T, R, dtype=x.dtype)
    seg = _segments(meta, slot_ranks, R)
    rows = meta.sorted_rows
    rc = lib.mlora_shrink(_DTYPES[x.dtype], x.data_ptr(), x.stride(0), rows.data_ptr(), seg.data_ptr(), seg.shape[0],
                          lora_a.data_ptr(), lora_a.stride(0), lora_a.stride(1), x.shape[1], scales.data_ptr(),
                          scales.stride(0), h.data_ptr(), h.stride(0), R)
    assert rc == 0
    return h


def expand(h: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, meta: LoraBatchMeta, out_offset: int,
           slot_ranks: Sequence[int] | None) -> torch.Tensor:
    """out[t, off:off+N] += h[t] @ lora_b[s].T for rows with s != -1, in place (fp32 sum, rounded once)."""
    lib = library()
    assert lib is not None
    N, R = lora_b.shape[1], lora_b.shape[2]
    view = out[:, out_offset:out_offset + N]
    seg = _segments(meta, slot_ranks, R)
    rows = meta.sorted_rows
    rc = lib.mlora_expand(_DTYPES[out.dtype], h.data_ptr(), h.stride(0), rows.data_ptr(), seg.data_ptr(), seg.shape[0],
                          lora_b.data_ptr(), lora_b.stride(0), lora_b.stride(2), N, view.data_ptr(), view.stride(0))
    assert rc == 0
    return out
