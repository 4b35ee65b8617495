"""Step metadata built into preallocated buffers (LoraMetaBuffers) equals the freshly allocated layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import LoraBatchMeta, LoraMetaBuffers, lora_expand, lora_shrink

LAYOUTS = {
    "mixed": [1, -1, 0, 1],
    "decode-16": [i % 16 for i in range(40)],
    "grouped": [0] * 4 + [1] * 4 + [2] * 4,
    "single": [3] * 7,
    "base": [-1] * 5,
    "split": [2] * 9 + [0, 1, 2, 3, -1, 1],
}


def _same(a: LoraBatchMeta, b: LoraBatchMeta) -> None:
    for f in dataclasses.fields(LoraBatchMeta):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), f.name
        elif f.name == "parts":
            assert len(x) == len(y)
            for (s0, e0, p0), (s1, e1, p1) in zip(x, y):
                assert (s0, e0) == (s1, e1)
                _same(p0, p1)
        else:
            assert x == y, f.name


def test_staged_layout_equals_fresh_one_step_after_step():
    bufs = LoraMetaBuffers("cpu", max_tokens=8, stage=True)  # grows past 8 rows on the 40-row step
    for name, slots in [*LAYOUTS.items(), *LAYOUTS.items()]:  # every layout twice: the buffers are reused
        split = 9 if name == "split" else None
        _same(bufs.build(slots, split=split), LoraBatchMeta.from_token_lora_slots(slots, split=split))


def test_cpu_buffers_stage_nothing_by_default():
    assert not LoraMetaBuffers("cpu", max_tokens=64).stage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_give_the_same_result_on_staged_meta(dtype):
    g = torch.Generator().manual_seed(0)
    slots = [i % 5 - 1 for i in range(23)]
    x, a = torch.randn(23, 32, generator=g).to(dtype), torch.randn(4, 8, 32, generator=g).to(dtype)
    b, scales = torch.randn(4, 24, 8, generator=g).to(dtype), torch.rand(4, generator=g)
    meta = LoraMetaBuffers("cpu", stage=True).build(slots)
    fresh = LoraBatchMeta.from_token_lora_slots(slots)
    ts = fresh.token_lora_slots
    h = lora_shrink(x, a, ts, scales, meta=meta)
    assert torch.equal(h, lora_shrink(x, a, ts, scales, meta=fresh))
    out = torch.zeros(23, 24, dtype=dtype)
    ref = lora_expand(h, b, ts, out.clone(), meta=fresh)
    assert torch.equal(lora_expand(h, b, ts, out, meta=meta), ref)
