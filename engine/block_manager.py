"""Paged KV-cache bookkeeping: a free list of fixed-size blocks and per-sequence block tables.

Pure Python (no torch): the runner turns block tables into tensors.
"""

from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    """Hands out KV blocks of `block_size` tokens from a pool of `num_blocks`."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

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
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks to the pool (finish, abort or preemption)."""
        self._free.extend(seq.block_table)
        seq.block_table = []
