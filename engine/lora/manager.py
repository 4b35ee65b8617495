"""Adapter tiers: device slots (LRU) <- CPU cache (LRU) <- disk. Pure bookkeeping, no torch.

`AdapterCache` decides *where* each registered adapter lives and *which slot* a request
uses; the heavy lifting is injected so this module stays torch-free and tests run in
milliseconds with fakes:

    loader(name, path) -> adapter      disk -> CPU: read, validate, check servability.
                                       Raises an `MloraError` (AdapterError) for a bad adapter.
    inspector(name, path) -> manifest  optional: registration from config + header only (no
                                       tensor data; `manifest.header_only`, nothing enters the
                                       CPU tier). With it, loads call `loader(name, path, known)`,
                                       `known` the fingerprint recorded so far (see below).
    slot_writer(slot, adapter) -> None CPU -> device: copy weights into slot `slot`
                                       (e.g. `LoraSlots.set_slot`).
    slot_clearer(slot) -> None         optional: called when a slot is freed without a
                                       new occupant (e.g. `LoraSlots.reset_slot`).

Rules (after vLLM's adapter manager):
  * `register` loads and validates FIRST; an invalid adapter changes nothing (no eviction,
    no replacement).
  * An adapter pinned by a running request (`acquire` .. `release`) is never evicted.
  * The device tier is a subset of the CPU tier: the CPU LRU only evicts adapters that are
    not in a slot, so `max_cpu_loras >= max_loras` always leaves room.
  * The CPU tier holds `max_cpu_loras` adapters, and more while their weights (`adapter.nbytes`)
    total at most `max_cpu_lora_bytes` (0, the default here: a count only, vLLM's `max_cpu_loras`):
    many small adapters stay in memory where a count sized for large ones would re-read them.
  * Replacing a name (`register` again) or `remove` retires the old *version*: requests
    that already hold it keep its slot until they `release`; new `acquire`s get the new
    version (its own slot). A retired version's slot is freed at its last release. So a
    replacement takes effect "once in-flight requests finish" without stalling new ones.
  * Versions, not names, are what a request runs on. `bind_current(name)` (at admission, no I/O)
    or `bind(slot)` ties a request to the
    version it was admitted with (a version id) until `unbind`; a preempted request re-acquires
    `acquire(name, version=vid)` and gets those same weights, even if the name was replaced or
    removed meanwhile. A bound retired version keeps its CPU copy (not evicted: its files may
    be gone) and is dropped at its last unbind; if it had already left the CPU tier before the
    replace, it is re-read (and checked, below) or its requests fail cleanly.
  * Adapters are immutable once registered. The loader's adapter may carry a `fingerprint`
    (content digest + the real paths of the files read); a re-read from disk (after eviction
    from the CPU tier) must reproduce it exactly, else the version is marked broken
    (AdapterChangedError for every later acquire of it, until the name is registered again)
    and the changed weights are never served. A header-level fingerprint (digest None: the
    inspector's) must be matched by the first load's `facts` and files; that load's full
    fingerprint is then kept and rules every later re-read.
  * `acquire` returns None (the request waits) when the adapter is not resident and every
    slot is pinned.

Thread safety: one lock guards all state. Disk loads run outside the lock (in the caller's
thread or the prefetch thread); a load already in flight is awaited, never repeated.
`typical_load_seconds()` (a moving average of recent disk loads) lets the caller decide whether a
background prefetch pays (engine.lora.engine: not for loads shorter than the GIL hand-offs it costs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from engine.errors import AdapterError, AdapterNotFoundError, ConfigError

log = logging.getLogger(__name__)
LOAD_EMA_WEIGHT = 0.2  # weight of the newest disk load in `typical_load_seconds` (about the last 5 loads)


class AdapterChangedError(AdapterError):
    """A registered adapter's files no longer give the bytes (or the files) it was registered with."""

    detail: str = ""  # what differs (may name server paths: for the log, not for clients)


class AdapterVersionGoneError(AdapterNotFoundError):
    """The adapter version a request was bound to no longer exists (it was replaced or unloaded)."""


def _inside(path: str, root: str) -> bool:
    """Pure string check (no I/O): `path` is `root` or below it (both already resolved)."""
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def check_same(name: str, registered: Any, got: Any) -> None:
    """AdapterChangedError unless `got` (a fresh read's fingerprint) is the adapter `registered`:
    the same real files and, for a header-level `registered` (digest None), the same config and
    header `facts`, else the same content digest. No-op when nothing was registered."""
    if registered is None or got == registered:
        return
    old_files, new_files = getattr(registered, "files", None), getattr(got, "files", None)
    if old_files is not None and new_files != old_files:
        detail = f"its files now resolve to {', '.join(map(str, new_files or ()))}, not {', '.join(map(str, old_files))}"
    elif getattr(registered, "digest", "") is None:  # registered from the header: facts must hold
        if getattr(got, "facts", None) == registered.facts:
            return
        detail = "its config or safetensors header differ from what was registered"
    else:
        detail = "its contents differ"
    err = AdapterChangedError(  # the message reaches clients: no server paths in it (they go to the log)
        f"adapter {name!r} changed on disk since it was registered; it is not served until it is loaded again",
        hint="adapter files must not change after registration; load a new version under the same name to replace it",
    )
    err.detail = detail
    raise err


def _check_confined(name: str, adapter: Any, root: str) -> None:
    files = getattr(getattr(adapter, "fingerprint", None), "files", None)
    if files is None:
        raise AdapterError(f"adapter {name!r}: cannot tell which files were read, so it cannot be confined to {root}")
    outside = [f for f in files if not _inside(str(f), root)]
    if outside:
        raise AdapterError(f"adapter {name!r}: {outside[0]} lies outside the adapter root {root} (a symlink?)")


Loader = Callable[[str, str], Any]
SlotWriter = Callable[[int, Any], None]
SlotClearer = Callable[[int], None]


@dataclass
class CacheStats:
    """Counters since the cache was built (the server exports these)."""

    disk_loads: int = 0  # disk -> CPU loads (register, prefetch, acquire), successful
    device_loads: int = 0  # CPU -> slot copies
    cpu_evictions: int = 0  # adapters dropped from the CPU tier to make room
    device_evictions: int = 0  # adapters dropped from a slot to make room
    device_hits: int = 0  # acquire found the adapter already in a slot
    device_misses: int = 0  # acquire had to fill a slot
    cpu_hits: int = 0  # ... from the CPU tier
    cpu_misses: int = 0  # ... after a disk load (its own or an in-flight prefetch)
    blocked: int = 0  # acquire returned None: every slot pinned
    load_failures: int = 0  # loader raised
    disk_load_seconds: list[float] = field(default_factory=list)
    device_load_seconds: list[float] = field(default_factory=list)


@dataclass(eq=False)
class _Version:
    """One registered incarnation of a name (identity-hashed)."""

    name: str
    path: str
    vid: int = 0  # version id, unique per cache
    fingerprint: Any = None  # the loader's adapter.fingerprint at registration (None: not checked)
    adapter: Any = field(default=None, repr=False)  # CPU copy; None = on disk only
    slot: int | None = None
    pins: int = 0  # requests running on its slot now
    bindings: int = 0  # requests admitted on this version and not finished (running or preempted)
    retired: bool = False
    broken: str | None = None  # why a re-read was refused; acquire raises AdapterChangedError
    dora: bool = False  # the loader's adapter had DoRA magnitudes (it cannot be composed with others)
    # What this version's prefix-cache key carries besides its id, fixed at registration: the content digest,
    # or for a header-level registration the sha256 of its config + header facts (the digest is learnt only at
    # the first load; a key that changed then would stop the version's earlier blocks from ever hitting).
    cache_key: str | None = None
    nbytes: int = 0  # size of `adapter` while it is in the CPU tier (its `nbytes`; 0 when it has none)


class AdapterCache:
    """Registry name -> path plus the CPU and device LRU tiers and per-adapter pins."""

    def __init__(
        self,
        *,
        max_loras: int,
        max_cpu_loras: int | None = None,
        max_cpu_lora_bytes: int = 0,
        loader: Loader,
        slot_writer: SlotWriter,
        slot_clearer: SlotClearer | None = None,
        inspector: Loader | None = None,
    ) -> None:
        max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        if max_loras < 1:
            raise ConfigError(f"max_loras must be >= 1, got {max_loras}")
        if max_cpu_loras < max_loras:
            raise ConfigError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras})")
        if max_cpu_lora_bytes < 0:
            raise ConfigError(f"max_cpu_lora_bytes must be >= 0, got {max_cpu_lora_bytes}")
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_cpu_lora_bytes = max_cpu_lora_bytes
        self._loader = loader
        self._inspector = inspector
        self._writer = slot_writer
        self._clearer = slot_clearer
        self._lock = threading.RLock()
        self._current: dict[str, _Version] = {}
        self._versions: dict[int, _Version] = {}  # live versions: current ones + retired but bound/pinned
        self._next_vid = 1
        self._cpu: OrderedDict[_Version, None] = OrderedDict()  # LRU first, MRU last
        self._cpu_bytes = 0  # sum of `nbytes` over the CPU tier
        self._load_ema: float | None = None  # typical_load_seconds()
        self._device: OrderedDict[_Version, None] = OrderedDict()  # current versions in a slot
        self._slots: list[_Version | None] = [None] * max_loras
        self._inflight: dict[_Version, Future] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._stats = CacheStats()

    # ------------------------------------------------------------------ registry
    def register(self, name: str, path: str, *, root: str | None = None, eager: bool = True) -> None:
        """Validate and load `path` as adapter `name`; replace an existing `name` (see module doc).

        With `root` (an already resolved directory), every file the loader actually read (its
        adapter's `fingerprint.files`) must lie inside it: a path checked by the caller and then
        swapped for a symlink before the load is caught here.
        With an inspector and `eager=False` (bulk registration at startup), only the config and
        header are read (no disk load is counted); the tensors are read, validated and hashed at the
        first `acquire`/`prefetch`. `eager` (one adapter added at runtime): the full load follows the
        header check at once, so a bad value is refused here, and it must find what the header showed.
        Raises the loader's error (AdapterError) and changes nothing when the adapter is bad.
        """
        path = str(path)
        t0 = time.perf_counter()
        try:
            adapter = (self._inspector or self._loader)(name, path)
            if root is not None:
                _check_confined(name, adapter, root)
            if eager and getattr(adapter, "header_only", False):
                known = adapter.fingerprint
                adapter = self._loader(name, path, known)
                check_same(name, known, getattr(adapter, "fingerprint", None))  # also the files: still confined
        except Exception:
            with self._lock:
                self._stats.load_failures += 1
            raise
        dt = time.perf_counter() - t0
        header_only = bool(getattr(adapter, "header_only", False))
        with self._lock:
            if not header_only:
                self._stats.disk_loads += 1
                self._record_load(dt)
            old = self._current.get(name)
            fp = getattr(adapter, "fingerprint", None)
            ver = _Version(name, path, vid=self._next_vid, fingerprint=fp, dora=bool(getattr(adapter, "dora", None)),
                           cache_key=getattr(fp, "digest", None) or getattr(fp, "facts", None))
            self._next_vid += 1
            self._current[name] = ver
            self._versions[ver.vid] = ver
            if old is not None:
                self._retire(old)
            if not header_only:
                self._cpu_insert(ver, adapter)

    def remove(self, name: str) -> None:
        """Unregister `name`; running requests that hold it finish on its slot."""
        with self._lock:
            ver = self._current.pop(name, None)
            if ver is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered")
            self._retire(ver)

    def names(self) -> list[str]:
        """Registered adapter names, in registration order."""
        with self._lock:
            return list(self._current)

    def is_dora(self, name: str) -> bool:
        """Whether the current version of `name` is a DoRA adapter (AdapterNotFoundError if not registered)."""
        with self._lock:
            return self._version(name).dora

    def path_of(self, name: str) -> str:
        with self._lock:
            return self._version(name).path

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._current

    # ------------------------------------------------------------------ serving
    def acquire(self, name: str, version: int | None = None) -> int | None:
        """Make `name` (its current version, or the bound `version`) resident in a slot and pin
        it for one request; return the slot.

        Returns None when it is not resident and every slot is pinned (the request waits).
        Raises AdapterNotFoundError for an unknown name, AdapterVersionGoneError for a version
        that no longer exists, AdapterChangedError if the files changed since registration, the
        loader's error if the disk copy went bad.
        """
        loaded: tuple[_Version, Any] | None = None  # an adapter this call waited for
        while True:
            with self._lock:
                ver = self._version(name) if version is None else self._bound_version(name, version)
                if ver.broken is not None:
                    raise AdapterChangedError(ver.broken)
                if ver.slot is not None:
                    self._touch(ver)
                    ver.pins += 1
                    self._stats.device_hits += 1
                    return ver.slot
                pick = self._pick_slot()
                if pick is None:
                    self._stats.blocked += 1
                    return None
                src = ver.adapter
                if src is None and loaded is not None and loaded[0] is ver:
                    src = loaded[1]  # evicted from CPU again between load and now: use ours
                if src is not None:
                    self._install(ver, *pick, src)
                    ver.pins += 1
                    self._stats.device_misses += 1
                    if loaded is None:
                        self._stats.cpu_hits += 1
                    else:
                        self._stats.cpu_misses += 1
                    return ver.slot
                fut = self._inflight.get(ver)
                owner = fut is None
                if owner:
                    fut = self._inflight[ver] = Future()
            adapter = self._run_load(ver, fut) if owner else fut.result()
            loaded = (ver, adapter)

    def release(self, name: str, slot: int | None = None) -> None:
        """Unpin one request's hold on `name` (pass the slot `acquire` returned when a
        replacement may have happened while the request ran)."""
        with self._lock:
            if slot is not None:
                ver = self._slots[slot] if 0 <= slot < self.max_loras else None
                if ver is None or ver.name != name or ver.pins <= 0:
                    raise ValueError(f"slot {slot} is not held for adapter {name!r}")
            else:
                held = [v for v in self._slots if v is not None and v.name == name and v.pins > 0]
                if len(held) != 1:
                    raise ValueError(
                        f"adapter {name!r} has {len(held)} pinned versions; pass the slot to release"
                    )
                ver = held[0]
            ver.pins -= 1
            if ver.pins == 0 and ver.retired:
                self._free_slot(ver)
                self._maybe_drop(ver)

    def bind(self, slot: int) -> int:
        """Bind one request to the version now pinned in `slot` (it `acquire`d it); returns the
        version id to pass to later `acquire(name, version=...)` calls, e.g. after preemption."""
        with self._lock:
            ver = self._slots[slot] if 0 <= slot < self.max_loras else None
            if ver is None or ver.pins <= 0:
                raise ValueError(f"slot {slot} is not pinned")
            ver.bindings += 1
            return ver.vid

    def bind_current(self, name: str) -> int | None:
        """Bind one request that has not run yet to the current version of `name` (at its admission,
        before anything is loaded: no I/O); returns its version id, or None when `acquire(name)` would
        raise (unknown name, changed files), so the request ends when it is activated."""
        with self._lock:
            ver = self._current.get(name)
            if ver is None or ver.broken is not None:
                return None
            ver.bindings += 1
            return ver.vid

    def unbind(self, version: int) -> None:
        """The request bound to `version` finished: a retired version may now be dropped."""
        with self._lock:
            ver = self._versions.get(version)
            if ver is None or ver.bindings <= 0:  # never raise on the engine's finish path
                log.error("unbind of adapter version %s that is not bound", version)
                return
            ver.bindings -= 1
            self._maybe_drop(ver)

    def digest_of(self, version: int) -> str | None:
        """The content digest a live version was registered with (None if unknown or not fingerprinted)."""
        with self._lock:
            ver = self._versions.get(version)
            return getattr(ver.fingerprint, "digest", None) if ver is not None else None

    def cache_key_of(self, version: int) -> str | None:
        """A live version's prefix-cache key part (`_Version.cache_key`: stable for the version's life)."""
        with self._lock:
            ver = self._versions.get(version)
            return ver.cache_key if ver is not None else None

    def version_of(self, name: str) -> int:
        """The current version id of `name` (AdapterNotFoundError if not registered)."""
        with self._lock:
            return self._version(name).vid

    def prefetch(self, names: Iterable[str], *, background: bool = True) -> int:
        """Start disk -> CPU loads for `names` (highest priority first) so a later `acquire`
        skips the disk. Loads only what fits in the CPU tier next to the adapters that are in
        slots; unknown names are ignored. Returns the number of loads started."""
        todo: list[tuple[_Version, Future]] = []
        with self._lock:
            room = self.max_cpu_loras - sum(1 for v in self._cpu if v.slot is not None)
            seen: set[str] = set()
            for name in names:
                ver = self._current.get(name)
                if ver is None or name in seen or ver.slot is not None or ver.broken is not None:
                    continue
                seen.add(name)
                if room <= 0:
                    break
                room -= 1
                if ver.adapter is not None:
                    self._cpu.move_to_end(ver)
                elif ver not in self._inflight:
                    fut = self._inflight[ver] = Future()
                    todo.append((ver, fut))
            if todo and background and self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlora-prefetch")
        for ver, fut in todo:
            if background:
                assert self._executor is not None
                self._executor.submit(self._run_load_quiet, ver, fut)
            else:
                self._run_load_quiet(ver, fut)
        return len(todo)

    def close(self) -> None:
        """Wait for background prefetches and stop the prefetch thread."""
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True)

    # ------------------------------------------------------------------ queries
    def slot_of(self, name: str) -> int | None:
        """The slot holding the current version of `name`, or None."""
        with self._lock:
            ver = self._current.get(name)
            return None if ver is None else ver.slot

    def can_acquire(self, name: str, version: int | None = None, *, claimed: Iterable[tuple[str, int | None]] = ()) -> bool:
        """Whether `acquire(name, version)` would not wait for a slot, once the `claimed` (name, version)
        pairs (what this step's earlier admissions will acquire first) hold theirs. No side effects, no I/O.

        True too when `acquire` would raise (unknown name, gone version, changed files): the request is
        then ended where it is activated, with that error, instead of waiting for a slot forever.
        Every acquired version ends pinned in its own slot, so the acquires succeed in any order iff
        the versions not pinned yet fit in the slots not pinned now."""
        with self._lock:
            ver = self._lookup(name, version)
            if ver is None:
                return True
            if ver.slot is not None and not claimed:
                return True
            need = {ver}
            for n, v in claimed:
                other = self._lookup(n, v)
                if other is not None:
                    need.add(other)
            unpinned = sum(1 for v in self._slots if v is None or v.pins == 0)
            return sum(1 for v in need if v.slot is None or v.pins == 0) <= unpinned

    def _lookup(self, name: str, version: int | None) -> _Version | None:
        """The version `acquire(name, version)` would pin; None when it would raise instead."""
        ver = self._current.get(name) if version is None else self._versions.get(version)
        if ver is None or ver.name != name or ver.broken is not None:
            return None
        return ver

    def resident(self) -> list[str]:
        """Names whose current version is in a slot, least recently used first."""
        with self._lock:
            return [v.name for v in self._device]

    def cpu_resident(self) -> list[str]:
        """Names whose current version is in the CPU tier, least recently used first.

        (test/inspection accessor: the engine never asks; tests check the CPU tier's LRU order and what
        registering or unloading left in it, which the stats counters cannot tell apart.)"""
        with self._lock:
            return [v.name for v in self._cpu]

    def pins(self) -> dict[str, int]:
        """Running requests per adapter name (all versions).

        (test/inspection accessor: the engine never asks; tests check that every pin is released exactly
        once, which no public counter shows: the scheduler's running counts come from the requests.)"""
        with self._lock:
            out: dict[str, int] = {}
            for v in self._slots:
                if v is not None and v.pins:
                    out[v.name] = out.get(v.name, 0) + v.pins
            return out

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            s = self._stats
            return replace(s, disk_load_seconds=list(s.disk_load_seconds), device_load_seconds=list(s.device_load_seconds))

    def typical_load_seconds(self) -> float | None:
        """A moving average of recent disk -> CPU load durations (wall clock; None before the first)."""
        with self._lock:
            return self._load_ema

    def drain_load_seconds(self) -> list[float]:
        """Disk load durations recorded since the last call (for a histogram exporter)."""
        with self._lock:
            out, self._stats.disk_load_seconds = self._stats.disk_load_seconds, []
            return out

    def drain_slot_load_seconds(self) -> list[float]:
        """Slot load (CPU -> device slot write) durations recorded since the last call."""
        with self._lock:
            out, self._stats.device_load_seconds = self._stats.device_load_seconds, []
            return out

    # ------------------------------------------------------------------ internals
    def _version(self, name: str) -> _Version:
        ver = self._current.get(name)
        if ver is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered")
        return ver

    def _bound_version(self, name: str, vid: int) -> _Version:
        ver = self._versions.get(vid)
        if ver is None or ver.name != name:
            raise AdapterVersionGoneError(
                f"adapter {name!r} (version {vid}) is no longer available: it was replaced or unloaded "
                "while this request was paused"
            )
        return ver

    def _maybe_drop(self, ver: _Version) -> None:
        """Forget a retired version once no request is bound to it or pinned on its slot."""
        if not ver.retired or ver.bindings > 0 or ver.pins > 0:
            return
        if ver in self._cpu:
            self._cpu_remove(ver)
        ver.adapter = None
        if ver.slot is not None:
            self._free_slot(ver)
        self._versions.pop(ver.vid, None)

    def _touch(self, ver: _Version) -> None:
        if ver in self._device:
            self._device.move_to_end(ver)
        if ver in self._cpu:
            self._cpu.move_to_end(ver)

    def _pick_slot(self) -> tuple[int, _Version | None] | None:
        """A free slot, else the least recently used unpinned one (with its occupant)."""
        for i, v in enumerate(self._slots):
            if v is None:
                return i, None
        for v in self._device:
            if v.pins == 0:
                assert v.slot is not None
                return v.slot, v
        return None

    def _install(self, ver: _Version, slot: int, victim: _Version | None, adapter: Any) -> None:
        """Evict `victim` (if any) from `slot`, keep `adapter` in the CPU tier, write the slot."""
        if victim is not None:
            del self._device[victim]
            victim.slot = None
            self._slots[slot] = None
            self._stats.device_evictions += 1
        if ver.adapter is None:
            self._cpu_insert(ver, adapter)
        t0 = time.perf_counter()
        self._writer(slot, adapter)  # on error the slot stays free and the error propagates
        self._stats.device_load_seconds.append(time.perf_counter() - t0)
        self._stats.device_loads += 1
        ver.slot = slot
        self._slots[slot] = ver
        if not ver.retired:  # a retired version's slot is freed at its last release, never LRU-evicted
            self._device[ver] = None
        self._touch(ver)

    def _cpu_fits(self, count: int, nbytes: int) -> bool:
        """Whether a CPU tier of `count` adapters totalling `nbytes` is within its limits."""
        return count <= self.max_cpu_loras or 0 < nbytes <= self.max_cpu_lora_bytes

    def _cpu_insert(self, ver: _Version, adapter: Any) -> bool:
        """Put `adapter` in the CPU tier as MRU, evicting LRU adapters not in a slot until it fits
        (none when it cannot fit even so: then it is not kept, and False is returned)."""
        if ver in self._cpu:
            self._cpu.move_to_end(ver)
            return True
        size = int(getattr(adapter, "nbytes", 0) or 0)
        count, total = len(self._cpu) + 1, self._cpu_bytes + size
        victims: list[_Version] = []
        if not self._cpu_fits(count, total):
            # never an adapter in a slot, nor a replaced version that a paused request still needs
            # (its files may well be gone by now): those leave the CPU tier when their requests end
            for v in self._cpu:
                if v.slot is None and not (v.retired and v.bindings):
                    victims.append(v)
                    count, total = count - 1, total - v.nbytes
                    if self._cpu_fits(count, total):
                        break
            else:
                return False
        for victim in victims:
            self._cpu_remove(victim)
            victim.adapter = None
            self._stats.cpu_evictions += 1
        ver.adapter = adapter
        ver.nbytes = size
        self._cpu[ver] = None
        self._cpu_bytes += size
        return True

    def _cpu_remove(self, ver: _Version) -> None:
        del self._cpu[ver]
        self._cpu_bytes -= ver.nbytes
        ver.nbytes = 0

    def _record_load(self, seconds: float) -> None:
        """Count one disk load's duration (stats and the moving average behind `typical_load_seconds`)."""
        self._stats.disk_load_seconds.append(seconds)
        ema = self._load_ema
        self._load_ema = seconds if ema is None else ema + LOAD_EMA_WEIGHT * (seconds - ema)

    def _retire(self, ver: _Version) -> None:
        """Detach an old version from the registry; its slot lives on while it is pinned, its CPU
        copy while a request is bound to it (see `bind`)."""
        ver.retired = True
        if ver in self._device:
            del self._device[ver]
        if ver.slot is not None and ver.pins == 0:
            self._free_slot(ver)
        self._maybe_drop(ver)

    def _free_slot(self, ver: _Version) -> None:
        slot = ver.slot
        assert slot is not None
        self._slots[slot] = None
        ver.slot = None
        if self._clearer is not None:
            self._clearer(slot)

    def _run_load(self, ver: _Version, fut: Future) -> Any:
        """Disk -> CPU for `ver` in this thread; resolves `fut` for anyone waiting on it."""
        t0 = time.perf_counter()
        try:
            with self._lock:
                known = ver.fingerprint
            adapter = self._loader(ver.name, ver.path) if self._inspector is None else self._loader(ver.name, ver.path, known)
            got = getattr(adapter, "fingerprint", None)
            check_same(ver.name, known, got)
        except BaseException as e:
            with self._lock:
                self._inflight.pop(ver, None)
                self._stats.load_failures += 1
                if isinstance(e, AdapterChangedError):
                    ver.broken = e.message
                    log.error("%s (%s)", e.message, getattr(e, "detail", ""))
            fut.set_exception(e)
            raise
        dt = time.perf_counter() - t0
        with self._lock:
            self._inflight.pop(ver, None)
            self._stats.disk_loads += 1
            self._record_load(dt)
            if getattr(ver.fingerprint, "digest", "") is None:  # first full load: its digest rules from now on
                ver.fingerprint = got
            if ver.vid in self._versions and ver.adapter is None:
                self._cpu_insert(ver, adapter)
        fut.set_result(adapter)
        return adapter

    def _run_load_quiet(self, ver: _Version, fut: Future) -> None:
        try:
            self._run_load(ver, fut)
        except Exception as e:  # the future carries it to any waiting acquire
            log.warning("prefetch of adapter %r failed: %s", ver.name, e)
