"""The engine's multi-LoRA layer: joins the scheduler, the adapter tiers and the runner.

- `LoraSlots` (engine.lora.slots) holds the device stacks the model reads; `AdapterCache`
  (engine.lora.manager) decides which adapter lives in which slot (LRU tiers, pins).
- The scheduler only asks `can_acquire` (could this request's adapters get slots next to what this
  step already claims; no I/O). After `schedule()` the engine calls `activate`, vLLM's LRU worker
  adapter manager: for each adapter the step needs, if it is not in a slot, load it (disk -> CPU ->
  slot, evicting the least recently used adapter no request holds) and pin it. A request holds its
  pins (`seq.lora_pins`) from its first step until it finishes or is preempted, so an adapter in use
  is never evicted; a request whose adapter fails to load ends there.
- A request is bound to the adapter *version* current at its first admission (`bind`, which fixes
  its prefix-cache identity before its KV blocks are hashed; `seq.adapter_version`) until it finishes: after a preemption it re-acquires that version, so a replacement (or an
  unload) of the name never changes the weights of an answer already under way. A request that
  never started gets the name's current version, or a clear "was unloaded" error.
- Per step the runner receives a `LoraStep` (one lora_slot per scheduled sequence, -1 = base model),
  never an adapter name, or None when no scheduled sequence uses an adapter.
- After each step, adapters that waiting requests need are prefetched disk -> CPU in the
  background, so a cold adapter's first token waits only for the CPU -> slot copy; unless disk loads
  are short (`PREFETCH_MIN_LOAD_S`): then a background load costs the step more than it saves (its
  Python holds the GIL the step needs), and the adapter is loaded when it is activated.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.errors import AdapterNotFoundError, ConfigError, MloraError
from engine.lora import AdapterCache, LoraSlots
from engine.lora.manager import AdapterChangedError, AdapterVersionGoneError
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.stats import EngineStats

if TYPE_CHECKING:
    from engine.runner import ModelRunner

log = logging.getLogger("mlora.engine")
# Prefetch in the background only when disk loads typically take at least this long: a background load
# takes the GIL from the step many times, each hand-off costing it up to one switch interval (5 ms).
PREFETCH_MIN_LOAD_S = 4 * sys.getswitchinterval()


@dataclass
class LoraStep:
    """All the runner learns of one step's adapters (None instead when no scheduled sequence uses one)."""

    lora_slots: list[int]  # per scheduled item: its adapter's row in the stacks (-1 = base model, or composed)
    compose: dict[int, tuple[tuple[int, float], ...]] | None  # item index -> (lora_slot, weight) pairs, if composed
    stacks: LoraSlots


class LoraEngine:
    """Adapter registry + slots for one EngineCore."""

    def __init__(self, config: EngineConfig, runner: ModelRunner) -> None:
        dtype = runner.dtype if config.lora_dtype == "auto" else config.lora_dtype
        self.slots = LoraSlots(
            runner.dims,
            max_loras=config.max_loras,
            max_rank=config.max_lora_rank,
            dtype=dtype,
            device=runner.device,
            base_weight=runner.base_weight,
        )
        self.cache = AdapterCache(
            max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras,
            max_cpu_lora_bytes=config.max_cpu_lora_bytes or 0,
            loader=self.slots.load,
            inspector=self.slots.inspect,  # registration reads config + header only; tensors at first use
            slot_writer=self.slots.set_slot,
            slot_clearer=self.slots.reset_slot,
        )
        self.max_loras = config.max_loras

    # -- registry ----------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str, *, root: str | None = None, eager: bool = True) -> None:
        """Validate + load into the CPU tier; raises AdapterError and changes nothing if bad.
        `root`: every file actually read must resolve inside this (resolved) directory.
        `eager=False` (bulk registration at startup): config + safetensors header only; the tensors
        are read, value-checked and hashed at first use (see AdapterCache.register)."""
        self.cache.register(name, path, root=root, eager=eager)

    def remove_adapter(self, name: str) -> None:
        self.cache.remove(name)

    def names(self) -> list[str]:
        return self.cache.names()

    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.cache:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered")

    def resident(self) -> list[str]:
        return self.cache.resident()

    # -- admission (the scheduler's question) and activation (before the forward) --------------
    @staticmethod
    def _keys(seq: Sequence) -> list[tuple[str, int | None]]:
        """(adapter, bound version or None = current) for every adapter `seq` needs in a slot."""
        names = seq.adapter_names
        versions = seq.component_versions if seq.components else [seq.adapter_version]
        return list(zip(names, versions or [None] * len(names)))

    def can_acquire(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        """Could `seq`'s adapters get slots once this step's earlier admissions (`admitted`) hold theirs?
        No I/O and no side effects: the scheduler asks this; `activate` does the loading."""
        claimed = [key for s in admitted for key in self._keys(s)]
        keys = self._keys(seq)
        return all(self.cache.can_acquire(n, v, claimed=claimed + keys[:i]) for i, (n, v) in enumerate(keys))

    def bind(self, seq: Sequence) -> None:
        """At a request's first admission (the scheduler calls this before it allocates KV blocks): tie it
        to the current versions of its adapters, whose id and cache key (content digest, or header facts
        for a header-level registration) are its prefix-cache identity (block_manager.block_identity). Bookkeeping only: nothing is loaded or pinned. A name
        that cannot be bound (unloaded, changed files) stays unbound; `activate` then ends the request."""
        if seq.components and seq.component_versions is None:
            versions = [self.cache.bind_current(name) for name, _ in seq.components]
            if None in versions:  # all or none
                for version in versions:
                    if version is not None:
                        self.cache.unbind(version)
                return
            seq.component_versions = [v for v in versions if v is not None]
            seq.component_digests = [self.cache.cache_key_of(v) for v in seq.component_versions]
        elif not seq.components and seq.adapter is not None and seq.adapter_version is None:
            seq.adapter_version = self.cache.bind_current(seq.adapter)
            if seq.adapter_version is not None:
                seq.adapter_digest = self.cache.cache_key_of(seq.adapter_version)

    def activate(self, seqs: Iterable[Sequence]) -> list[tuple[Sequence, str]]:
        """Pin the adapters of this step's sequences that hold none yet (just admitted, or resumed after
        a preemption), in admission order: `AdapterCache.acquire` loads one that is not in a slot
        (validated first, then the least recently used unpinned adapter is evicted). Returns the
        sequences whose adapters could not be loaded, with why; they hold nothing."""
        failed = []
        for seq in seqs:
            if seq.adapter_names and not seq.lora_pins:
                error = self._pin(seq)
                if error is not None:
                    failed.append((seq, error))
        return failed

    def _pin(self, seq: Sequence) -> str | None:
        """Pin every adapter of `seq` (all or none), on the versions it was bound to at admission."""
        pins: list[tuple[str, int]] = []
        keys = self._keys(seq)
        try:
            for name, version in keys:
                try:
                    lora_slot = self.cache.acquire(name, version=version)
                except (AdapterVersionGoneError, AdapterChangedError) as e:
                    return e.message
                except AdapterNotFoundError:  # unloaded while this request waited for its first step
                    return f"adapter {name!r} was unloaded before this request started"
                except MloraError as e:  # e.g. the files went bad after registration: fail this request only
                    return f"adapter {name!r} could not be loaded: {e}"
                if version is None and lora_slot is not None:  # unbound: it could not be bound at admission
                    self.cache.release(name, lora_slot)  # (re-registered since: its blocks carry no version)
                    return f"adapter {name!r} was unloaded before this request started"
                if lora_slot is None:  # can_acquire said a slot could be had: a broken invariant, not a user error
                    log.error("request %s: no LoRA slot for adapter %r after admission", seq.request_id, name)
                    return f"no LoRA slot was free for adapter {name!r}"
                pins.append((name, lora_slot))
        finally:
            if len(pins) < len(keys):  # not all pinned: give back what was
                for name, lora_slot in pins:
                    self.cache.release(name, lora_slot)
        seq.lora_pins = pins
        return None

    def composition_check(self, components: tuple[tuple[str, float], ...]) -> None:
        """Refuse what cannot be composed: unknown names (AdapterNotFoundError, 404), DoRA components
        (ConfigError, 400: DoRA renormalises each output row by ||W + BA||, so deltas do not add linearly),
        more distinct components than `max_loras` slots (never admissible)."""
        for name, _ in components:
            self.check_adapter(name)
        if len(components) > self.max_loras:
            raise ConfigError(f"a request composing {len(components)} adapters needs {len(components)} slots; "
                              f"this engine has max_loras={self.max_loras}")
        for name, _ in components:
            if self.cache.is_dora(name):
                raise ConfigError(f"adapter {name!r} is a DoRA adapter and cannot be composed: DoRA rescales each "
                                  "output row by its norm, so weighted deltas do not add up linearly",
                                  hint="serve it alone, or merge offline with mlora merge")

    def release(self, seq: Sequence) -> None:
        """Unpin `seq`'s adapters (it finished or was preempted); a second call does nothing."""
        pins, seq.lora_pins = seq.lora_pins, []
        for name, lora_slot in pins:
            self.cache.release(name, lora_slot)

    def finish(self, seq: Sequence) -> None:
        """`seq` finished: unpin and unbind its adapter versions (a retired version may then go)."""
        self.release(seq)
        if seq.adapter_version is not None:
            self.cache.unbind(seq.adapter_version)
            seq.adapter_version = None
        for version in seq.component_versions or ():
            self.cache.unbind(version)
        seq.component_versions = None

    # -- per step ----------------------------------------------------------------------------
    def step_inputs(self, out: SchedulerOutput) -> LoraStep | None:
        """The one place that decides "no adapter in this step" (None); else each scheduled item's
        lora_slot (-1 = base model, or composed: its (lora_slot, weight) pairs are in `compose`)."""
        seqs = [it.seq for it in out.scheduled]
        lora_slots = [s.lora_pins[0][1] if s.lora_pins and not s.components else -1 for s in seqs]
        compose = {i: tuple((lora_slot, w) for (_, lora_slot), (_, w) in zip(s.lora_pins, s.components))
                   for i, s in enumerate(seqs) if s.components}  # fmt: skip
        if not compose and all(lora_slot < 0 for lora_slot in lora_slots):
            return None
        return LoraStep(lora_slots=lora_slots, compose=compose or None, stacks=self.slots)

    def after_step(self, scheduler: Scheduler) -> None:
        """Prefetch (disk -> CPU, background) the adapters that waiting requests need, when loads are slow
        enough for that to pay (or not measured yet); `prefetch` skips those already in a slot."""
        if scheduler.waiting and self.prefetch_pays():
            self.cache.prefetch(scheduler.waiting_adapters())

    def prefetch_pays(self) -> bool:
        """Whether a background load hides more than it costs: disk loads typically take >= PREFETCH_MIN_LOAD_S."""
        typical = self.cache.typical_load_seconds()
        return typical is None or typical >= PREFETCH_MIN_LOAD_S

    # -- metrics -----------------------------------------------------------------------------
    def fill_stats(self, s: EngineStats) -> None:
        st = self.cache.stats()
        s.lora_loads = st.device_loads
        s.lora_evictions = st.device_evictions
        s.lora_load_seconds = self.cache.drain_load_seconds()
        s.lora_slot_load_seconds = self.cache.drain_slot_load_seconds()
        s.resident_adapters = self.cache.resident()
        s.max_loras = self.max_loras

    def close(self) -> None:
        self.cache.close()
