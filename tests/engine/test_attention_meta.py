"""The attention metadata filled into preallocated buffers (`AttentionMetaBuffers`) equals the metadata built
with fresh tensors from the block tables (the plain form below), for decode batches, fresh-prompt batches and
continued chunks, through the staged copy (the CUDA path, run on CPU) and without it, and after the buffers grow."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.attention import AttentionMetaBuffers, AttentionMetadata, PrefillSpan, paged_attention
from kernels import tuning

BS = 4  # block size
ZERO = 999  # the always-zero kv_slot


def _ref_decode(tables: list[list[int]], lens: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    length = max(lens)
    gather = torch.full((len(lens), length), ZERO, dtype=torch.long)
    for i, (bt, n) in enumerate(zip(tables, lens)):
        for p in range(n):
            gather[i, p] = bt[p // BS] * BS + p % BS
    written = torch.arange(length)[None, :] < torch.tensor(lens)[:, None]
    return gather, None if min(lens) == length else written[:, None, None, :]


def _ref_prefill_batch(spans: list[PrefillSpan]) -> tuple[list[int], list[int], list[int], torch.Tensor | None, int]:
    lens = [p.end - p.start for p in spans]
    length = max(lens)
    index, valid, rows = [], [], []
    for i, (p, n) in enumerate(zip(spans, lens)):
        index += list(range(p.start, p.end)) + [p.end - 1] * (length - n)
        valid += range(i * length, i * length + n)
        rows += range(p.start, p.end)
    mask = None
    if min(lens) != length:
        j = torch.arange(length)
        mask = ((j[None, :] <= j[:, None])[None] & (j[None, None, :] < torch.tensor(lens)[:, None, None]))[:, None]
    return index, valid, rows, mask, length


def _tables(rng: random.Random, lens: list[int], spare: int = 0) -> list[list[int]]:
    """Distinct blocks per sequence, enough for its length (plus `spare` more, as the block manager may hold)."""
    blocks = rng.sample(range(ZERO // BS), sum(-(-n // BS) + spare for n in lens))
    out, i = [], 0
    for n in lens:
        k = -(-n // BS) + spare
        out.append(blocks[i : i + k])
        i += k
    return out


def _buffers(stage: bool, max_seqs: int = 2, max_model_len: int = 8) -> AttentionMetaBuffers:
    # small up-front sizes, so the steps below also grow every buffer
    return AttentionMetaBuffers("cpu", block_size=BS, zero_kv_slot=ZERO, max_seqs=max_seqs,
                                max_model_len=max_model_len, stage=stage)


def _assert_same(meta: AttentionMetadata, prefills: list[PrefillSpan], tables: list[list[int]],
                 dec_tables: list[list[int]], dec_lens: list[int], t: int) -> None:
    fresh = [p for p in prefills if p.ctx_start == 0]
    if len(fresh) >= 2:
        assert meta.prefill_batch is not None
        index, valid, rows, mask, length = _ref_prefill_batch(fresh)
        pb = meta.prefill_batch
        assert (pb.num, pb.length) == (len(fresh), length)
        assert pb.index.tolist() == index and pb.valid.tolist() == valid and pb.rows.tolist() == rows
        assert (pb.mask is None) == (mask is None) and (mask is None or torch.equal(pb.mask, mask))
        assert all(p.ctx_start > 0 for p in meta.prefills)
    else:
        assert meta.prefill_batch is None and meta.prefills == prefills
    for p, bt in zip(prefills, tables):
        if p.ctx_start == 0:
            continue
        total = p.ctx_start + p.end - p.start
        assert p.gather is not None and p.mask is not None
        assert p.gather.tolist() == [bt[q // BS] * BS + q % BS for q in range(total)]
        ref = (torch.arange(total)[None, :] <= torch.arange(p.ctx_start, total)[:, None])[None, None]
        assert torch.equal(p.mask, ref)
    if dec_lens:
        gather, mask = _ref_decode(dec_tables, dec_lens)
        assert meta.decode_start == t - len(dec_lens)
        assert meta.decode_gather is not None and torch.equal(meta.decode_gather, gather)
        assert (meta.decode_mask is None) == (mask is None)
        assert mask is None or torch.equal(meta.decode_mask, mask)
    else:
        assert meta.decode_gather is None


@pytest.mark.parametrize("stage", [False, True])
def test_steps_match_the_plain_metadata(stage: bool) -> None:
    """A run of steps of every shape through one set of buffers (growing them on the way)."""
    rng = random.Random(0)
    bufs = _buffers(stage)
    for step in range(40):
        prefills, tables, t = [], [], 0
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            q = rng.randint(2, 9)
            ctx = rng.choice([0, 0, rng.randint(1, 13)])
            prefills.append(PrefillSpan(start=t, end=t + q, ctx_start=ctx))
            tables.append(_tables(rng, [ctx + q], spare=rng.randint(0, 1))[0])
            t += q
        dec_lens = [rng.randint(1, 30) for _ in range(rng.choice([0, 1, 3, 7]))]
        if step % 5 == 0:
            dec_lens = [dec_lens[0]] * len(dec_lens) if dec_lens else [5, 5]  # equal lengths: no mask
        dec_tables = _tables(rng, dec_lens, spare=rng.randint(0, 2))
        t += len(dec_lens)
        if t == 0:
            continue
        meta = bufs.build(torch.arange(t), prefills, tables, dec_tables, dec_lens)
        _assert_same(meta, prefills, tables, dec_tables, dec_lens, t)


def test_padding_reads_only_the_zero_slot_even_over_stale_table_entries() -> None:
    """A short row after a long one: its positions past its length read the zero kv_slot, whatever
    the reused scratch table held from the earlier step."""
    bufs = _buffers(False)
    long_tables = [[5, 6, 7, 8, 9]]
    bufs.build(torch.arange(1), [], [], long_tables, [20])
    meta = bufs.build(torch.arange(2), [], [], [[1], [2, 3, 4, 10, 11]], [3, 20])
    assert meta.decode_gather is not None
    assert meta.decode_gather[0, 3:].eq(ZERO).all() and meta.decode_gather[0, :3].tolist() == [4, 5, 6]


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [[9] * 11, [3, 9, 1, 16, 17, 2, 30, 5, 5, 12, 8]])
def test_chunked_decode_is_bitwise_the_whole_batch(dtype: torch.dtype, lens: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode rows attended in chunks through the reused scratch give the same bits as one whole-batch call
    (on one thread: with several, SDPA splits its work by the batch's shape, so a row's last bit already
    depends on the batch it is in), and padding still reads only the zero kv_slot (the pool is NaN
    everywhere no row owns)."""
    b, h, kvh, d = len(lens), 6, 2, 8
    rng = random.Random(1)
    tables = _tables(rng, lens)
    k_cache = torch.full((ZERO + 1, kvh, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    owned = torch.tensor(sorted({t[p // BS] * BS + p % BS for t, n in zip(tables, lens) for p in range(n)}))
    k_cache[owned] = torch.randn(len(owned), kvh, d).to(dtype)
    v_cache[owned] = torch.randn(len(owned), kvh, d).to(dtype)
    k_cache[ZERO] = v_cache[ZERO] = 0
    q = torch.randn(b, h, d).to(dtype)
    new = torch.tensor([t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, lens)])
    k, v = k_cache[new].clone(), v_cache[new].clone()  # each row's newest token, written again by the call
    whole = AttentionMetaBuffers("cpu", block_size=BS, zero_kv_slot=ZERO, max_seqs=b, max_model_len=32)
    meta = whole.build(new, [], [], tables, lens)
    assert meta.decode_chunk == 0 and meta.decode_scratch is None
    ref = paged_attention(q, k, v, k_cache, v_cache, meta, scale=0.4)
    assert not ref.isnan().any()
    monkeypatch.setattr(tuning, "DECODE_CHUNK_BYTES", 1)  # the smallest chunks
    monkeypatch.setattr(tuning, "DECODE_CHUNK_MIN_ROWS", 3)
    chunked = AttentionMetaBuffers("cpu", block_size=BS, zero_kv_slot=ZERO, max_seqs=b, max_model_len=32,
                                   kv_slot_shape=(kvh, d), kv_dtype=dtype)
    for _ in range(2):  # the second step reuses the scratch
        meta = chunked.build(new, [], [], tables, lens)
        assert meta.decode_chunk == 3 and meta.decode_scratch is not None
        assert torch.equal(paged_attention(q, k, v, k_cache, v_cache, meta, scale=0.4), ref)


def test_engine_decoding_in_chunks_equals_alone_and_transformers(
    llama_dir: Path, hf_llama: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's decode rows in chunks of 5 (12 requests: 5 + 5 + 2 per layer) give every request the
    tokens it gets alone and transformers' greedy tokens."""
    from engine import LLM, SamplingParams
    from tests.engine.conftest import hf_greedy

    monkeypatch.setattr(tuning, "DECODE_CHUNK_BYTES", 1)
    monkeypatch.setattr(tuning, "DECODE_CHUNK_MIN_ROWS", 5)
    import engine.attention as attention

    rows_seen: set[int] = set()
    decode_rows = attention._decode_rows
    monkeypatch.setattr(attention, "_decode_rows", lambda q, *a: rows_seen.add(q.shape[0]) or decode_rows(q, *a))
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [[1] + [(7 * i + 13 * j) % 250 + 3 for j in range(3 + (i * 5) % 29)] for i in range(12)]
    llm = LLM(str(llama_dir), enable_lora=False)
    batch = [o.token_ids for o in llm.generate(prompts, greedy)]
    assert {5, 2} <= rows_seen and max(rows_seen) == 5
    assert batch == [llm.generate([p], greedy)[0].token_ids for p in prompts]
    assert all(batch[i] == hf_greedy(hf_llama, prompts[i], 24) for i in (0, 3, 11))
