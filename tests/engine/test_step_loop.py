"""The engine's step loop: the scheduler loads nothing, adapters are loaded before the forward, and a
request's blocks, adapter pins and versions are released once, however it ends (issue 16)."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.lora.manager import AdapterCache
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def _seq(rid: str, adapter: str | None) -> Sequence:
    return Sequence(rid, [3, 4, 5], SamplingParams(max_tokens=3, temperature=0.0), adapter=adapter)


def test_scheduler_admits_by_slot_availability_without_loading_anything() -> None:
    """Wired to a real AdapterCache the way the engine wires it (activation after `schedule()`, release
    at the end), `schedule()` never reads an adapter nor writes a slot, every activation finds the slot
    that `can_acquire` promised, and every request ends."""
    events: list[str] = []
    cache = AdapterCache(max_loras=2, max_cpu_loras=2, loader=lambda n, p: events.append("load") or (n, p),
                         slot_writer=lambda slot, a: events.append("write"))  # fmt: skip
    for name in "abcd":
        cache.register(name, f"/p/{name}")
    pinned = cache.acquire("a")  # a request outside the scheduler holds one of the two slots

    def can_acquire(seq: Sequence, admitted: list[Sequence]) -> bool:
        return cache.can_acquire(seq.adapter, claimed=[(s.adapter, None) for s in admitted])

    s = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=512, max_loras=2,
                  can_acquire=can_acquire, policy="fcfs")  # fmt: skip
    seqs = [_seq(f"r{i}", "bcd"[i % 3]) for i in range(6)] + [_seq("base", None)]
    for seq in seqs:
        s.add(seq)
    held: dict[str, int] = {}
    for _ in range(100):
        if not s.has_unfinished():
            break
        events.clear()
        out = s.schedule()
        assert events == [], "schedule() loaded an adapter or wrote a slot"
        for it in out.scheduled:  # the engine's activation
            if it.seq.adapter is not None and it.seq.request_id not in held:
                slot = cache.acquire(it.seq.adapter)
                assert slot is not None, "can_acquire promised a slot"
                held[it.seq.request_id] = slot
        s.postprocess(out, [7 if it.sample else None for it in out.scheduled])
        for it in out.scheduled:
            if it.seq.is_finished and it.seq.request_id in held:
                cache.release(it.seq.adapter, held.pop(it.seq.request_id))
    assert all(seq.is_finished for seq in seqs) and not held
    cache.release("a", pinned)


def test_can_acquire_counts_the_slots_this_step_already_claims() -> None:
    cache = AdapterCache(max_loras=2, max_cpu_loras=4, loader=lambda n, p: (n, p), slot_writer=lambda s, a: None)
    for name in "abc":
        cache.register(name, f"/p/{name}")
    cache.acquire("a")
    assert cache.can_acquire("b") and cache.can_acquire("c")
    assert not cache.can_acquire("c", claimed=[("b", None)])  # b takes the last free slot first
    assert cache.can_acquire("a", claimed=[("b", None)])  # a is pinned in its own slot already
    assert cache.can_acquire("b", claimed=[("b", None)])  # the same version shares one slot
    assert cache.can_acquire("gone")  # acquire would raise: the request ends at activation, never waits


def test_a_scheduler_without_adapter_callbacks_schedules_adapter_requests() -> None:
    s = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=64, max_loras=1)
    for i, adapter in enumerate(["x", "x", "y", None]):
        s.add(_seq(f"r{i}", adapter))
    out = s.schedule()
    assert sorted(it.seq.request_id for it in out.scheduled) == ["r0", "r1", "r3"]  # y waits for x's slot


@pytest.fixture(scope="module")
def llm():
    from engine import LLM

    return LLM(max_loras=2, max_cpu_loras=3)


def _count_releases(cache, monkeypatch) -> list[str]:
    released: list[str] = []
    real = cache.release

    def release(name, slot=None):
        released.append(name)
        real(name, slot)

    monkeypatch.setattr(cache, "release", release)
    return released


def test_abort_releases_blocks_and_adapter_once_and_a_second_abort_is_harmless(llm, monkeypatch) -> None:
    core, cache = llm.engine, llm.engine.lora.cache
    released = _count_releases(cache, monkeypatch)
    core.add_request("a", "hello world", GREEDY, "upper")
    core.step()  # admitted, adapter loaded and pinned, first token
    assert cache.pins() == {"upper": 1} and core.block_manager.num_free_blocks < core.block_manager.num_blocks
    out = core.abort("a")
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert released == ["upper"] and cache.pins() == {}
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    assert core.abort("a") is None and released == ["upper"]
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks and not core.has_unfinished()
    assert all(v.bindings == 0 for v in cache._versions.values())


def test_every_way_to_finish_releases_once(llm, monkeypatch) -> None:
    """Length, a stop string and an abort while waiting: each request unpins its adapter once and
    frees its blocks; the outputs are those of solo runs."""
    core, cache = llm.engine, llm.engine.lora.cache
    solo = llm.generate(["hello world"], GREEDY, adapters=["upper"])[0].text
    released = _count_releases(cache, monkeypatch)
    core.add_request("len", "hello world", GREEDY, "upper")
    core.add_request("stop", "hello world", SamplingParams(temperature=0.0, max_tokens=20, stop=["y"]), "rot13")
    core.add_request("base", "hello world", GREEDY)
    done = {}
    while core.has_unfinished():
        done.update({o.request_id: o for o in core.step() if o.finished})
    assert done["len"].finish_reason == "length" and done["len"].text == solo
    assert done["stop"].finish_reason == "stop" and done["stop"].stop_reason == "y"
    assert sorted(released) == ["rot13", "upper"] and cache.pins() == {}
    core.add_request("w", "hello world", GREEDY, "reverse")  # aborted before it ever ran: nothing to unpin
    assert core.abort("w").finish_reason == "abort" and sorted(released) == ["rot13", "upper"]
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    assert all(v.bindings == 0 for v in cache._versions.values())


def test_schedule_never_loads_adapters_the_step_does_before_the_forward(llm, monkeypatch) -> None:
    """Cold adapters are read and copied into slots after `schedule()` returns and before `runner.run`."""
    core, cache = llm.engine, llm.engine.lora.cache
    events: list[str] = []
    for name, attr in (("load", "_loader"), ("write", "_writer")):
        real = getattr(cache, attr)
        monkeypatch.setattr(cache, attr, lambda *a, _real=real, _name=name: events.append(_name) or _real(*a))
    for obj, attr in ((core.scheduler, "schedule"), (core.runner, "run")):
        real = getattr(obj, attr)

        def wrapped(*a, _real=real, _name=attr, **kw):
            events.append(_name)
            out = _real(*a, **kw)
            events.append(f"/{_name}")
            return out

        monkeypatch.setattr(obj, attr, wrapped)
    from engine.loader import demo_adapters

    for name, path in demo_adapters().items():  # a new version of each: none is in a slot now
        llm.add_adapter(name, str(path))
    events.clear()
    outs = llm.generate(["hello world", "hello world"], GREEDY, adapters=["upper", "rot13"])
    assert [o.finish_reason for o in outs] == ["length", "length"]
    first = events.index("write")
    assert events[:first].count("schedule") == events[:first].count("/schedule")  # not inside schedule()
    assert "run" not in events[:first] and events.index("/schedule") < first
