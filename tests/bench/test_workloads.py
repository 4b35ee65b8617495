"""Workload construction: same prompts and lengths everywhere, N distinct adapters, Zipf, Poisson."""

from __future__ import annotations

from collections import Counter

import pytest

from engine.bench.workloads import assign_adapters, build_workloads, mixed_sizes, poisson_arrivals
from engine.errors import ConfigError


def test_every_workload_has_the_same_prompts_and_output_lengths():
    wls = build_workloads(num_requests=32, max_tokens=10, max_loras=8)
    assert [w.name for w in wls] == ["base", "homogeneous", "mixed-2", "mixed-4", "mixed-8", "churn-16"]
    ref = [(r.prompt, r.max_tokens) for r in wls[0].requests]
    assert len(set(p for p, _ in ref)) == 32  # distinct prompts
    for w in wls:
        assert [(r.prompt, r.max_tokens) for r in w.requests] == ref
        assert w.output_tokens == 320
        assert all(r.arrival_s == 0.0 for r in w.requests)


def test_adapter_sets_per_workload():
    wls = {w.name: w for w in build_workloads(num_requests=32, max_tokens=4, max_loras=8)}
    assert wls["base"].adapters == [] and wls["base"].num_adapters == 0
    assert wls["homogeneous"].adapters == ["lora-000"]
    for n in (2, 4, 8):
        w = wls[f"mixed-{n}"]
        assert w.num_adapters == n == len(set(w.adapters))
        counts = Counter(r.adapter for r in w.requests)
        assert set(counts.values()) == {32 // n}  # round-robin: equal shares
    churn = wls["churn-16"]
    assert churn.num_adapters == 16 > 8  # more adapters than device slots


def test_churn_over_more_adapters_than_twice_the_slots():
    """--churn-adapters 64 --max-loras 8 (issue 19's setting): 64 adapters, round-robin."""
    wls = {w.name: w for w in build_workloads(num_requests=256, max_tokens=4, max_loras=8, num_churn=64)}
    assert set(Counter(r.adapter for r in wls["churn-64"].requests).values()) == {4}
    from engine.bench.config import BenchConfig
    from engine.errors import UsageError

    with pytest.raises(UsageError, match="--churn-adapters 8 must exceed --max-loras 8"):
        BenchConfig(preset="tiny", max_loras=8, churn_adapters=8)


def test_zipf_popularity_follows_the_weights_and_keeps_every_adapter():
    n, k, alpha = 4000, 8, 1.2
    names = assign_adapters(n, k, zipf=alpha, seed=7)
    counts = Counter(names)
    assert len(counts) == k
    weights = [1 / (i + 1) ** alpha for i in range(k)]
    for i in range(k):
        expected = 1 + (n - k) * weights[i] / sum(weights)
        assert counts[f"lora-{i:03d}"] == pytest.approx(expected, rel=0.15)
    assert counts["lora-000"] > counts["lora-001"] > counts["lora-003"] > counts["lora-007"]
    assert assign_adapters(n, k, zipf=alpha, seed=7) == names  # seeded


def test_zipf_with_few_requests_still_has_n_distinct_adapters():
    assert len(set(assign_adapters(16, 16, zipf=2.0))) == 16


def test_poisson_arrivals_are_seeded_and_have_the_requested_rate():
    arr = poisson_arrivals(5000, rate=20.0, seed=1)
    assert arr[0] == 0.0 and arr == sorted(arr)
    assert len(arr) / arr[-1] == pytest.approx(20.0, rel=0.05)
    assert poisson_arrivals(5000, rate=20.0, seed=1) == arr


def test_rate_mode_varies_output_lengths_identically_across_workloads():
    wls = build_workloads(num_requests=40, max_tokens=32, max_loras=4, rate=5.0)
    lengths = [r.max_tokens for r in wls[0].requests]
    assert len(set(lengths)) > 5 and min(lengths) >= 8 and max(lengths) <= 32
    for w in wls:
        assert [r.max_tokens for r in w.requests] == lengths
        assert [r.arrival_s for r in w.requests] == [r.arrival_s for r in wls[0].requests]


def test_mixed_sizes_are_powers_of_two_up_to_max_loras():
    assert mixed_sizes(16, 64) == [2, 4, 8, 16]
    assert mixed_sizes(6, 64) == [2, 4, 6]
    assert mixed_sizes(16, 5) == [2, 4, 5]
    assert mixed_sizes(1, 64) == []


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="--zipf"):
        assign_adapters(8, 4, zipf=0.0)
    with pytest.raises(ConfigError, match="at least as many requests"):
        assign_adapters(2, 4)
    with pytest.raises(ConfigError, match="--rate"):
        poisson_arrivals(3, rate=0.0)
    with pytest.raises(ConfigError, match="--num-requests"):
        build_workloads(num_requests=0, max_tokens=4, max_loras=2)


def test_composed_workload_is_mixed_2_with_both_adapters_on_every_request() -> None:
    wls = {w.name: w for w in build_workloads(num_requests=6, max_tokens=4, max_loras=4, composed=True)}
    comp, single = wls["composed-2"], wls["mixed-2"]
    assert [r.prompt for r in comp.requests] == [r.prompt for r in single.requests]
    assert comp.output_tokens == single.output_tokens
    assert {r.engine_adapters for r in comp.requests} == {(("lora-000", 0.7), ("lora-001", 0.5))}
    assert comp.adapters == single.adapters == ["lora-000", "lora-001"] or sorted(single.adapters) == comp.adapters
    assert "composed-2" not in {w.name for w in build_workloads(num_requests=6, max_tokens=4, max_loras=4)}
