"""Loads triton, and only when a Triton launch is asked for (with the kernel modules `kernels._shrink_kernels`
and `kernels._expand_kernels`, which import `triton.language` and are imported only from here on).

Kernels are wrapped per mode: compiled (`JITFunction`) for CUDA tensors, interpreted
(`InterpretedFunction`, numpy on the host) for CPU tensors. Choosing the wrapper explicitly,
instead of through `TRITON_INTERPRET` read at `import triton` time, keeps the interpreter usable
in a process where something else (peft, transformers) already imported triton. Kernels
therefore avoid triton's `@jit` standard-library helpers (`tl.sum`, `tl.zeros`, `tl.cdiv`), which
are compiled-mode objects in such a process; they use `tl.full` and
`tl.reduce(v, axis, tl.standard._sum_combine)` (what `tl.sum` does; the interpreter maps that
combine function to a numpy sum; see kernels/_shrink_kernels.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from kernels.meta import KernelError


@functools.cache
def _load() -> tuple[ModuleType, ModuleType] | None:
    try:
        import triton
        import triton.language as tl
    except Exception:  # ImportError, or a broken install (missing libcuda bits, ...)
        return None
    return triton, tl


def available() -> bool:
    """True when triton can be imported here."""
    return _load() is not None


def load() -> tuple[ModuleType, ModuleType]:
    """(triton, triton.language), or a KernelError that says how to get them."""
    mods = _load()
    if mods is None:
        raise KernelError(
            "backend='triton' needs the triton package, which is not installed",
            hint="pip install 'mlora[triton]' (Linux), or use backend='auto'/'torch'",
        )
    return mods


def interpret_for(device: torch.device) -> bool:
    """Run interpreted for non-CUDA tensors, or everywhere when TRITON_INTERPRET=1 is set."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def jit(fn: Callable[..., Any], interpret: bool) -> Any:
    """Wrap a kernel function for launching in the given mode (cached per function and mode)."""
    return _jit_cached(fn, interpret)


@functools.cache
def _jit_cached(fn: Callable[..., Any], interpret: bool) -> Any:
    load()
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
