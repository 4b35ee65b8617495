"""Prefix caching in the block manager and scheduler: torch-free, fast unit tests."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

BS = 4


def _seq(rid: str, tokens: list[int], adapter: str | None = None, version: int | None = None,
         digest: str | None = None, max_tokens: int = 2, **params) -> Sequence:
    seq = Sequence(rid, list(tokens), SamplingParams(max_tokens=max_tokens, temperature=0.0, **params), adapter=adapter)
    seq.adapter_version, seq.adapter_digest = version, digest
    return seq


def _admit(bm: BlockManager, seq: Sequence, budget: int = 1 << 20) -> int:
    n = min(seq.num_pending_tokens, budget)
    assert bm.can_allocate(seq, n)
    return bm.allocate_admitted(seq, n)


PROMPT = list(range(10, 10 + 4 * BS + 2))  # 4 full blocks + 2 tokens


def test_hash_chain_reuses_full_blocks_and_always_computes_the_last_token() -> None:
    bm = BlockManager(32, BS, enable_prefix_caching=True)
    a = _seq("a", PROMPT)
    assert _admit(bm, a) == len(PROMPT) and a.num_computed_tokens == 0
    b = _seq("b", PROMPT)
    assert _admit(bm, b) == 2 and b.num_computed_tokens == 4 * BS
    assert b.block_table[:4] == a.block_table[:4] and b.block_table[4] != a.block_table[4]
    assert (bm.queries, bm.hits) == (2 * len(PROMPT), 4 * BS)
    # a prompt of exactly 4 full blocks: the last block is recomputed (its last token's logits are needed)
    c = _seq("c", PROMPT[: 4 * BS])
    assert _admit(bm, c) == BS and c.num_computed_tokens == 3 * BS
    # the chain: same tokens in block 2 after a different block 1 is a miss from block 1 on
    d = _seq("d", PROMPT[:BS] + [999] * BS + PROMPT[2 * BS :])
    _admit(bm, d)
    assert d.num_computed_tokens == BS


def test_never_shared_across_adapters_versions_or_with_the_base_model() -> None:
    bm = BlockManager(64, BS, enable_prefix_caching=True)
    owners = [(None, None, None), ("a", 1, "d1"), ("b", 2, "d2"), ("a", 3, "d3"), ("a", 4, "d1")]
    tables = []
    for i, (adapter, version, digest) in enumerate(owners):
        seq = _seq(f"r{i}", PROMPT, adapter, version, digest)
        _admit(bm, seq)
        assert seq.num_computed_tokens == 0, f"{owners[i]} hit another identity's blocks"
        tables.append(seq.block_table)
    assert len({b for t in tables for b in t}) == sum(len(t) for t in tables)  # no block in two tables
    again = _seq("again", PROMPT, "a", 3, "d3")
    _admit(bm, again)
    assert again.num_computed_tokens == 4 * BS and again.block_table[:4] == tables[3][:4]


def test_freed_cached_blocks_stay_hashed_until_reused_and_are_evicted_lru() -> None:
    bm = BlockManager(10, BS, enable_prefix_caching=True)
    a = _seq("a", PROMPT)  # 5 blocks: 4 full (cached) + 1 partial
    _admit(bm, a)
    prefix = a.block_table[:4]
    bm.free(a)
    assert bm.num_free_blocks == 10 and bm.num_cached_blocks == 4
    # unhashed blocks are handed out first: a 5-block request of other tokens evicts nothing
    other = _seq("o", [1] * (4 * BS + 1))
    _admit(bm, other)
    assert set(other.block_table).isdisjoint(prefix) and bm.num_cached_blocks == 8
    bm.free(other)
    b = _seq("b", PROMPT)
    _admit(bm, b)
    assert b.num_computed_tokens == 4 * BS  # still cached after being free
    bm.free(b)
    # fill the whole pool with new tokens: every cached free block gets evicted (tail blocks first)
    big = _seq("big", [2] * (10 * BS - 1))
    _admit(bm, big)
    c = _seq("c", PROMPT)
    bm.free(big)
    _admit(bm, c)
    assert c.num_computed_tokens == 0


def test_eviction_takes_a_sequences_tail_blocks_first() -> None:
    bm = BlockManager(7, BS, enable_prefix_caching=True)
    a = _seq("a", PROMPT)  # 5 blocks: 4 full (cached) + 1 partial
    _admit(bm, a)
    bm.free(a)
    # 4 blocks: the 3 unhashed ones, then the least recently freed cached one: a's last full block
    x = _seq("x", [5] * (4 * BS - 1))
    _admit(bm, x)
    assert len(bm.match(_seq("b", PROMPT))) == 3  # blocks 0-2 of the prefix survived


def test_refcounts_under_abort_and_preemption() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=1 << 10, policy="fcfs")
    a, b = _seq("a", PROMPT, max_tokens=4), _seq("b", PROMPT, max_tokens=4)
    s.add(a)
    out = s.schedule()
    s.postprocess(out, [7 for _ in out.scheduled])
    s.add(b)
    out = s.schedule()
    assert b.num_computed_tokens == 4 * BS and [it.num_tokens for it in out.scheduled if it.seq is b] == [2]
    shared = a.block_table[:4]
    s.abort("a")  # b still reads the shared blocks: they must not return to the pool
    assert all(blk not in bm._free for blk in shared)
    s.postprocess(out, [7 for _ in out.scheduled])
    s._preempt(b)
    s.running.remove(b)
    assert bm.num_free_blocks == 16  # every reference dropped
    out = s.schedule()  # recompute: starts from its own cached blocks (prompt + generated)
    assert b.num_computed_tokens == 4 * BS and out.scheduled[0].num_tokens == b.num_tokens - 4 * BS


def test_uncache_drops_hashes_and_returns_only_exclusive_blocks() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = _seq("a", PROMPT)
    _admit(bm, a)
    b = _seq("b", PROMPT)
    _admit(bm, b)
    scrub = bm.uncache(b)
    assert scrub == [b.block_table[4]]  # the 4 shared blocks are still a's: not zeroed under it
    bm.free(b)
    bm.free(a)
    c = _seq("c", PROMPT)
    _admit(bm, c)
    assert c.num_computed_tokens == 0  # the poisoned request's prefix is never served again


def test_prompt_logprobs_requests_skip_the_cache_hit() -> None:
    bm = BlockManager(32, BS, enable_prefix_caching=True)
    _admit(bm, _seq("a", PROMPT))
    b = _seq("b", PROMPT, prompt_logprobs=0)
    assert _admit(bm, b) == len(PROMPT) and b.num_computed_tokens == 0
    b.prompt_logprobs = [None] * len(PROMPT)  # every prompt position scored: a recompute may hit
    bm.free(b)
    b.num_computed_tokens = 0
    assert _admit(bm, b) == 2


def test_chunked_prefill_caches_each_full_chunk_and_disabled_caches_nothing() -> None:
    bm = BlockManager(32, BS, enable_prefix_caching=True)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=10, policy="fcfs")
    a = _seq("a", PROMPT)
    s.add(a)
    out = s.schedule()
    assert out.scheduled[0].num_tokens == 10 and bm.num_cached_blocks == 2
    s.postprocess(out, [None])
    b = _seq("b", PROMPT)
    s.add(b)
    out = s.schedule()  # a's last chunk fills blocks 2-3; b, admitted in the same step, reads them
    assert b.num_computed_tokens == 4 * BS and [it.num_tokens for it in out.scheduled] == [8, 2]
    off = BlockManager(32, BS)
    x, y = _seq("x", PROMPT), _seq("y", PROMPT)
    _admit(off, x)
    _admit(off, y)
    assert y.num_computed_tokens == 0 and off.num_cached_blocks == 0 and off.queries == 0


def test_a_hit_whose_blocks_are_free_still_fits_the_pool() -> None:
    bm = BlockManager(5, BS, enable_prefix_caching=True)
    a = _seq("a", PROMPT)  # 5 blocks: the whole pool
    _admit(bm, a)
    bm.free(a)
    b = _seq("b", PROMPT + [1] * (BS - 2))  # 5 blocks; the 4 cached are free: they count against the pool
    n = _admit(bm, b)
    assert b.num_computed_tokens == 4 * BS and n == BS and bm.num_free_blocks == 0
