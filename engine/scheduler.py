"""Continuous batching with chunked prefill, preemption by recompute and adapter-aware admission.

Pure Python (no torch), so its policies test in milliseconds. One step:
`out = scheduler.schedule(resident)` -> the runner computes `out.scheduled` -> `scheduler.postprocess(out, tokens)`.

Policy, in order:
1. Running sequences first, decodes before unfinished prefills (so a long prompt never stalls
   token streams), each in admission order: each gets its pending tokens (1 when decoding, a
   chunk when a long prompt is still prefilling) within `max_num_batched_tokens`. When the KV pool
   cannot cover them, the most recently admitted running sequence not yet scheduled this step is
   preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
   (prompt + output) later.
2. Waiting sequences are admitted if no preemption happened, while seats (`max_num_seqs`), token
   budget and KV blocks last. A step holds at most `max_loras` distinct adapters (None = the base
   model, which needs no slot). Candidates are ordered: aged requests (waited >= `aging_steps`
   steps) first, then requests whose adapter is already resident, then the rest, each by arrival.
   A request whose adapter cannot join this step is skipped, unless it has aged: then admission
   stops until it fits, so the running set drains and no request waits forever.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    """A sequence and how many of its pending tokens run this step."""

    seq: Sequence
    num_tokens: int
    sample: bool  # True when this chunk reaches the end of the known tokens (a new token is due)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    adapters: set[str] = field(default_factory=set)  # distinct adapters in this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides which sequences run each step and how many tokens each feeds."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_loras: int | None = None,
        aging_steps: int = 16,
        acquire: Callable[[Sequence], bool] | None = None,
        release: Callable[[Sequence], None] | None = None,
    ) -> None:
        """`acquire(seq)` is asked before admitting a sequence (pin its adapter's slot; False = not
        now) and `release(seq)` is called when it leaves the running set (finish, abort, preemption)."""
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.aging_steps = aging_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.step_no = 0
        self._enqueued_at: dict[int, int] = {}  # id(seq) -> step it (re)entered the queue
        self.num_preemptions = 0
        self._acquire = acquire
        self._release = release

    # -- queue management -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self._enqueued_at[id(seq)] = self.step_no
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is, free its blocks; returns it (finish_reason 'abort')."""
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id:
                seq.finish_reason = "abort"
                self.finish(seq)
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        """Mark finished (finish_reason already set) and release its blocks and seat."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        self._enqueued_at.pop(id(seq), None)
        if seq.status is SeqStatus.RUNNING and self._release is not None:
            self._release(seq)
        seq.status = SeqStatus.FINISHED

    def waiting_adapters(self) -> list[str]:
        """Adapters that waiting requests need, in the order they would be admitted."""
        seen: dict[str, None] = {}
        for seq in self._candidates(frozenset()):
            if seq.adapter is not None:
                seen.setdefault(seq.adapter, None)
        return list(seen)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self, resident: Iterable[str] = ()) -> SchedulerOutput:
        """Pick this step's work. `resident` = adapters already in device slots (preferred)."""
        self.step_no += 1
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        done: set[int] = set()  # id() of sequences scheduled this step (never preempted by it)
        for seq in sorted(self.running, key=lambda s: s.num_pending_tokens > 1):  # decodes first
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_pending_tokens, budget)
            while not self.bm.can_allocate(seq, n):
                victim = next((s for s in reversed(self.running) if id(s) not in done and s is not seq), seq)
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.bm.allocate(seq, n)
            done.add(id(seq))
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens))
            budget -= n
        active = {s.adapter for s in self.running if s.adapter is not None}
        if not out.preempted:
            budget = self._admit(out, budget, active, frozenset(resident))
        out.adapters = {s.seq.adapter for s in out.scheduled if s.seq.adapter is not None}
        return out

    def _admit(self, out: SchedulerOutput, budget: int, active: set[str], resident: frozenset[str]) -> int:
        for seq in self._candidates(resident):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            aged = self.step_no - self._enqueued_at.get(id(seq), self.step_no) >= self.aging_steps
            needs_slot = seq.adapter is not None and seq.adapter not in active
            if needs_slot and self.max_loras is not None and len(active) >= self.max_loras:
                if aged:
                    break  # hold everything behind it until its adapter can join
                continue
            n = min(seq.num_pending_tokens, budget)
            if not self.bm.can_allocate(seq, n):
                break
            if self._acquire is not None and not self._acquire(seq):
                if aged:
                    break
                continue
            self.bm.allocate(seq, n)
            self.waiting.remove(seq)
            self._enqueued_at.pop(id(seq), None)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if seq.adapter is not None:
                active.add(seq.adapter)
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens))
            budget -= n
        return budget

    def _candidates(self, resident: frozenset[str]) -> list[Sequence]:
        """Waiting sequences in admission-priority order (see the module docstring)."""
        if self.max_loras is None:
            return list(self.waiting)

        def key(seq: Sequence) -> tuple[int, int, int]:
            aged = self.step_no - self._enqueued_at.get(id(seq), self.step_no) >= self.aging_steps
            warm = seq.adapter is None or seq.adapter in resident
            return (0 if aged else 1, 0 if warm else 1, seq.seq_no)

        return sorted(self.waiting, key=key)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        if self._release is not None:
            self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.num_preemptions += 1
        self._enqueued_at[id(seq)] = self.step_no - self.aging_steps  # preempted work counts as aged
        self.waiting.appendleft(seq)

    def postprocess(self, out: SchedulerOutput, tokens: list[int | None]) -> list[Sequence]:
        """Advance the scheduled sequences with the sampled tokens (aligned with `out.scheduled`).

        Returns the sequences that got a new token (finished ones included, already released).
        """
        touched = []
        for item, tok in zip(out.scheduled, tokens):
            seq = item.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += item.num_tokens
            if item.sample and tok is not None:
                seq.append_token(tok)
                touched.append(seq)
                if seq.check_token_stop():
                    self.finish(seq)
        return touched
