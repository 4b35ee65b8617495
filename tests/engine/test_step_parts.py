"""The decode step's parts around the matmuls (rope, decode attention, the sampler's finite check) give
the same numbers as their plain reference forms, bit for bit, and the same answers on edge rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, PrefillSpan, paged_attention
from engine.rope import apply_rope
from engine.sampler import sample
from engine.sampling_params import SamplingParams


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate-half form."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,heads,d", [(1, 2, 8), (7, 12, 64), (33, 5, 128)])
def test_rope_is_bitwise_the_rotate_half_form(dtype: torch.dtype, t: int, heads: int, d: int) -> None:
    g = torch.Generator().manual_seed(t * heads + d)
    x = torch.randn(t, heads, d, generator=g).to(dtype)
    ang = torch.randn(t, d // 2, generator=g)
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    assert torch.equal(apply_rope(x, cos, sin), _rope_reference(x, cos, sin))


def test_rope_of_q_and_k_together_equals_each_alone() -> None:
    """The model rotates q and k in one call over a strided view of the fused qkv output."""
    t, h, kvh, d = 5, 4, 2, 16
    qkv = torch.randn(t, (h + 2 * kvh) * d)
    cos, sin = torch.randn(t, d), torch.randn(t, d)
    qk = apply_rope(qkv[:, : (h + kvh) * d].view(t, h + kvh, d), cos, sin)
    q = apply_rope(qkv[:, : h * d].view(t, h, d), cos, sin)
    k = apply_rope(qkv[:, h * d : (h + kvh) * d].view(t, kvh, d), cos, sin)
    assert torch.equal(qk[:, :h], q) and torch.equal(qk[:, h:], k)


def _decode_meta(lens: list[int], slots: int) -> AttentionMetadata:
    """Decode rows whose contexts sit at scattered kv_slots, padded to the zero slot `slots`."""
    g = torch.Generator().manual_seed(0)
    length = max(lens)
    perm = torch.randperm(slots, generator=g)[: len(lens) * length].view(len(lens), length)
    written = torch.arange(length)[None, :] < torch.tensor(lens)[:, None]
    gather = torch.where(written, perm, slots)
    new = gather[torch.arange(len(lens)), torch.tensor(lens) - 1]  # each row's new token goes to its last slot
    mask = None if min(lens) == length else written[:, None, None, :]
    return AttentionMetadata(slot_mapping=new, decode_start=0, decode_gather=gather, decode_mask=mask)


@pytest.mark.parametrize("lens", [[5], [3, 9, 1, 16, 17]])
def test_decode_only_step_matches_sdpa_per_row(lens: list[int]) -> None:
    b, h, kvh, d, slots = len(lens), 4, 2, 8, 128
    k_cache, v_cache = torch.randn(slots + 1, kvh, d), torch.randn(slots + 1, kvh, d)
    k_cache[slots] = v_cache[slots] = 0
    meta = _decode_meta(lens, slots)
    q, k, v = torch.randn(b, h, d), torch.randn(b, kvh, d), torch.randn(b, kvh, d)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, scale=0.3)
    assert meta.decode_gather is not None
    for i, n in enumerate(lens):  # each row alone over exactly its own n keys
        idx = meta.decode_gather[i, :n]
        ks, vs = k_cache[idx].transpose(0, 1)[None], v_cache[idx].transpose(0, 1)[None]
        ref = F.scaled_dot_product_attention(q[i][None, :, None], ks, vs, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out[i], ref[0, :, 0], rtol=1e-5, atol=1e-6)


def test_decode_rows_after_a_prefill_equal_the_decode_only_step() -> None:
    """A step with a prefill chunk before its decode rows gives those rows the same output as a decode-only step."""
    lens, h, kvh, d, slots = [4, 11, 7], 4, 4, 8, 64
    k_cache, v_cache = torch.randn(slots + 1, kvh, d), torch.randn(slots + 1, kvh, d)
    k_cache[slots] = v_cache[slots] = 0
    meta = _decode_meta(lens, slots)
    q, k, v = torch.randn(3, h, d), torch.randn(3, kvh, d), torch.randn(3, kvh, d)
    alone = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, scale=0.5)
    p = 5  # a fresh 5-token prompt written to free kv_slots first
    free = torch.tensor(sorted(set(range(slots)) - set(meta.decode_gather.flatten().tolist()))[:p])
    mixed = AttentionMetadata(slot_mapping=torch.cat([free, meta.slot_mapping]), prefills=[PrefillSpan(0, p, 0)],
                              decode_start=p, decode_gather=meta.decode_gather, decode_mask=meta.decode_mask)  # fmt: skip
    qp, kp, vp = torch.randn(p, h, d), torch.randn(p, kvh, d), torch.randn(p, kvh, d)
    out = paged_attention(torch.cat([qp, q]), torch.cat([kp, k]), torch.cat([vp, v]), k_cache, v_cache, mixed, scale=0.5)
    assert torch.equal(out[p:], alone)


def test_sampler_finite_check_keeps_every_answer() -> None:
    """NaN, +inf and -inf rows get no token; a row of huge but finite logits (its sum overflows) still does."""
    v = 50
    logits = torch.randn(5, v)
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, 9] = float("-inf")
    logits[4] = 3e38  # finite; sums to inf
    logits[4, 11] = 3.3e38
    toks, _ = sample(logits, [SamplingParams(temperature=0.0)] * 5, [None] * 5)
    assert toks[0] == int(logits[0].argmax()) and toks[1:4] == [None, None, None] and toks[4] == 11
    clean = torch.randn(3, v)
    toks, _ = sample(clean, [SamplingParams(temperature=0.0)] * 3, [None] * 3)
    assert toks == clean.argmax(-1).tolist()
