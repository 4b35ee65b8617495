"""The engine's multi-LoRA layer: joins the scheduler, the adapter tiers and the runner.

- `LoraSlots` (engine.lora.slots) holds the device stacks the model reads; `AdapterCache`
  (engine.lora.manager) decides which adapter lives in which slot (LRU tiers, pins).
- Each request with an adapter pins it from admission (`acquire`) to finish or preemption
  (`release`), so an adapter in use is never evicted. The scheduler calls these hooks.
- A request is bound to the adapter *version* it was first admitted with (`seq.adapter_version`)
  until it finishes: after a preemption it re-acquires that version, so a replacement (or an
  unload) of the name never changes the weights of an answer already under way. A request that
  never started gets the name's current version, or a clear "was unloaded" error.
- Per step the runner receives one slot index per scheduled sequence (-1 = base model),
  never an adapter name.
- After each step, adapters that waiting requests need are prefetched disk -> CPU in the
  background, so a cold adapter's first token waits only for the CPU -> slot copy.
"""

from __future__ import annotations

from typing import Any

from engine.config import EngineConfig
from engine.errors import AdapterNotFoundError, ConfigError, MloraError
from engine.lora import AdapterCache, LoraSlots
from engine.lora.manager import AdapterChangedError, AdapterVersionGoneError
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.stats import EngineStats


class LoraEngine:
    """Adapter registry + slots for one EngineCore."""

    def __init__(self, config: EngineConfig, runner: Any) -> None:
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
            loader=self.slots.load,
            slot_writer=self.slots.set_slot,
            slot_clearer=self.slots.reset_slot,
        )
        self.max_loras = config.max_loras
        self._held: dict[int, tuple[str, int]] = {}  # id(seq) -> (adapter, slot) while pinned
        self._held_composed: dict[int, list[tuple[str, int]]] = {}  # id(seq) -> [(component, slot), ...] while pinned
        self._failed: list[tuple[Sequence, str]] = []

    # -- registry ----------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str, *, root: str | None = None) -> None:
        """Validate + load into the CPU tier; raises AdapterError and changes nothing if bad.
        `root`: every file actually read must resolve inside this (resolved) directory."""
        self.cache.register(name, path, root=root)

    def remove_adapter(self, name: str) -> None:
        self.cache.remove(name)

    def names(self) -> list[str]:
        return self.cache.names()

    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.cache:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered")

    def resident(self) -> list[str]:
        return self.cache.resident()

    # -- scheduler hooks ---------------------------------------------------------------------
    def acquire(self, seq: Sequence) -> bool:
        """Pin `seq`'s adapter in a slot (loading it if needed); False = no slot free now."""
        if seq.components:
            return self._acquire_composed(seq)
        if seq.adapter is None:
            return True
        try:
            slot = self.cache.acquire(seq.adapter, version=seq.adapter_version)
        except (AdapterVersionGoneError, AdapterChangedError) as e:
            self._fail(seq, e.message)
            return False
        except AdapterNotFoundError:  # unloaded while this request waited for its first step
            self._fail(seq, f"adapter {seq.adapter!r} was unloaded before this request started")
            return False
        except MloraError as e:  # e.g. the files went bad after registration: fail this request only
            self._fail(seq, f"adapter {seq.adapter!r} could not be loaded: {e}")
            return False
        if slot is None:
            return False
        if seq.adapter_version is None:
            seq.adapter_version = self.cache.bind(slot)
            seq.adapter_digest = self.cache.digest_of(seq.adapter_version)  # the prefix-cache key (block_manager)
        self._held[id(seq)] = (seq.adapter, slot)
        return True

    def _acquire_composed(self, seq: Sequence) -> bool:
        """Pin every component (each bound to its own version, as a single adapter is); all or none."""
        held: list[tuple[str, int]] = []
        versions = seq.component_versions or [None] * len(seq.components)
        try:
            for (name, _), version in zip(seq.components, versions):
                try:
                    slot = self.cache.acquire(name, version=version)
                except (AdapterVersionGoneError, AdapterChangedError) as e:
                    self._fail(seq, e.message)
                    return False
                except AdapterNotFoundError:
                    self._fail(seq, f"adapter {name!r} was unloaded before this request started")
                    return False
                except MloraError as e:
                    self._fail(seq, f"adapter {name!r} could not be loaded: {e}")
                    return False
                if slot is None:
                    return False
                held.append((name, slot))
        finally:
            if len(held) < len(seq.components):  # not all pinned: give back what was
                for name, slot in held:
                    self.cache.release(name, slot)
        if seq.component_versions is None:
            seq.component_versions = [self.cache.bind(slot) for _, slot in held]
            seq.component_digests = [self.cache.digest_of(v) for v in seq.component_versions]  # prefix-cache key
        self._held_composed[id(seq)] = held
        return True

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

    def _fail(self, seq: Sequence, message: str) -> None:
        if all(s is not seq for s, _ in self._failed):
            self._failed.append((seq, message))

    def take_failed(self) -> list[tuple[Sequence, str]]:
        """Requests whose adapter failed to load during the last schedule()."""
        out, self._failed = self._failed, []
        return out

    def release(self, seq: Sequence) -> None:
        held = self._held.pop(id(seq), None)
        if held is not None:
            self.cache.release(held[0], held[1])
        for name, slot in self._held_composed.pop(id(seq), ()):
            self.cache.release(name, slot)

    def on_finish(self, seq: Sequence) -> None:
        self.release(seq)
        if seq.adapter_version is not None:
            self.cache.unbind(seq.adapter_version)
            seq.adapter_version = None
        for version in seq.component_versions or ():
            self.cache.unbind(version)
        seq.component_versions = None

    # -- per step ----------------------------------------------------------------------------
    def step_inputs(self, out: SchedulerOutput) -> tuple[list[int] | None, LoraSlots | None]:
        """Slot index per scheduled item (-1 = base or composed); (None, None) for an all-base step."""
        slots = [self._held[id(it.seq)][1] if it.seq.adapter is not None and not it.seq.components else -1
                 for it in out.scheduled]
        if all(s < 0 for s in slots) and not any(it.seq.components for it in out.scheduled):
            return None, None
        return slots, self.slots

    def step_compose(self, out: SchedulerOutput) -> dict[int, tuple[tuple[int, float], ...]] | None:
        """Scheduled item index -> its (lora_slot, weight) pairs, for composed requests; None when there are none."""
        comp = {}
        for i, it in enumerate(out.scheduled):
            if it.seq.components:
                held = self._held_composed[id(it.seq)]
                comp[i] = tuple((slot, w) for (_, slot), (_, w) in zip(held, it.seq.components))
        return comp or None

    def after_step(self, scheduler: Scheduler) -> None:
        """Prefetch (disk -> CPU, background) the adapters that waiting requests need."""
        if scheduler.waiting:
            wanted = [a for a in scheduler.waiting_adapters() if self.cache.slot_of(a) is None]
            if wanted:
                self.cache.prefetch(wanted)

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
