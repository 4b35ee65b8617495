"""Continuous batching with chunked prefill, preemption by recompute and adapter-aware admission.

Pure Python (no torch) and no I/O, so its policies test in milliseconds. One step:
`out = scheduler.schedule(resident)` -> the engine activates the step's adapters and the runner computes
`out.scheduled` -> `scheduler.postprocess(out, tokens)`. The scheduler never loads or pins an adapter: it
only asks `can_acquire` whether a slot could be had (engine.lora.engine) and caps distinct adapters.

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
   A request whose adapter cannot join this step (no slot, or the distinct-adapter cap) is skipped,
   not waited for: the requests behind it whose adapters are running or already claimed this step
   still fill the batch (LoRAX/punica group by resident adapter; a stop here halved the decode
   batch under churn). Starvation guard: the first aged request that cannot join *reserves* the
   next slot. While it waits, (a) every later step tries it first, (b) no other request may bring
   in a new adapter (so no one takes the slot it waits for), and (c) the running adapter closest
   to done (the least work, tokens to feed and to generate, left to its longest running request)
   admits only requests that end no later than that, so it drains and frees a slot. That work
   shrinks by at least one every step that schedules its requests, so the reserved request is
   admitted at most K = `aging_steps` + T steps after it arrived, T = the least work any running
   adapter had left when it reserved (<= prompt + max_tokens of a running request; a preemption in
   between only frees slots sooner; seats and KV blocks can still make it wait, as for anyone).
   One reservation at a time, taken in policy order: the n-th aged request also waits for the n-1
   before it (tests/engine/test_churn.py).

With prefix caching (block_manager) an admitted request starts at its longest cached prefix: only
the rest is fed, and only that counts against the token budget (the fair-share charge is the whole prompt).

The order of step 2 is the scheduling policy (`policy`); the text above is `fcfs`:
- `fair` (default): weighted fair share over tenants (a tenant = `seq.tenant`, by default the
  adapter; the base model is one tenant), after VTC (Sheng et al., "Fairness in Serving Large
  Language Models", OSDI 2024). Each tenant has a virtual counter of the service it received,
  `(prompt_weight * prompt tokens + output_weight * output tokens) / weight`; the waiting tenant
  with the least counter goes next (re-read after every admission), FCFS within a tenant,
  resident adapters first among equal counters. A tenant that becomes active is lifted to the
  least counter of the active tenants (no credit for idle time). Preemption takes the most
  over-served tenant's request. Two tenants that both have waiting requests stay within
  (prompt_weight * longest prompt + output_weight * max_tokens * max_num_seqs) / least weight of
  each other's counter: one admission plus what a full batch can still generate
  (tests/engine/test_fair.py checks it under adversarial arrivals).
- `priority`: lower `seq.priority` first, then resident adapters, then arrival (vLLM's order);
  preemption takes the largest priority value.
In `fair` and `priority` aging does not reorder (that would undo the policy); an aged request
that cannot join reserves a slot as above (only then does it go first), so the starvation rule stands.
`max_seqs_per_tenant` caps one tenant's running requests (None = no cap).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SeqStatus

POLICIES = ("fair", "fcfs", "priority")


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
        can_acquire: Callable[[Sequence, list[Sequence]], bool] | None = None,
        bind: Callable[[Sequence], None] | None = None,
        policy: str = "fair",
        weights: Mapping[str, float] | None = None,
        prompt_weight: float = 1.0,
        output_weight: float = 2.0,
        max_seqs_per_tenant: int | None = None,
    ) -> None:
        """`can_acquire(seq, admitted)` is asked before admitting a sequence with an adapter: could its
        adapters get LoRA slots next to those of `admitted` (this step's earlier admissions)? A question
        only (no loading, no pinning; the engine does both after `schedule()`); None = always.
        `bind(seq)` is told of an admission before its KV blocks are allocated, so that the adapter
        versions a request runs on (part of its prefix-cache identity) are fixed first: bookkeeping, no I/O.
        `weights`: tenant -> share weight (default 1.0); the policies are in the module docstring."""
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.weights: dict[str, float] = dict(weights or {})
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.max_seqs_per_tenant = max_seqs_per_tenant
        self.vtc: dict[str, float] = {}  # tenant -> virtual counter (weighted service so far)
        self.prompt_served: dict[str, int] = {}  # tenant -> prompt tokens admitted (first admission only)
        self.output_served: dict[str, int] = {}  # tenant -> output tokens generated
        self._active: dict[str, int] = {}  # tenant -> its waiting sequences (present only if > 0)
        self._last_left: str | None = ""  # the last tenant whose queue emptied: its counter is the lift floor when none waits
        self._left_floor = 0.0  # that floor when the last tenant to leave was forgotten since (_last_left None)
        self._forget: set[str] = set()  # tenants to forget once their last request ends (forget_tenant)
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.aging_steps = aging_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.step_no = 0
        self.num_preemptions = 0
        self.decode_steps = 0  # steps that sampled at least one decode token (cumulative; mlora bench: mean decode batch)
        self.decode_seqs = 0  # decode tokens those steps sampled (one per decoding sequence)
        self._can_acquire = can_acquire
        self._bind = bind
        self._reserved: Sequence | None = None  # the aged request the next free slot is kept for (step 2)

    # -- queue management -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        seq.enqueued_step = self.step_no
        self.waiting.append(seq)
        self._forget.discard(seq.tenant)  # asked for again: served again, its accounting stays
        self._activate(seq.tenant)

    def set_weight(self, tenant: str, weight: float) -> None:
        """Share weight of `tenant` from now on (service already counted keeps its old weight)."""
        if not weight > 0:
            raise ValueError(f"a tenant's weight must be > 0, got {weight!r}")
        self.weights[tenant] = float(weight)

    def forget_tenant(self, tenant: str) -> None:
        """Drop `tenant`'s fair-share accounting (counter, token totals: its adapter was unloaded), so a
        server that loads and unloads adapters all day keeps no state per name it no longer serves.
        Now if none of its requests is queued or running, else when the last one ends (unless a new
        request of it arrives first). Its weight stays. Back later, it is lifted like any tenant that
        becomes active, so forgetting gives it no credit over the tenants then waiting."""
        self._forget.add(tenant)
        self._maybe_forget(tenant)

    def _maybe_forget(self, tenant: str) -> None:
        if tenant not in self._forget or tenant in self._active or any(s.tenant == tenant for s in self.running):
            return
        self._forget.discard(tenant)
        if tenant == self._last_left:
            self._left_floor, self._last_left = self.vtc.get(tenant, 0.0), None
        for served in (self.vtc, self.prompt_served, self.output_served):
            served.pop(tenant, None)

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
        """Mark finished (finish_reason already set) and release its blocks and seat, once: finishing a
        finished sequence does nothing (the engine releases the rest: adapter pins, generator)."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self._deactivate(seq.tenant)
        self.bm.free(seq)
        seq.status = SeqStatus.FINISHED
        if self._forget:
            self._maybe_forget(seq.tenant)

    def waiting_adapters(self) -> list[str]:
        """Adapters that waiting requests need, in the order they would be admitted."""
        seen: dict[str, None] = {}
        for seq in self._with_reserved(self._candidates(frozenset())):  # the reserved one's adapter first
            for name in seq.adapter_names:
                seen.setdefault(name, None)
        return list(seen)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self, resident: Iterable[str] = ()) -> SchedulerOutput:
        """Pick this step's work. `resident` = adapters already in device slots (preferred)."""
        self.step_no += 1
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        done: set[int] = set()  # id() of sequences scheduled this step (never preempted by it)
        for seq in sorted(self.running, key=self._running_key):  # decodes first
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_pending_tokens, budget)
            while not self.bm.can_allocate(seq, n):
                victim = self._victim(seq, done)
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
        active = {n for s in self.running for n in s.adapter_names}  # a composed request counts each component
        if not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            budget = self._admit(out, budget, active, frozenset(resident))  # ordering the queue is O(waiting)
        return out

    def _admit(self, out: SchedulerOutput, budget: int, active: set[str], resident: frozenset[str]) -> int:
        cap = self.max_seqs_per_tenant
        per_tenant: dict[str, int] = {}
        if cap is not None:
            for s in self.running:
                per_tenant[s.tenant] = per_tenant.get(s.tenant, 0) + 1
        admitted: list[Sequence] = []  # this step's admissions with adapters (their slots are claimed)
        held = False  # the reserved request waits for a slot this step: see the module docstring, step 2
        draining: dict[str, int] = {}  # adapter -> work it has left: while held, it takes no request with more
        for seq in self._with_reserved(self._order(resident)):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if cap is not None and per_tenant.get(seq.tenant, 0) >= cap:
                continue
            new = [n for n in seq.adapter_names if n not in active]
            if held and (new or any(_work(seq) > draining.get(name, 1 << 62) for name in seq.adapter_names)):
                continue  # the next free slot is the reserved request's, and the draining adapter must not outlast it
            if new and self.max_loras is not None and len(active) + len(new) > self.max_loras:
                held, draining = self._hold(seq, held, draining, len(new))
                continue
            n = min(seq.num_pending_tokens, budget)
            if not self.bm.can_allocate(seq, n):
                break
            if seq.adapter_names and self._can_acquire is not None and not self._can_acquire(seq, admitted):
                held, draining = self._hold(seq, held, draining, max(len(new), 1))
                continue
            if seq is self._reserved:
                self._reserved = None
            if seq.adapter_names:
                admitted.append(seq)
                if self._bind is not None:
                    self._bind(seq)
            n = self.bm.allocate_admitted(seq, n)  # starts at its cached prefix, if any
            self.waiting.remove(seq)
            self._deactivate(seq.tenant)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            active.update(seq.adapter_names)
            if cap is not None:
                per_tenant[seq.tenant] = per_tenant.get(seq.tenant, 0) + 1
            if seq.num_preemptions == 0:  # a recompute after preemption is not charged again
                self._charge(seq, self.prompt_weight * seq.num_prompt_tokens)
                self.prompt_served[seq.tenant] = self.prompt_served.get(seq.tenant, 0) + seq.num_prompt_tokens
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens))
            budget -= n
        return budget

    # -- starvation guard (module docstring, step 2) ---------------------------------------------
    def _with_reserved(self, order: Iterable[Sequence]) -> Iterator[Sequence]:
        """`order` with the request that reserved a slot (if it still waits) moved to the front."""
        reserved = self._reserved
        if reserved is not None and reserved.status is not SeqStatus.WAITING:
            reserved = self._reserved = None  # finished or aborted while it waited
        if reserved is not None:
            yield reserved
        yield from (seq for seq in order if seq is not reserved)

    def _hold(self, seq: Sequence, held: bool, draining: dict[str, int], need: int) -> tuple[bool, dict[str, int]]:
        """`seq` cannot join this step. If it holds the reservation, or it has aged and none is held,
        it reserves the next slot: returns (held, the `need` running adapters closest to done with the
        work each has left; they drain). Otherwise it is skipped and the state is unchanged."""
        if held or not (seq is self._reserved or (self._reserved is None and self._aged(seq))):
            return held, draining
        self._reserved = seq
        left: dict[str, int] = {}  # adapter -> the most work any of its running requests has left
        for s in self.running:
            for name in s.adapter_names:
                left[name] = max(left.get(name, 0), _work(s))
        return True, {name: left[name] for name in sorted(left, key=lambda name: (left[name], name))[:need]}

    def _order(self, resident: frozenset[str]) -> Iterator[Sequence]:
        """Waiting sequences in admission order. Under `fair` the next one is chosen when asked, so an
        admission (which charges its tenant) moves that tenant back before the next choice."""
        if self.policy != "fair":
            yield from self._candidates(resident)
            return
        queues: dict[str, deque[Sequence]] = {}
        for seq in self.waiting:  # queue order within a tenant: preempted first, then arrival
            queues.setdefault(seq.tenant, deque()).append(seq)

        def entry(tenant: str) -> tuple[float, int, int, str]:
            head = queues[tenant][0]
            cold = 0 if head.adapter is None or head.adapter in resident else 1
            return (self.vtc.get(tenant, 0.0), cold, head.seq_no, tenant)

        heap = [entry(t) for t in queues]
        heapq.heapify(heap)
        while heap:
            tenant = heapq.heappop(heap)[3]
            yield queues[tenant].popleft()
            if queues[tenant]:
                heapq.heappush(heap, entry(tenant))

    def _candidates(self, resident: frozenset[str]) -> list[Sequence]:
        """Waiting sequences in admission-priority order (see the module docstring)."""
        if self.policy == "fair":
            return list(self._order(resident))
        if self.policy == "priority":

            def by_priority(seq: Sequence) -> tuple[int, int, int]:
                cold = 0 if seq.adapter is None or seq.adapter in resident else 1
                return (seq.priority, cold, seq.seq_no)

            return sorted(self.waiting, key=by_priority)
        if self.max_loras is None:
            return list(self.waiting)

        def key(seq: Sequence) -> tuple[int, int, int]:
            aged = self._aged(seq)
            warm = seq.adapter is None or seq.adapter in resident
            return (0 if aged else 1, 0 if warm else 1, seq.seq_no)

        return sorted(self.waiting, key=key)

    def _aged(self, seq: Sequence) -> bool:
        """Whether waiting `seq` has waited `aging_steps` steps (a preempted one counts as aged)."""
        return self.step_no - seq.enqueued_step >= self.aging_steps

    def _standing(self, seq: Sequence) -> float:
        """How far back the policy puts a running `seq`: its tenant's counter (`fair`), its priority
        value (`priority`), nothing (`fcfs`: admission order alone decides)."""
        if self.policy == "fair":
            return self.vtc.get(seq.tenant, 0.0)
        return float(seq.priority) if self.policy == "priority" else 0.0

    def _running_key(self, seq: Sequence) -> tuple[bool, float]:
        """Order of the running loop: decodes before prefills, then (stable: by admission) the best
        standing first, so the ones a preemption should take are still unscheduled if KV runs short."""
        return (seq.num_pending_tokens > 1, self._standing(seq))

    def _victim(self, seq: Sequence, done: set[int]) -> Sequence:
        """The running sequence to preempt so that `seq` can grow (`seq` itself when no other can go):
        the worst standing (the most over-served tenant, the largest priority value), then the latest
        admitted; never one already scheduled this step."""
        others = [(i, s) for i, s in enumerate(self.running) if id(s) not in done and s is not seq]
        return max(others, key=lambda p: (self._standing(p[1]), p[0]))[1] if others else seq

    # -- fair-share accounting ----------------------------------------------------------------
    def _charge(self, seq: Sequence, cost: float) -> None:
        tenant = seq.tenant
        self.vtc[tenant] = self.vtc.get(tenant, 0.0) + cost / self.weights.get(tenant, 1.0)

    def _activate(self, tenant: str) -> None:
        """A request of `tenant` joined the queue. A tenant becoming active (none of its requests was
        waiting) is lifted to the least counter of the active tenants, or when none is, to the counter of
        the last one that left: no credit for the time it did not ask for service (VTC)."""
        n = self._active.get(tenant, 0)
        if n == 0:
            left = self._left_floor if self._last_left is None else self.vtc.get(self._last_left, 0.0)
            floor = min((self.vtc.get(t, 0.0) for t in self._active), default=left)
            self.vtc[tenant] = max(self.vtc.get(tenant, 0.0), floor)
        self._active[tenant] = n + 1

    def _deactivate(self, tenant: str) -> None:
        n = self._active.get(tenant, 0) - 1
        if n > 0:
            self._active[tenant] = n
            return
        self._active.pop(tenant, None)
        self._last_left = tenant

    def _preempt(self, seq: Sequence) -> None:
        """Back to the front of the queue, blocks freed (the engine unpins its adapter: `out.preempted`)."""
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.num_preemptions += 1
        seq.enqueued_step = self.step_no - self.aging_steps  # preempted work counts as aged
        self.waiting.appendleft(seq)
        self._activate(seq.tenant)

    def postprocess(self, out: SchedulerOutput, tokens: list[int | None]) -> list[Sequence]:
        """Advance the scheduled sequences with the sampled tokens (aligned with `out.scheduled`).

        Returns the sequences that got a new token (finished ones included, already released).
        """
        touched = []
        decodes = sum(1 for item, tok in zip(out.scheduled, tokens) if item.num_tokens == 1 and tok is not None)
        if decodes:
            self.decode_steps += 1
            self.decode_seqs += decodes
        for item, tok in zip(out.scheduled, tokens):
            seq = item.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += item.num_tokens
            if item.sample and tok is not None:
                seq.append_token(tok)
                self._charge(seq, self.output_weight)
                self.output_served[seq.tenant] = self.output_served.get(seq.tenant, 0) + 1
                touched.append(seq)
                if seq.check_token_stop():
                    self.finish(seq)
        return touched


def _work(seq: Sequence) -> int:
    """Tokens `seq` has left to feed and to generate: an upper bound on the steps until it ends, and
    one less after every step that schedules it."""
    return seq.num_pending_tokens + max(0, min(seq.params.max_tokens - seq.num_output_tokens, seq.max_model_len - seq.num_tokens))
