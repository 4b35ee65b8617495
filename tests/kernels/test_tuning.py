"""Machine-aware CPU choices (kernels.tuning): `auto` dtype and the one-row matmul follow the CPU's AMX flag."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model import small_batch_linear
from engine.runner import resolve_dtype
from kernels import tuning


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch):
    """Set what the CPU probe answers: cpu(amx=True) for an AMX CPU, cpu(amx=False) for one without."""

    def set_(amx: bool) -> None:
        monkeypatch.setattr(tuning, "cpu_has_amx", lambda: amx)

    return set_


@pytest.mark.parametrize("flags, amx", [("fpu avx512f avx512_bf16 amx_bf16 amx_tile", True),
                                        ("fpu avx512f avx512_bf16", False)], ids=["amx", "no-amx"])
def test_probe_reads_the_cpuinfo_flags(tmp_path, monkeypatch, flags, amx):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
    monkeypatch.setattr(tuning, "_CPUINFO", info)
    monkeypatch.delenv("MLORA_CPU_AMX", raising=False)  # tests/conftest.py pins it; here the flags decide
    tuning.cpu_has_amx.cache_clear()
    try:
        assert tuning.cpu_has_amx() is amx
    finally:
        tuning.cpu_has_amx.cache_clear()


@pytest.mark.parametrize("amx, dtype", [(True, torch.bfloat16), (False, torch.float32)], ids=["amx", "no-amx"])
def test_auto_dtype_is_the_faster_one_for_the_cpu(cpu, amx, dtype):
    cpu(amx)
    assert tuning.cpu_auto_dtype() == dtype
    assert resolve_dtype("auto", None, torch.device("cpu")) == dtype
    assert resolve_dtype("float32", None, torch.device("cpu")) == torch.float32  # an explicit dtype is kept


@pytest.mark.parametrize("amx, path", [(True, "mv"), (False, "linear")], ids=["amx", "no-amx"])
def test_one_half_row_takes_mv_only_with_amx(cpu, amx, path):
    cpu(amx)
    assert tuning.small_batch_path(1, half=True) == path
    assert tuning.small_batch_path(1, half=False) == "linear"  # fp32: mv and F.linear are one speed
    assert tuning.small_batch_path(16, half=True) == "wxt"


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "no-amx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 8, 48, 65])
def test_small_batch_linear_matches_f_linear(cpu, amx, dtype, rows):
    cpu(amx)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    y = small_batch_linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double())
    assert y.shape == (rows, 96) and y.dtype == dtype and y.is_contiguous()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * 8)
    if tuning.small_batch_path(rows, dtype != torch.float32) == "linear":
        assert torch.equal(y, F.linear(x, w, b))  # the F.linear path is F.linear, bit for bit


@pytest.mark.parametrize("value, amx", [("1", True), ("0", False)])
def test_the_environment_overrides_the_probe(monkeypatch, value, amx):
    monkeypatch.setenv("MLORA_CPU_AMX", value)
    tuning.cpu_has_amx.cache_clear()
    try:
        assert tuning.cpu_has_amx() is amx
        assert tuning.cpu_auto_dtype() == (torch.bfloat16 if amx else torch.float32)
    finally:
        tuning.cpu_has_amx.cache_clear()


@pytest.mark.parametrize("env, want", [("1", True), ("0", False)])
def test_shrink_form_can_be_set(monkeypatch, env, want):
    monkeypatch.setenv(tuning.SHRINK_AX_ENV, env)
    tuning.cpu_shrink_ax.cache_clear()
    try:
        assert tuning.cpu_shrink_ax() is want
    finally:
        tuning.cpu_shrink_ax.cache_clear()


def test_shrink_form_is_measured_once(monkeypatch):
    """auto: a short measurement decides (a bool), cached for the process."""
    monkeypatch.delenv(tuning.SHRINK_AX_ENV, raising=False)
    tuning.cpu_shrink_ax.cache_clear()
    try:
        first = tuning.cpu_shrink_ax()
        assert isinstance(first, bool)
        assert tuning.cpu_shrink_ax.cache_info().currsize == 1 and tuning.cpu_shrink_ax() is first
    finally:
        tuning.cpu_shrink_ax.cache_clear()
