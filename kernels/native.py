"""Native CPU LoRA loops for short adapter segments (decode): `kernels/csrc/lora_cpu.cpp`, built once per machine.

A decode step runs 168 tiny LoRA matmuls (12 layers x 7 modules x shrink + expand) and every torch
CPU matmul has ~15-30 us of fixed cost (oneDNN/MKL dispatch, packing) whatever its size, more than
reading the adapter rows takes. The C++ loops read each segment's adapter rows once for up to 4 rows at
a time, accumulate in fp32 and round once, with one ctypes call per fused projection (q/k/v together,
its arguments in one int64 block). They serve fp32 and
bf16 when segments are short and torch runs few intra-op threads (`kernels.tuning.cpu_native_wants`: the
loops use the calling thread only); long segments (prefill) stay on torch's GEMMs, compute-bound and faster.

Built with the machine's C++ compiler (`$CXX`, else g++ / c++ / clang++) at `-O3 -march=native` into
`$MLORA_CACHE_DIR/native` (default `~/.cache/mlora/native`), named by a hash of the source, the flags,
the compiler and this CPU's model and flags, so a cache shared between machines never loads a library
built for another CPU; the build (~1.5 s) happens once, at the first op that wants it, and is written
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
from array import array
from collections.abc import Sequence
from pathlib import Path
from weakref import WeakKeyDictionary

import torch

from kernels import tuning
from kernels.meta import LoraBatchMeta

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.cpp"
ABI_VERSION = 4
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
def _load() -> ctypes.CDLL | NativeBuildError:
    """Build (once per machine) and load the library, once per process; the error instead when that fails."""
    try:
        cxx = _compiler()
        if cxx is None:
            raise NativeBuildError("no C++ compiler found ($CXX, g++, c++, clang++)")
        lib = ctypes.CDLL(str(_build(cxx)))
        if lib.mlora_abi_version() != ABI_VERSION:
            raise NativeBuildError("stale native library (ABI version)")
    except (OSError, subprocess.SubprocessError, NativeBuildError) as e:
        log.warning("native CPU LoRA loops unavailable, using torch's matmuls: %s", e)
        return e if isinstance(e, NativeBuildError) else NativeBuildError(str(e))
    lib.mlora_shrink_n.argtypes = lib.mlora_expand_n.argtypes = [ctypes.c_void_p, ctypes.c_int64]  # int64 blocks, count
    lib.mlora_shrink_n.restype = lib.mlora_expand_n.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded native library, or None where it cannot be built (no compiler, a failed build: one warning);
    with MLORA_CPU_NATIVE=1 that is an error instead."""
    lib = _load()
    if isinstance(lib, NativeBuildError):
        if _mode() == "1":
            raise NativeBuildError(f"{tuning.CPU_NATIVE_ENV}=1 but the native LoRA loops are unavailable: {lib}")
        return None
    return lib


def wants(meta: LoraBatchMeta, dtype: torch.dtype) -> bool:
    """Should this step's CPU LoRA ops run natively (the layout and dtype allow, and the loops are built)?"""
    mode = _mode()
    if mode == "0" or dtype not in _DTYPES or not meta.distinct_slots:
        return False
    rows = meta.sorted_rows
    if rows.device.type != "cpu" or rows.dtype != torch.int64 or not rows.is_contiguous():
        return False
    if mode == "auto" and not tuning.cpu_native_wants(meta.num_lora_rows, len(meta.distinct_slots), dtype,
                                                      torch.get_num_threads()):
        return False
    lib = library()
    return lib is not None and (mode == "1" or lanes() >= tuning.CPU_NATIVE_MIN_LANES)


def lanes() -> int:
    """Float lanes per vector of the built loops (16 with AVX-512, 8 with AVX2; 0 when not built)."""
    lib = _load()
    return 0 if isinstance(lib, NativeBuildError) else int(lib.mlora_vector_lanes())


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


def can_shrink(x: torch.Tensor, lora_a: torch.Tensor, scales: torch.Tensor) -> bool:
    """The shapes, dtypes and strides the native shrink takes (else the torch paths serve)."""
    return (x.is_cpu and lora_a.is_cpu and x.dtype in _DTYPES and lora_a.dtype == x.dtype and scales.dim() == 1
            and scales.dtype == torch.float32 and x.stride(1) == 1 and lora_a.stride(2) == 1)


def can_expand(h: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor) -> bool:
    """As `can_shrink`; B must be rank-major ([S, N, R] with N of stride 1, as engine.lora.slots keeps it on CPU)."""
    return (out.is_cpu and lora_b.is_cpu and out.dtype in _DTYPES and h.dtype == out.dtype and lora_b.dtype == out.dtype
            and lora_b.stride(1) == 1 and h.stride(1) == 1 and out.stride(1) == 1)


def shrink(x: torch.Tensor, slices: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[int] | None]],
           meta: LoraBatchMeta) -> list[torch.Tensor]:
    """For each slice (lora_a [S, R, K], scales [S], slot_ranks): h [T, R] in x.dtype with
    h[t] = scales[s] * x[t] @ lora_a[s].T (columns past a slot's rank and -1 rows 0). One native call for all."""
    T, K, dt = x.shape[0], x.shape[1], _DTYPES[x.dtype]
    new = torch.zeros if meta.num_no_lora else torch.empty
    rows, hs, blocks = meta.sorted_rows.data_ptr(), [], []
    for a, scales, ranks in slices:
        R = a.shape[1]
        h = new(T, R, dtype=x.dtype)
        seg = _segments(meta, ranks, R)
        a_ss, a_rs, _ = a.stride()
        blocks += (dt, x.data_ptr(), x.stride(0), rows, seg.data_ptr(), seg.shape[0], a.data_ptr(), a_ss, a_rs, K,
                   scales.data_ptr(), scales.stride(0), h.data_ptr(), R, R)
        hs.append(h)
    args = array("q", blocks)
    if library().mlora_shrink_n(args.buffer_info()[0], len(slices)) != 0:  # type: ignore[union-attr]
        raise RuntimeError("native shrink: unknown dtype code")
    return hs


def expand(hs: Sequence[torch.Tensor], slices: Sequence[tuple[torch.Tensor, int, Sequence[int] | None]],
           out: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """For each h and slice (lora_b [S, N, R], out_offset, slot_ranks): out[t, off:off+N] += h[t] @ lora_b[s].T
    for rows with s != -1, in place (fp32 sum, rounded once). One native call for all."""
    dt, rows, blocks = _DTYPES[out.dtype], meta.sorted_rows.data_ptr(), []
    base, o_rs, es = out.data_ptr(), out.stride(0), out.element_size()
    for h, (b, off, ranks) in zip(hs, slices):
        _, N, R = b.shape
        seg = _segments(meta, ranks, R)
        b_ss, _, b_js = b.stride()
        blocks += (dt, h.data_ptr(), h.stride(0), rows, seg.data_ptr(), seg.shape[0], b.data_ptr(), b_ss, b_js, N,
                   base + off * es, o_rs)
    args = array("q", blocks)
    if library().mlora_expand_n(args.buffer_info()[0], len(hs)) != 0:  # type: ignore[union-attr]
        raise RuntimeError("native expand: unknown dtype code")
    return out
