"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, per-sequence block tables and the
adapter-aware prefix cache.

Pure Python (no torch, no I/O): the runner turns block tables into tensors.

Prefix caching (vLLM v1's KVCacheManager design): a *full* block is named by
`sha256(parent block hash, identity, its token ids)`, where identity is what the K/V depend on
besides the tokens: None for the base model, (adapter name, bound version id, content digest)
for an adapter, so a block is never shared across adapters, nor across versions of one name
(a replaced adapter never hits the old version's blocks). A block is registered under its hash
when it is scheduled to be filled (the step writes every new K/V before any attention reads, so
a request admitted in the same step may read it). Blocks are reference counted: a freed block
whose refcount drops to 0 joins the free list but keeps its hash until it is handed out for
something else, so the free list is also the LRU of cached blocks (unhashed blocks are reused
first, then cached ones least recently freed first). A new request (or a recompute after
preemption) starts with the longest chain of cached full blocks of its tokens, never all of
them: its last token is always computed (its logits are needed), and a request that asks for
prompt logprobs recomputes the positions it has not scored yet.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable

from engine.sequence import Sequence


def block_identity(seq: Sequence) -> Hashable:
    """What a sequence's K/V depend on besides its tokens (part of every block hash)."""
    if seq.components:  # a composition: every component's version and content, and its weight
        return ("composed", tuple(seq.components), tuple(seq.component_versions or ()),
                tuple(seq.component_digests or ()))
    if seq.adapter is None:
        return None
    return (seq.adapter, seq.adapter_version, seq.adapter_digest)


def hash_block(parent: bytes, identity: Hashable, token_ids: list[int]) -> bytes:
    """The hash of one full block: sha256 over its parent's hash, the identity and its tokens
    (a cryptographic hash: one tenant cannot craft a collision with another's prompt)."""
    h = hashlib.sha256(parent)
    h.update(repr(identity).encode())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Hands out KV blocks of `block_size` tokens from a pool of `num_blocks`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = reused first
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks  # block -> the hash it is cached under
        self._cached: dict[bytes, int] = {}  # hash -> block
        self.queries = 0  # prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, tokens found cached (vLLM's prefix_cache_hits)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs so that its first num_computed + num_new tokens have a slot."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq.block_table` to cover its next `num_new_tokens` tokens."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, have {len(self._free)}")
        for _ in range(need):
            seq.block_table.append(self._take_free())
        if self.enable_prefix_caching:
            self._register(seq, seq.num_computed_tokens + num_new_tokens)

    def allocate_admitted(self, seq: Sequence, num_new_tokens: int) -> int:
        """Admit a waiting `seq` (no blocks yet) for up to `num_new_tokens` tokens, which
        `can_allocate` accepted: start it at its longest cached prefix, then allocate as
        `allocate`. Returns the tokens left to compute this step (<= num_new_tokens)."""
        if not self.enable_prefix_caching or seq.block_table or seq.num_computed_tokens:
            self.allocate(seq, num_new_tokens)
            return num_new_tokens
        hit = self.match(seq)
        bs, pending = self.block_size, seq.num_pending_tokens
        while True:  # a hit only saves blocks, unless its blocks sit in the free list: then fit
            n = min(pending - len(hit) * bs, num_new_tokens)
            taken_free = sum(1 for b in hit if self._ref[b] == 0)
            if -(-n // bs) + taken_free <= len(self._free) or not hit:
                break
            hit.pop()
        self.queries += seq.num_tokens
        self.hits += len(hit) * bs
        for b in hit:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
            seq.block_table.append(b)
        seq.num_computed_tokens = len(hit) * bs
        self.allocate(seq, n)
        return n

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold `seq`'s longest cached prefix (read-only)."""
        limit = seq.num_tokens - 1  # the last token is always computed
        if seq.prompt_logprobs is not None:  # positions not yet scored must run (vLLM skips the cache)
            limit = min(limit, len(seq.prompt_logprobs) - 1)
        hashes = self._hashes(seq, max(0, limit) // self.block_size)
        out = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references (finish, abort or preemption); a block no one holds any more
        returns to the pool, still cached under its hash until it is reused for something else."""
        caching = self.enable_prefix_caching
        for b in reversed(seq.block_table) if caching else seq.block_table:  # cached: tail blocks are evicted first
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
                if caching and self._hash[b] is None:
                    self._free.move_to_end(b, last=False)  # nothing cached in it: reuse it first
        seq.block_table = []

    def uncache(self, seq: Sequence) -> list[int]:
        """Forget the hashes of `seq`'s blocks (its K/V may be non-finite or half-written: never
        reuse them) and return the blocks only `seq` holds, for the runner to scrub (a block that
        another running request also reads is left as it is)."""
        for b in seq.block_table:
            h = self._hash[b]
            if h is not None:
                self._hash[b] = None
                if self._cached.get(h) == b:
                    del self._cached[h]
        return [b for b in seq.block_table if self._ref[b] == 1]

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use stay allocated)."""
        self._cached.clear()
        self._hash = [None] * self.num_blocks

    # -- internals ---------------------------------------------------------------------------
    def _take_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        h = self._hash[b]
        if h is not None:  # evict the least recently freed cached block
            self._hash[b] = None
            if self._cached.get(h) == b:
                del self._cached[h]
        self._ref[b] = 1
        return b

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of `seq`'s first `num_blocks` full blocks (computed once, kept on the sequence)."""
        hashes, bs = seq.block_hashes, self.block_size
        identity = block_identity(seq)
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else b"", identity, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def _register(self, seq: Sequence, num_tokens: int) -> None:
        """Cache the blocks that the first `num_tokens` tokens of `seq` fill, once scheduled."""
        bs = self.block_size
        first, last = seq.num_computed_tokens // bs, min(num_tokens // bs, len(seq.block_table))
        if last <= first:
            return
        hashes = self._hashes(seq, last)
        for i in range(first, last):
            b, h = seq.block_table[i], hashes[i]
            if self._hash[b] is None and h not in self._cached:  # a duplicate block stays unhashed
                self._hash[b] = h
                self._cached[h] = b
