"""Kernel test setup.

No TRITON_INTERPRET needed: `kernels._triton` runs the Triton kernels through the interpreter
for CPU tensors explicitly, which keeps working when another test package (peft, transformers)
imported triton first, in compiled mode. With CUDA present the same process also runs the
compiled `gpu` cases.
"""

from __future__ import annotations

import pytest
import torch

from kernels import tuning
from tests.kernels.cases import Case, full_grid, pairwise_grid

HAS_TRITON = True
try:  # the kernels package itself never needs triton; only the Triton-backend tests do
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - triton is in the test extra on Linux
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'mlora[triton]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def triton_params(*, slow: bool = False) -> list:
    """(case, device) params: interpreter on CPU for fp32/fp16, compiled on CUDA incl. bf16."""
    interp = full_grid(("fp32", "fp16")) if slow else pairwise_grid(("fp32", "fp16"))
    cuda = full_grid(("fp32", "fp16", "bf16")) if slow else pairwise_grid(("fp32", "fp16", "bf16"))
    extra = [pytest.mark.slow] if slow else []
    return ([pytest.param(c, "cpu", id=f"interp-{c.id}", marks=[needs_triton, *extra]) for c in interp]
            + [pytest.param(c, "cuda", id=f"cuda-{c.id}", marks=[pytest.mark.gpu, needs_cuda, needs_triton, *extra])
               for c in cuda])


def torch_params(*, slow: bool = False) -> list:
    """Cases for the torch paths (reference and fast CPU path), bf16 included (no interpreter)."""
    cases: list[Case] = full_grid(("fp32", "fp16", "bf16")) if slow else pairwise_grid(("fp32", "fp16", "bf16"))
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if slow else []) for c in cases]


@pytest.fixture
def force_bmm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layout with a slot != -1 and more than one slot takes the padded bmm path."""
    monkeypatch.setattr(tuning, "CPU_BMM_MIN_SEGMENTS", 2)
    monkeypatch.setattr(tuning, "CPU_BMM_MAX_MEAN_ROWS", 1 << 30)
    monkeypatch.setattr(tuning, "CPU_BMM_MAX_MEAN_ROWS_HALF", 1 << 30)
    monkeypatch.setattr(tuning, "CPU_DENSE_MAX_MEAN_ROWS_HALF", 0)
    monkeypatch.setattr(tuning, "CPU_BMM_MAX_PAD_FACTOR", float("inf"))


@pytest.fixture(params=["torch", "native"])
def cpu_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a CPU-path test twice: on torch's matmul paths (MLORA_CPU_NATIVE=0) and on the native loops of
    kernels.native for every op they can run (=1: fp32 and bf16, any segment length)."""
    from kernels import native

    if request.param == "native" and native._compiler() is None:
        pytest.skip("no C++ compiler here: the native loops cannot be built (the torch paths serve)")
    monkeypatch.setenv(tuning.CPU_NATIVE_ENV, "0" if request.param == "torch" else "1")
    return request.param
