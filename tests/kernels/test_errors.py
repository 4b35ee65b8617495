"""Bad input gives one clear KernelError (an MloraError) before anything launches; no triton needed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.errors import MloraError
from kernels import KernelError, LoraBatchMeta, lora_expand, lora_shrink


def _shrink_args(**over: object) -> dict:
    args = {"x": torch.randn(4, 16), "lora_a": torch.randn(3, 8, 16), "token_lora_slots": torch.tensor([0, 1, -1, 2]),
            "scales": torch.ones(3)}
    args.update(over)
    return args


def _expand_args(**over: object) -> dict:
    args = {"h": torch.randn(4, 8), "lora_b": torch.randn(3, 32, 8), "token_lora_slots": torch.tensor([0, 1, -1, 2]),
            "out": torch.zeros(4, 40)}
    args.update(over)
    return args


@pytest.mark.parametrize(("over", "message"), [
    ({"x": torch.randn(4, 15)}, "x has 15 features but lora_a [3, 8, 16]"),
    ({"x": torch.randn(4, 16, 1)}, "x must be 2-D"),
    ({"lora_a": torch.randn(3, 8, 16).half()}, "lora_a dtype torch.float16 must match x dtype torch.float32"),
    ({"x": torch.randn(4, 16).long(), "lora_a": torch.randn(3, 8, 16).long()}, "x must be float32, float16 or bfloat16"),
    ({"token_lora_slots": torch.tensor([0, 1, 2])}, "token_lora_slots has 3 rows but the input has 4"),
    ({"token_lora_slots": torch.tensor([0.0, 1, 2, 0])}, "token_lora_slots must be an integer tensor"),
    ({"token_lora_slots": torch.tensor([0, 1, 3, 0])}, "token_lora_slots must be in [-1, 3)"),
    ({"token_lora_slots": torch.tensor([0, -2, 1, 0])}, "token_lora_slots must be >= -1"),
    ({"scales": torch.ones(2)}, "scales shape [2] must be [3] or [3, 8]"),
    ({"scales": torch.ones(3, 4)}, "scales shape [3, 4] must be [3] or [3, 8]"),
    ({"x": torch.randn(16, 4).T}, "x must have unit stride in its last dimension"),
    ({"x": torch.randn(4, 16, device="meta")}, "all tensors must be on one device"),
])
def test_shrink_rejects_bad_input(over: dict, message: str) -> None:
    with pytest.raises(KernelError) as err:
        lora_shrink(**_shrink_args(**over))
    assert message in str(err.value)
    assert isinstance(err.value, MloraError) and "\n" not in str(err.value)


@pytest.mark.parametrize(("over", "message"), [
    ({"h": torch.randn(4, 7)}, "h has rank 7 but lora_b [3, 32, 8]"),
    ({"out": torch.zeros(3, 40)}, "out has 3 rows but h has 4"),
    ({"out": torch.zeros(4, 40).half()}, "must share one dtype"),
    ({"out_offset": 9}, "out_offset 9 + lora_b out features 32 must fit out's 40 columns"),
    ({"out_offset": -1}, "out_offset -1"),
    ({"lora_b": torch.randn(3, 32, 16)[:, :, ::2]}, "lora_b must have unit stride"),  # neither [S, N, R] nor rank-major
])
def test_expand_rejects_bad_input(over: dict, message: str) -> None:
    with pytest.raises(KernelError, match=None) as err:
        lora_expand(**_expand_args(**over))
    assert message in str(err.value)


def test_unknown_backend_and_strategy_and_stale_meta() -> None:
    with pytest.raises(KernelError, match="unknown kernel backend 'cuda'"):
        lora_shrink(**_shrink_args(), backend="cuda")
    with pytest.raises(KernelError, match="unknown kernel strategy 'tiles'"):
        lora_shrink(**_shrink_args(), backend="triton", strategy="tiles")
    with pytest.raises(KernelError, match="meta was built for 2 rows but token_lora_slots has 4"):
        lora_shrink(**_shrink_args(), meta=LoraBatchMeta.from_token_lora_slots([0, 1]))


def test_strided_rows_are_accepted() -> None:
    """A row-strided view (e.g. a column slice of a fused output) is fine: only the last stride must be 1."""
    args = _shrink_args(x=torch.randn(4, 20)[:, 2:18])
    h = lora_shrink(**args, backend="cpu")
    torch.testing.assert_close(h, lora_shrink(**dict(args, x=args["x"].contiguous()), backend="torch"))


def test_kernels_import_and_run_without_triton() -> None:
    """`import kernels` never imports triton; without it, auto works and backend='triton' says what to install."""
    code = """
import sys
sys.modules["triton"] = None  # make `import triton` fail like a missing install
import torch, kernels
from kernels import lora_shrink, KernelError
x, a, s, sc = torch.randn(3, 8), torch.randn(2, 4, 8), torch.tensor([0, 1, -1]), torch.ones(2)
assert lora_shrink(x, a, s, sc).shape == (3, 4)
try:
    lora_shrink(x, a, s, sc, backend="triton")
except KernelError as e:
    print("ERR", e, "|", e.hint)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR backend='triton' needs the triton package" in res.stdout and "mlora[triton]" in res.stdout


def test_import_kernels_does_not_import_triton() -> None:
    code = "import sys, kernels; print('triton' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_unchecked_hot_path_gives_the_same_result_and_still_checks_without_meta() -> None:
    """check=False (the engine's per-step calls) computes exactly what the checked call does; without a
    meta the arguments are still validated, so a caller cannot skip both."""
    gen = torch.Generator().manual_seed(3)
    x, a, b = torch.randn(6, 32, generator=gen), torch.randn(3, 8, 32, generator=gen), torch.randn(3, 40, 8, generator=gen)
    ts, scales = torch.tensor([0, 2, -1, 1, 2, 0]), torch.rand(3, generator=gen)
    meta = LoraBatchMeta.from_token_lora_slots(ts)
    h = lora_shrink(x, a, ts, scales, meta=meta)
    assert torch.equal(lora_shrink(x, a, ts, scales, meta=meta, check=False), h)
    out = torch.randn(6, 48, generator=gen)
    want = lora_expand(h, b, ts, out.clone(), meta=meta, out_offset=4)
    assert torch.equal(lora_expand(h, b, ts, out.clone(), meta=meta, out_offset=4, check=False), want)
    with pytest.raises(KernelError, match="lora_a dtype"):
        lora_shrink(x, a.half(), ts, scales, check=False)
    with pytest.raises(KernelError, match="out_offset 9"):
        lora_expand(h, b, ts, out.clone(), out_offset=9, check=False)
