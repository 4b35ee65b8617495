"""Per-workload numbers: percentiles (numpy is the oracle), throughput and latency definitions."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.bench.stats import RequestTiming, combine_sequential, percentile, summarize


@pytest.mark.parametrize("n", [1, 2, 5, 100, 101])
@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear_interpolation(n, q):
    rng = random.Random(n * 1000 + q)
    xs = [rng.expovariate(3.0) for _ in range(n)]
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-15)


def test_percentile_of_nothing_is_none_and_bad_q_is_rejected():
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _timings():
    # Two requests of 5 tokens, arriving at 0; first tokens at 1.0, decode 0.25 s/token.
    return [
        RequestTiming(arrival=0.0, first_token=1.0, last_token=2.0, finished=2.0, num_tokens=5),
        RequestTiming(arrival=0.0, first_token=1.0, last_token=2.0, finished=2.1, num_tokens=5),
    ]


def test_summarize_throughput_decode_rate_and_latencies():
    r = summarize("mixed-2", "mixed", "mlora", 2, _timings(), start=0.0, end=2.5, adapter_loads=1, adapter_evictions=0)
    assert r.output_tokens == 10
    assert r.output_tokens_per_s == pytest.approx(10 / 2.5)
    assert r.requests_per_s == pytest.approx(2 / 2.5)
    # decode phase: (5-1)*2 tokens between the first first-token (1.0) and the last token (2.0)
    assert r.decode_tokens_per_s == pytest.approx(8 / 1.0)
    assert r.ttft_s.p50 == pytest.approx(1.0) and r.ttft_s.p99 == pytest.approx(1.0)
    assert r.itl_s.p50 == pytest.approx(0.25)
    assert r.e2e_latency_s.p99 == pytest.approx(float(np.percentile([2.0, 2.1], 99)))
    assert (r.adapter_loads, r.adapter_evictions) == (1, 0)


def test_streamed_gaps_are_used_for_inter_token_latency():
    t = RequestTiming(arrival=0.0, first_token=0.5, last_token=1.1, finished=1.1, num_tokens=4, token_gaps=[0.1, 0.2, 0.3])
    r = summarize("w", "base", "mlora", 0, [t], start=0.0, end=1.1)
    assert r.itl_s.p50 == pytest.approx(0.2)
    assert r.itl_s.p99 == pytest.approx(float(np.percentile([0.1, 0.2, 0.3], 99)))


def test_without_token_timestamps_there_is_no_decode_rate():
    r = summarize("w", "base", "peft", 0, [RequestTiming(arrival=0.0, finished=1.0, num_tokens=8)], start=0.0, end=1.0)
    assert r.decode_tokens_per_s is None
    assert r.ttft_s.p50 is None and r.itl_s.p50 is None
    assert r.output_tokens_per_s == pytest.approx(8.0)


def test_separate_runs_add_up_their_time_and_tokens():
    a = summarize("a", "mixed", "separate", 1, _timings(), start=0.0, end=2.5)
    b = summarize("b", "mixed", "separate", 1, _timings()[:1], start=0.0, end=1.5)
    total = combine_sequential("mixed-2", "mixed", "separate", [a, b])
    assert total.duration_s == pytest.approx(4.0)
    assert total.output_tokens == 15 and total.num_requests == 3
    assert total.output_tokens_per_s == pytest.approx(15 / 4.0)
    assert total.num_adapters == 2
    # decode: a has 8 tokens in 1.0 s, b has 4 tokens in 1.0 s -> 12 tokens / 2 s
    assert total.decode_tokens_per_s == pytest.approx(6.0)
