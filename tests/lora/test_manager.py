"""AdapterCache tier bookkeeping with fake loaders/slot writers: no torch, milliseconds."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections import OrderedDict

import pytest

from engine.errors import AdapterError, AdapterNotFoundError, ConfigError
from engine.lora.manager import AdapterCache


class FakeDevice:
    """A loader + slot writer pair: adapters are (name, path) tuples, slots a list."""

    def __init__(self, max_loras: int) -> None:
        self.slots: list[tuple[str, str] | None] = [None] * max_loras
        self.loads: list[str] = []
        self.cleared: list[int] = []
        self.gate: threading.Event | None = None  # when set, loads block until it is set
        self.lock = threading.Lock()

    def load(self, name: str, path: str) -> tuple[str, str]:
        if self.gate is not None:
            assert self.gate.wait(5)
        with self.lock:
            self.loads.append(path)
        if "bad" in path:
            raise AdapterError(f"adapter {name!r} at {path}: not a LoRA adapter")
        return (name, path)

    def write(self, slot: int, adapter: tuple[str, str]) -> None:
        self.slots[slot] = adapter

    def clear(self, slot: int) -> None:
        self.cleared.append(slot)
        self.slots[slot] = None


def make(max_loras: int = 2, max_cpu: int = 3) -> tuple[AdapterCache, FakeDevice]:
    dev = FakeDevice(max_loras)
    cache = AdapterCache(max_loras=max_loras, max_cpu_loras=max_cpu, loader=dev.load,
                         slot_writer=dev.write, slot_clearer=dev.clear)
    return cache, dev


def test_manager_imports_no_torch() -> None:
    code = "import sys, engine.lora.manager, engine.lora; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_config_checked() -> None:
    with pytest.raises(ConfigError, match="max_cpu_loras"):
        make(max_loras=4, max_cpu=2)
    with pytest.raises(ConfigError, match="max_loras"):
        make(max_loras=0, max_cpu=2)


def test_lru_device_eviction_writes_slot() -> None:
    cache, dev = make(2, 3)
    for n in "abc":
        cache.register(n, f"/p/{n}")
    sa = cache.acquire("a"); cache.release("a")
    sb = cache.acquire("b"); cache.release("b")
    assert {sa, sb} == {0, 1} and dev.slots[sa] == ("a", "/p/a")
    assert cache.acquire("a") == sa; cache.release("a")  # hit: a becomes MRU
    sc = cache.acquire("c"); cache.release("c")
    assert sc == sb and dev.slots[sc] == ("c", "/p/c")  # b was least recently used
    assert cache.resident() == ["a", "c"] and cache.slot_of("b") is None
    s = cache.stats()
    assert (s.device_hits, s.device_misses, s.device_evictions, s.device_loads) == (1, 3, 1, 3)
    with pytest.raises(AdapterNotFoundError, match="'zzz' is not registered"):
        cache.acquire("zzz")


def test_invalid_adapter_evicts_nothing() -> None:
    cache, dev = make(2, 2)
    for n in "ab":
        cache.register(n, f"/p/{n}")
    sa = cache.acquire("a")  # a request is running on a
    cache.acquire("b"); cache.release("b")
    before = (cache.resident(), cache.cpu_resident(), list(dev.slots), cache.stats().cpu_evictions, cache.pins())
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        cache.register("c", "/bad/c")
    with pytest.raises(AdapterError):  # a bad replacement keeps the old version serving
        cache.register("a", "/bad/a2")
    assert (cache.resident(), cache.cpu_resident(), list(dev.slots), cache.stats().cpu_evictions, cache.pins()) == before
    assert "c" not in cache and cache.path_of("a") == "/p/a"
    assert cache.stats().load_failures == 2
    assert cache.acquire("a") == sa and dev.slots[sa] == ("a", "/p/a")
    cache.release("a", sa); cache.release("a", sa)
    assert cache.pins() == {}


def test_pinned_adapter_never_evicted() -> None:
    cache, dev = make(2, 4)
    for n in "abcd":
        cache.register(n, f"/p/{n}")
    sa, sb = cache.acquire("a"), cache.acquire("b")
    assert cache.acquire("c") is None and cache.stats().blocked == 1
    assert not cache.can_acquire("c") and cache.can_acquire("a")
    assert cache.acquire("a") == sa  # a second request on a resident adapter is fine
    assert cache.pins() == {"a": 2, "b": 1}
    cache.release("b")
    assert cache.acquire("c") == sb and dev.slots[sb] == ("c", "/p/c")
    assert cache.acquire("d") is None  # a is pinned twice, c once
    cache.release("a")
    assert cache.acquire("d") is None  # still one request on a
    cache.release("a")
    assert cache.acquire("d") == sa and dev.slots[sa] == ("d", "/p/d")


def test_cpu_tier_never_drops_slot_residents() -> None:
    cache, dev = make(2, 2)
    cache.register("a", "/p/a"); cache.register("b", "/p/b")
    cache.acquire("a"); cache.acquire("b")
    cache.register("c", "/p/c")  # CPU full of slot residents: c is not kept in CPU
    assert cache.cpu_resident() == ["a", "b"] and cache.stats().cpu_evictions == 0
    cache.release("a")
    dev.loads.clear()
    s = cache.acquire("c")  # evicts a from its slot, c comes from disk, a leaves the CPU tier
    assert dev.slots[s] == ("c", "/p/c") and dev.loads == ["/p/c"]
    assert cache.cpu_resident() == ["b", "c"] and cache.resident() == ["b", "c"]


def test_replacement_waits_for_inflight_requests() -> None:
    cache, dev = make(2, 3)
    cache.register("a", "/p/a1")
    s_old = cache.acquire("a")
    cache.register("a", "/p/a2")  # in-flight request keeps the old weights in its slot
    assert dev.slots[s_old] == ("a", "/p/a1") and cache.slot_of("a") is None
    s_new = cache.acquire("a")  # a new request gets the new version
    assert s_new != s_old and dev.slots[s_new] == ("a", "/p/a2")
    assert cache.pins() == {"a": 2}
    with pytest.raises(ValueError, match="pass the slot"):
        cache.release("a")
    cache.release("a", s_old)  # old version's last request: its slot is freed
    assert dev.cleared == [s_old] and cache.resident() == ["a"] and cache.slot_of("a") == s_new
    cache.release("a")
    # unpinned replacement takes effect at once
    cache.register("a", "/p/a3")
    assert cache.slot_of("a") is None and dev.cleared == [s_old, s_new]
    assert dev.slots[cache.acquire("a")] == ("a", "/p/a3")


def test_remove_lets_running_requests_finish() -> None:
    cache, dev = make(2, 3)
    cache.register("a", "/p/a")
    s = cache.acquire("a")
    cache.remove("a")
    with pytest.raises(AdapterNotFoundError):
        cache.acquire("a")
    with pytest.raises(AdapterNotFoundError):
        cache.remove("a")
    assert dev.slots[s] == ("a", "/p/a") and cache.resident() == []
    cache.release("a", s)
    assert dev.cleared == [s] and cache.names() == []


def test_disk_failure_at_acquire_leaves_slots_alone() -> None:
    cache, dev = make(1, 1)
    cache.register("a", "/p/a")
    cache.register("b", "/p/b")  # evicts a from the CPU tier
    sb = cache.acquire("b"); cache.release("b")
    cache._current["a"].path = "/bad/a"  # the file went bad on disk after registration
    with pytest.raises(AdapterError):
        cache.acquire("a")
    assert cache.resident() == ["b"] and dev.slots[sb] == ("b", "/p/b")


def simulate(names: list[str], requests: list[str], max_loras: int, max_cpu: int) -> dict[str, int]:
    """An independent textbook two-level LRU: register loads into CPU, each request touches
    the device LRU and the CPU LRU (device contents = the max_loras most recent)."""
    cpu: OrderedDict[str, None] = OrderedDict()
    dev: OrderedDict[str, None] = OrderedDict()
    c = dict(disk_loads=0, device_loads=0, cpu_evictions=0, device_evictions=0, device_hits=0, cpu_hits=0)

    def cpu_put(n: str) -> None:
        if len(cpu) >= max_cpu:
            cpu.popitem(last=False)
            c["cpu_evictions"] += 1
        cpu[n] = None
        c["disk_loads"] += 1

    for n in names:
        cpu_put(n)
    for n in requests:
        if n in dev:
            c["device_hits"] += 1
            dev.move_to_end(n); cpu.move_to_end(n)
            continue
        if len(dev) >= max_loras:
            dev.popitem(last=False)
            c["device_evictions"] += 1
        if n in cpu:
            c["cpu_hits"] += 1
            cpu.move_to_end(n)
        else:
            cpu_put(n)
        dev[n] = None
        c["device_loads"] += 1
    return c


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counters_match_independent_lru_simulation(seed: int) -> None:
    names = [f"ad{i}" for i in range(6)]
    rng = random.Random(seed)
    weights = [6, 3, 2, 1, 1, 1] if seed else [1] * 6  # uniform and skewed popularity
    requests = rng.choices(names, weights=weights, k=60)
    cache, dev = make(2, 3)
    for n in names:
        cache.register(n, f"/p/{n}")
    for n in requests:
        s = cache.acquire(n)
        assert s is not None and dev.slots[s] == (n, f"/p/{n}")
        cache.release(n, s)
    want = simulate(names, requests, 2, 3)
    st = cache.stats()
    assert {k: getattr(st, k) for k in want} == want
    assert st.device_misses == st.device_loads == st.cpu_hits + st.cpu_misses
    assert len(dev.loads) == want["disk_loads"] and len(st.disk_load_seconds) == want["disk_loads"]


def test_prefetch_loads_ahead_and_acquire_reuses_it() -> None:
    cache, dev = make(2, 3)
    for n in "abcd":
        cache.register(n, f"/p/{n}")  # CPU now holds b, c, d
    dev.loads.clear()
    assert cache.prefetch(["a"], background=False) == 1
    assert cache.cpu_resident()[-1] == "a" and dev.loads == ["/p/a"]
    s = cache.acquire("a")
    assert dev.slots[s] == ("a", "/p/a") and dev.loads == ["/p/a"] and cache.stats().cpu_hits == 1
    cache.close()


def test_acquire_waits_for_inflight_prefetch_instead_of_reloading() -> None:
    cache, dev = make(2, 3)
    for n in "abcd":
        cache.register(n, f"/p/{n}")
    dev.loads.clear()
    dev.gate = threading.Event()
    assert cache.prefetch(["a"]) == 1  # background thread blocks in the loader
    assert cache.prefetch(["a"]) == 0  # already in flight
    got: list[int | None] = []
    t = threading.Thread(target=lambda: got.append(cache.acquire("a")))
    t.start()
    dev.gate.set()
    t.join(5)
    cache.close()
    assert got and got[0] is not None and dev.slots[got[0]] == ("a", "/p/a")
    assert dev.loads == ["/p/a"] and cache.stats().cpu_misses == 1


def test_prefetch_only_what_fits_next_to_slot_residents() -> None:
    cache, dev = make(2, 3)
    for n in "abcdef":
        cache.register(n, f"/p/{n}")
    cache.acquire("e"); cache.acquire("f")  # pinned residents use 2 of 3 CPU places
    assert cache.prefetch(["a", "b", "c", "zzz"], background=False) == 1
    assert cache.cpu_resident() == ["e", "f", "a"]


def test_concurrent_acquire_release_prefetch_keep_invariants() -> None:
    cache, dev = make(3, 4)
    names = [f"n{i}" for i in range(8)]
    for n in names:
        cache.register(n, f"/p/{n}")
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                n = rng.choice(names)
                if rng.random() < 0.2:
                    cache.prefetch(rng.sample(names, 3))
                s = cache.acquire(n)
                if s is not None:
                    assert dev.slots[s] == (n, f"/p/{n}")
                    cache.release(n, s)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    cache.close()
    assert not errors, errors
    assert cache.pins() == {} and len(cache.resident()) <= 3 and len(cache.cpu_resident()) <= 4
    assert set(cache.resident()) <= set(cache.cpu_resident())
