"""The CPU tier sized in bytes (issue 19): it keeps `max_cpu_loras` adapters and more while their weights
fit in `max_cpu_lora_bytes`, so many small adapters are served from memory instead of re-read from disk;
an explicit `max_cpu_loras` stays vLLM's count cap; a re-read after eviction is still checked against the
content hash. Bookkeeping with fakes first (milliseconds), then the real demo engine."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.config import CPU_LORA_BYTES, EngineConfig
from engine.errors import ConfigError, UsageError
from engine.lora import manager
from engine.lora.manager import AdapterCache, AdapterChangedError
from engine.planning.budget_plan import cpu_cache_adapters
from tests.lora.test_isolation import _copy, _run, demo_adapters  # noqa: F401 (demo_adapters: a fixture)


@dataclass(frozen=True)
class Sized:
    name: str
    fingerprint: str
    nbytes: int


class Disk:
    """A loader of adapters of `nbytes` each whose fingerprint is what the fake disk holds now."""

    def __init__(self, nbytes: int, max_loras: int = 1) -> None:
        self.nbytes = nbytes
        self.content: dict[str, str] = {}
        self.loads: list[str] = []
        self.slots: list[Sized | None] = [None] * max_loras

    def load(self, name: str, path: str) -> Sized:
        self.loads.append(name)
        return Sized(name, self.content.setdefault(path, name), self.nbytes)

    def write(self, slot: int, adapter: Sized) -> None:
        self.slots[slot] = adapter


def make(nbytes: int, *, max_loras: int = 1, max_cpu: int = 2, budget: int = 1000) -> tuple[AdapterCache, Disk]:
    disk = Disk(nbytes, max_loras)
    cache = AdapterCache(max_loras=max_loras, max_cpu_loras=max_cpu, max_cpu_lora_bytes=budget,
                         loader=disk.load, slot_writer=disk.write)
    return cache, disk


def served_without_disk(cache: AdapterCache, disk: Disk, names: list[str]) -> list[str]:
    """Which of `names` an acquire serves from the CPU tier (no disk read), acquired in order."""
    out = []
    for n in names:
        before = len(disk.loads)
        cache.release(n, cache.acquire(n))
        if len(disk.loads) == before:
            out.append(n)
    return out


def test_small_adapters_fill_the_byte_budget_beyond_the_count() -> None:
    cache, disk = make(100)  # 2 adapters by count, 10 of 100 bytes by size
    names = [f"a{i}" for i in range(12)]
    for n in names:
        cache.register(n, f"/p/{n}")
    assert cache.stats().cpu_evictions == 2  # a0, a1 made room for a10, a11
    assert served_without_disk(cache, disk, names[2:]) == names[2:]
    assert served_without_disk(cache, disk, ["a0"]) == []  # evicted: read again


def test_large_adapters_still_get_max_cpu_loras() -> None:
    cache, disk = make(600)  # the budget holds one; the count guarantees two
    for n in "abc":
        cache.register(n, f"/p/{n}")
    assert served_without_disk(cache, disk, ["b", "c", "a"]) == ["b", "c"]


@pytest.mark.parametrize("nbytes", [1, 99, 100, 101, 333, 600, 5000])
def test_budget_report_counts_what_the_tier_holds(nbytes: int) -> None:
    """`mlora budget`'s CPU cache row (cpu_cache_adapters) is what the cache really keeps."""
    cache, disk = make(nbytes, max_cpu=3)
    names = [f"a{i}" for i in range(1200)]
    for n in names:
        cache.register(n, f"/p/{n}")
    assert len(names) - cache.stats().cpu_evictions == cpu_cache_adapters(3, 1000, nbytes)


def test_explicit_count_only_is_vllms_cap() -> None:
    cache, disk = make(1, max_cpu=2, budget=0)
    for n in "abcd":
        cache.register(n, f"/p/{n}")
    assert cache.stats().cpu_evictions == 2


def test_slot_residents_are_never_evicted_to_make_room() -> None:
    """Adapters in slots fill the count and the bytes: a new one evicts none of them (it is served, not kept)."""
    cache, disk = make(600, max_loras=2, max_cpu=2, budget=1000)
    for n in "ab":
        cache.register(n, f"/p/{n}")
    slots = {n: cache.acquire(n) for n in "ab"}
    cache.register("c", "/p/c")
    assert cache.stats().cpu_evictions == 0
    cache.release("b", slots["b"])
    s = cache.acquire("c")  # takes b's slot; c was not kept, so it is read again, and b leaves the tier now
    assert disk.slots[s] == Sized("c", "c", 600) and disk.loads.count("c") == 2
    assert cache.stats().cpu_evictions == 1


def test_reread_after_byte_eviction_is_checked_against_what_was_registered() -> None:
    cache, disk = make(500, max_cpu=1, budget=1000)  # holds two
    for n in "abc":
        cache.register(n, f"/p/{n}")  # a is evicted
    disk.content["/p/a"] = "tampered"
    with pytest.raises(AdapterChangedError, match="changed on disk since it was registered"):
        cache.acquire("a")
    assert served_without_disk(cache, disk, ["b", "c"]) == ["b", "c"]  # the others are untouched


def test_typical_load_seconds_follows_recent_loads(monkeypatch) -> None:
    """A moving average of disk load durations: the engine prefetches in the background only when it is long."""
    now = [0.0]
    monkeypatch.setattr(manager.time, "perf_counter", lambda: now[0])
    durations = iter([0.1, 0.1, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001])

    def load(name: str, path: str) -> Sized:
        now[0] += next(durations)
        return Sized(name, name, 1)

    cache = AdapterCache(max_loras=1, max_cpu_loras=1, loader=load, slot_writer=lambda s, a: None)
    assert cache.typical_load_seconds() is None
    cache.register("a", "/p/a")
    assert cache.typical_load_seconds() == pytest.approx(0.1)
    cache.register("b", "/p/b")
    for n in "cdefghij":
        cache.register(n, f"/p/{n}")
    assert cache.typical_load_seconds() < 0.02  # slow loads are forgotten after a few short ones


def test_config_defaults() -> None:
    assert EngineConfig().max_cpu_lora_bytes == CPU_LORA_BYTES
    assert EngineConfig(max_cpu_loras=8).max_cpu_lora_bytes == 0  # vLLM's max_cpu_loras: a cap
    assert EngineConfig(max_cpu_loras=8, max_cpu_lora_bytes=5).max_cpu_lora_bytes == 5
    with pytest.raises(UsageError, match="max_cpu_lora_bytes"):
        EngineConfig(max_cpu_lora_bytes=-1)
    with pytest.raises(ConfigError, match="max_cpu_lora_bytes"):
        AdapterCache(max_loras=1, max_cpu_lora_bytes=-1, loader=lambda n, p: None, slot_writer=lambda s, a: None)


# ---------------------------------------------------------------------------------- real engine
def test_engine_default_keeps_small_adapters_in_memory(tmp_path: Path, demo_adapters) -> None:
    """Five adapters through one slot: by default all stay in CPU memory (a second round reads no file);
    with max_cpu_loras=2 (vLLM's cap) the second round re-reads them."""
    from engine import LLM

    loras = tuple((f"c{i}", str(_copy(demo_adapters["reverse"], tmp_path / f"c{i}"))) for i in range(5))
    reqs = [(f"r{i}", "hello world", name) for i, (name, _) in enumerate(loras)]
    for kw, rereads in (({}, range(0, 1)), ({"max_cpu_loras": 2}, range(3, 6))):  # 2 kept: 3 re-read at least
        core = LLM(max_loras=1, loras=loras, **kw).engine
        assert all(o.text == "dlrow olleh" for o in _run(core, reqs).values())
        loads = core.lora.cache.stats().disk_loads
        outs = _run(core, [(f"again-{rid}", p, a) for rid, p, a in reqs])
        assert all(o.text == "dlrow olleh" for o in outs.values())
        assert core.lora.cache.stats().disk_loads - loads in rereads


def test_engine_reread_after_byte_eviction_is_hash_checked(tmp_path: Path, demo_adapters) -> None:
    """A CPU tier of two adapters' bytes: the third pushes the first out; its files rewritten in place
    (another valid adapter) are refused at the re-read, and the other tenants are served."""
    from engine import LLM

    paths = {n: _copy(demo_adapters["upper"], tmp_path / n) for n in ("a", "b", "c")}
    probe = LLM(max_loras=1).engine.lora
    size = probe.slots.load("a", str(paths["a"])).nbytes
    llm = LLM(max_loras=1, max_cpu_loras=1, max_cpu_lora_bytes=2 * size, loras=tuple((n, str(p)) for n, p in paths.items()))
    core = llm.engine
    assert all(o.text == "HELLO WORLD" for o in _run(core, [(n, "hello world", n) for n in "abc"]).values())
    assert core.lora.cache.stats().cpu_evictions == 1  # a
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(demo_adapters["reverse"] / f, paths["a"] / f)
    outs = _run(core, [("x", "hello world", "a"), ("y", "hello world", "c"), ("z", "hello world", None)])
    assert outs["x"].finish_reason == "abort" and "changed on disk" in outs["x"].stop_reason
    assert outs["y"].text == "HELLO WORLD" and outs["z"].text == "hello world"
