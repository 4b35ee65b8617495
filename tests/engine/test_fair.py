"""Scheduling policies (fair share, priority, fcfs) on the torch-free scheduler with a fake model.

The fake model samples token 7 for every sequence that is due a token; requests end at max_tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

_ids = iter(range(10**9))


def _seq(tenant: str, prompt: int = 4, max_tokens: int = 4, *, adapter: str | None = None, priority: int = 0) -> Sequence:
    return Sequence(f"{tenant}-{next(_ids)}", list(range(3, 3 + prompt)), SamplingParams(max_tokens=max_tokens),
                    adapter=adapter if adapter is not None else tenant, tenant=tenant, priority=priority)


def _step(s: Scheduler, resident: frozenset[str] = frozenset()) -> list[Sequence]:
    out = s.schedule(resident)
    s.postprocess(out, [7 if it.sample else None for it in out.scheduled])
    return [it.seq for it in out.scheduled]


def _scheduler(policy: str = "fair", *, seqs: int = 4, blocks: int = 4096, **kw: object) -> Scheduler:
    return Scheduler(BlockManager(blocks, 4), max_num_seqs=seqs, max_num_batched_tokens=512, policy=policy, **kw)  # type: ignore[arg-type]


def _max_gap(s: Scheduler, steps: int, arrive: Callable[[int], list[Sequence]]) -> float:
    """Run `steps` steps with `arrive(step)` adding requests before each; the largest difference between
    the counters of two tenants that both had waiting requests at that moment."""
    gap = 0.0
    for step in range(steps):
        for seq in arrive(step):
            s.add(seq)
        backlogged = {q.tenant for q in s.waiting}
        if len(backlogged) > 1:
            values = [s.vtc[t] for t in backlogged]
            gap = max(gap, max(values) - min(values))
        _step(s)
    return gap


def _bound(s: Scheduler, max_prompt: int, max_tokens: int) -> float:
    """One admission's prompt charge plus the output a full batch of requests can still charge, in the
    least weight's units: what a tenant may run ahead of another between two of its admissions."""
    w = min([1.0, *s.weights.values()])
    return (s.prompt_weight * max_prompt + s.output_weight * max_tokens * s.max_num_seqs) / w


def test_flood_does_not_delay_a_light_tenant() -> None:
    """60 queued requests of one tenant, then 4 of another: under `fair` the newcomer gets the next seats."""
    for policy, most_waited in (("fair", 1), ("fcfs", 15)):
        s = _scheduler(policy)
        for _ in range(60):
            s.add(_seq("heavy", max_tokens=40))
        for _ in range(10):
            _step(s)
        light = [_seq("light", max_tokens=40) for _ in range(4)]
        for seq in light:
            s.add(seq)
        steps = 0
        while not all(q.num_output_tokens for q in light):
            _step(s)
            steps += 1
        assert steps <= 40 * most_waited + 1, (policy, steps)  # fair: as seats free; fcfs: behind all 60
        if policy == "fair":
            assert steps <= 41
        else:
            assert steps > 40 * 10


def test_service_gap_bounded_under_adversarial_arrivals() -> None:
    """Backlogged tenants' counters never differ by more than the bound, whatever the arrival pattern."""
    rng = random.Random(0)
    patterns: dict[str, Callable[[int], list[Sequence]]] = {
        # a heavy tenant keeps 50 long requests queued; a light one keeps exactly one short request queued
        "flood_vs_trickle": lambda t: [_seq("heavy", 32, 32) for _ in range(50 if t == 0 else 1 if t % 8 == 0 else 0)]
        + ([_seq("light", 1, 1)] if t % 2 == 0 else []),
        # a tenant that leaves and comes back in bursts (no credit for the idle time)
        "on_off": lambda t: [_seq("steady", 8, 16) for _ in range(2)]
        + ([_seq("bursty", 16, 16) for _ in range(20)] if t % 300 == 150 else []),
        # many tenants, random sizes and arrivals
        "random": lambda t: [_seq(f"t{rng.randrange(5)}", rng.randrange(1, 33), rng.randrange(1, 33))
                             for _ in range(rng.choice((0, 0, 1, 3)))],
    }
    for name, arrive in patterns.items():
        s = _scheduler()
        gap = _max_gap(s, 3000, arrive)
        assert gap <= _bound(s, 32, 32), (name, gap)


def test_service_gap_bounded_with_weights_and_preemption() -> None:
    rng = random.Random(1)
    weights = {"a": 3.0, "b": 1.0, "c": 0.5}
    s = _scheduler(seqs=8, blocks=40, weights=weights)  # 160 KV slots for 8 seats: preemption happens
    arrive = lambda t: [_seq(rng.choice("abc"), rng.randrange(1, 17), rng.randrange(1, 17)) for _ in range(rng.choice((0, 1, 2)))]  # noqa: E731
    gap = _max_gap(s, 4000, arrive)
    assert s.num_preemptions > 0
    assert gap <= _bound(s, 16, 16), gap


def test_returning_tenant_gets_no_credit_for_idle_time() -> None:
    s = _scheduler()
    for _ in range(200):
        s.add(_seq("a", 4, 8))
    s.add(_seq("b", 4, 2))
    while any(q.tenant == "b" for q in list(s.waiting) + s.running):
        _step(s)
    for _ in range(100):  # b idle, a served
        _step(s)
    s.add(_seq("b", 4, 2))
    assert s.vtc["b"] == s.vtc["a"]  # lifted to the least counter among the tenants with waiting requests
    s2 = _scheduler()  # an idle system: the newcomer starts at the last leaver's counter
    s2.add(_seq("x", 4, 4))
    while s2.has_unfinished():
        _step(s2)
    s2.add(_seq("y", 4, 4))
    assert s2.vtc["y"] == s2.vtc["x"] > 0


def test_unloaded_adapters_tenant_is_forgotten_after_its_last_request() -> None:
    """forget_tenant (adapter unloaded): no per-name state left behind, none dropped under a request."""
    s = _scheduler(seqs=2)
    s.add(_seq("a", 4, 3))
    busy = _seq("gone", 4, 3)
    s.add(busy)
    _step(s)
    s.forget_tenant("gone")  # its request is still running: kept until it ends
    assert "gone" in s.vtc
    while s.has_unfinished():
        _step(s)
    assert "gone" not in s.vtc and "gone" not in s.prompt_served and "gone" not in s.output_served
    assert s.vtc["a"] > 0
    s.forget_tenant("a")  # idle and the last tenant to leave: dropped now, its counter stays the floor
    assert "a" not in s.vtc
    s.add(_seq("new", 4, 3))
    assert s.vtc["new"] > 0  # lifted to the last leaver's counter, as without the forget
    s.forget_tenant("new")  # waiting: kept...
    s.add(_seq("new", 4, 3))  # ...and asked for again: not forgotten at all
    while s.has_unfinished():
        _step(s)
    assert "new" in s.vtc and not s._forget


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 1.0}, {"a": 100.0, "b": 0.01}, {"a": 0.01, "b": 100.0}, {"a": 7.0, "b": 0.3}])
def test_no_starvation_with_any_weights(weights: dict[str, float]) -> None:
    """Both tenants flood forever; each keeps finishing requests, at a share that follows its weight."""
    s = _scheduler(weights=weights)
    done = {"a": 0, "b": 0}
    live: list[Sequence] = []
    for step in range(6000):
        for t in "ab":
            if sum(1 for q in s.waiting if q.tenant == t) < 8:
                seq = _seq(t, 2, 2)
                s.add(seq)
                live.append(seq)
        _step(s)
        for q in [q for q in live if q.is_finished]:
            done[q.tenant] += 1
            live.remove(q)
    assert min(done.values()) >= 10, done
    total = sum(done.values())
    for t in "ab":
        share = weights[t] / sum(weights.values())
        assert done[t] >= 0.5 * share * total - 2, (done, weights)


def test_weights_two_to_one_split_output_tokens() -> None:
    s = _scheduler(seqs=6, weights={"gold": 2.0, "std": 1.0})
    for _ in range(5000):
        for t in ("gold", "std"):
            if sum(1 for q in s.waiting if q.tenant == t) < 8:  # more than the seats: always backlogged
                s.add(_seq(t, 8, 16))
        _step(s)
    ratio = s.output_served["gold"] / s.output_served["std"]
    assert abs(ratio - 2.0) <= 0.2, ratio


def test_work_conserving_never_idles_while_admissible_work_waits() -> None:
    rng = random.Random(2)
    s = _scheduler(seqs=4, weights={"a": 5.0, "b": 0.2})
    for step in range(3000):
        for _ in range(rng.choice((0, 0, 0, 1, 4))):
            s.add(_seq(rng.choice("abc"), rng.randrange(1, 9), rng.randrange(1, 9)))
        out = s.schedule()
        assert len(s.running) == s.max_num_seqs or not s.waiting, step  # seats full, or nothing left to admit
        s.postprocess(out, [7 if it.sample else None for it in out.scheduled])


def test_work_conserving_with_adapter_limit_and_tenant_cap() -> None:
    """max_loras and max_seqs_per_tenant skip a request, not the requests behind it."""
    s = Scheduler(BlockManager(4096, 4), max_num_seqs=4, max_num_batched_tokens=512, max_loras=1,
                  aging_steps=10**6, max_seqs_per_tenant=2)
    for _ in range(6):
        s.add(_seq("x", adapter="ad1"))
    for _ in range(6):
        s.add(_seq("y", adapter="ad2"))
    for _ in range(3):
        s.add(_seq("z", adapter="ad1"))
    scheduled = _step(s, frozenset({"ad1"}))
    assert sorted(q.tenant for q in scheduled) == ["x", "x", "z", "z"]  # ad2 cannot join; caps at 2 per tenant


def test_aged_request_still_runs_when_its_adapter_is_crowded_out() -> None:
    """The starvation rule under `fair`: a tenant whose adapter cannot join holds admission once aged."""
    s = Scheduler(BlockManager(4096, 4), max_num_seqs=4, max_num_batched_tokens=512, max_loras=1, aging_steps=8)
    for _ in range(4):
        s.add(_seq("hot", 3, 4))
    cold = _seq("cold")
    s.add(cold)
    for step in range(300):
        for _ in range(2):
            s.add(_seq("hot", 3, 4))
        _step(s, frozenset({"hot"}))
        if cold.is_finished:
            break
    assert cold.is_finished and step < 40


def test_preemption_takes_the_most_over_served_tenant() -> None:
    s = _scheduler(seqs=3, blocks=6, weights={"big": 0.25})  # 24 KV slots: three growing requests do not fit
    for t in ("big", "small1", "small2"):  # admitted together; "big" pays 4x per token, so it leads soon
        s.add(_seq(t, 4, 30))
    victims: list[str] = []
    for _ in range(30):
        out = s.schedule()
        victims += [v.tenant for v in out.preempted]
        s.postprocess(out, [7 if it.sample else None for it in out.scheduled])
        if victims:
            break
    assert victims and victims[0] == "big"


def test_priority_policy_admits_lower_values_first() -> None:
    s = _scheduler("priority", seqs=1)
    late = _seq("a", priority=5)
    s.add(late)
    early = [_seq("a", priority=p) for p in (3, 0, 3)]
    for seq in early:
        s.add(seq)
    order: list[Sequence] = []
    while s.has_unfinished():
        for q in _step(s):
            if q not in order:
                order.append(q)
    assert [q.priority for q in order] == [0, 3, 3, 5]
    assert order[1] is early[0] and order[2] is early[2]  # FCFS among equal priorities


def test_fcfs_policy_keeps_arrival_order() -> None:
    s = _scheduler("fcfs", seqs=1)
    seqs = [_seq(t, priority=p) for t, p in (("a", 9), ("b", 0), ("a", 0))]
    for seq in seqs:
        s.add(seq)
    order: list[Sequence] = []
    while s.has_unfinished():
        for q in _step(s):
            if q not in order:
                order.append(q)
    assert order == seqs


def test_unknown_policy_and_bad_weight_are_refused() -> None:
    with pytest.raises(ValueError, match="fair, fcfs, priority"):
        _scheduler("lottery")
    with pytest.raises(ValueError, match="> 0"):
        _scheduler().set_weight("a", 0)


def test_engine_config_scheduling_fields() -> None:
    from engine.config import EngineConfig
    from engine.errors import ConfigError

    cfg = EngineConfig(lora_weights={"sql": 2, "chat": 0.5})
    assert cfg.scheduling_policy == "fair" and cfg.lora_weights == (("sql", 2.0), ("chat", 0.5))
    for bad, message in ((dict(scheduling_policy="lottery"), "fair, fcfs, priority"),
                         (dict(lora_weights={"sql": 0}), "weight of 'sql' must be a number > 0"),
                         (dict(lora_weights=[("sql",)]), "pairs"),
                         (dict(fair_output_weight=-1.0), "fair_output_weight"),
                         (dict(max_seqs_per_tenant=0), "max_seqs_per_tenant")):
        with pytest.raises(ConfigError, match=message):
            EngineConfig(**bad)  # type: ignore[arg-type]
