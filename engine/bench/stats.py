"""Per-workload numbers from per-request timestamps. Pure Python (no torch).

Definitions (every number a user reads comes from here):
- output tokens/s  = generated tokens / wall time of the run (first arrival to last finish)
- requests/s       = finished requests / the same wall time
- decode tokens/s  = sum over requests of (tokens - 1) / (last token time - first first-token
                     time): the decode phase only, which is what the traffic bound is about
- TTFT             = first token time - arrival time, per request
- inter-token latency = time between consecutive tokens of a request (from streamed gaps when
                     the run streams, else each request's mean gap)
p50/p99 use linear interpolation between order statistics (numpy's default).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class RequestTiming:
    """Wall-clock facts about one finished request (seconds, any common clock)."""

    arrival: float
    finished: float
    num_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    token_gaps: list[float] | None = None  # per-token gaps when streamed


@dataclass
class Latency:
    p50: float | None
    p99: float | None

    @classmethod
    def of(cls, values: list[float]) -> "Latency":
        return cls(percentile(values, 50), percentile(values, 99))


@dataclass
class WorkloadResult:
    """Everything measured for one workload on one system (mlora, peft or separate)."""

    name: str
    kind: str
    system: str
    num_adapters: int
    num_requests: int
    output_tokens: int
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: float
    decode_tokens_per_s: float | None
    ttft_s: Latency
    itl_s: Latency
    e2e_latency_s: Latency
    adapter_loads: int | None = None
    adapter_evictions: int | None = None
    startup_s: float | None = None
    mean_decode_batch: float | None = None  # decoding sequences per decode step (offline mlora runs; None elsewhere)
    notes: list[str] = field(default_factory=list)
    round_metric: str | None = None  # with --repeat: the metric the best round was picked by
    round_values: list[float] = field(default_factory=list)  # ... and its value in every round

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    name: str,
    kind: str,
    system: str,
    num_adapters: int,
    timings: list[RequestTiming],
    *,
    start: float,
    end: float,
    adapter_loads: int | None = None,
    adapter_evictions: int | None = None,
    startup_s: float | None = None,
    notes: list[str] | None = None,
) -> WorkloadResult:
    """Aggregate request timings of one run that took place between `start` and `end`."""
    duration = max(end - start, 1e-9)
    tokens = sum(t.num_tokens for t in timings)
    ttft = [t.first_token - t.arrival for t in timings if t.first_token is not None]
    itl: list[float] = []
    for t in timings:
        if t.token_gaps:
            itl.extend(t.token_gaps)
        elif t.first_token is not None and t.last_token is not None and t.num_tokens > 1:
            itl.append((t.last_token - t.first_token) / (t.num_tokens - 1))
    decode = None
    firsts = [t.first_token for t in timings if t.first_token is not None]
    lasts = [t.last_token for t in timings if t.last_token is not None]
    if firsts and lasts and len(firsts) == len(timings):
        span = max(lasts) - min(firsts)
        decode_tokens = sum(max(t.num_tokens - 1, 0) for t in timings)
        if span > 0 and decode_tokens > 0:
            decode = decode_tokens / span
    return WorkloadResult(
        name=name,
        kind=kind,
        system=system,
        num_adapters=num_adapters,
        num_requests=len(timings),
        output_tokens=tokens,
        duration_s=duration,
        output_tokens_per_s=tokens / duration,
        requests_per_s=len(timings) / duration,
        decode_tokens_per_s=decode,
        ttft_s=Latency.of(ttft),
        itl_s=Latency.of(itl),
        e2e_latency_s=Latency.of([t.finished - t.arrival for t in timings]),
        adapter_loads=adapter_loads,
        adapter_evictions=adapter_evictions,
        startup_s=startup_s,
        notes=list(notes or []),
    )


def combine_sequential(name: str, kind: str, system: str, parts: list[WorkloadResult], *, notes: list[str] | None = None) -> WorkloadResult:
    """One result for runs made one after another (the `separate` alternative): total time."""
    duration = sum(p.duration_s for p in parts)
    tokens = sum(p.output_tokens for p in parts)
    reqs = sum(p.num_requests for p in parts)
    decode_time = sum((p.output_tokens - p.num_requests) / p.decode_tokens_per_s for p in parts if p.decode_tokens_per_s)
    decode_tokens = sum(p.output_tokens - p.num_requests for p in parts if p.decode_tokens_per_s)
    pick = lambda attr, q: [getattr(getattr(p, attr), q) for p in parts if getattr(getattr(p, attr), q) is not None]  # noqa: E731
    return WorkloadResult(
        name=name,
        kind=kind,
        system=system,
        num_adapters=len(parts),
        num_requests=reqs,
        output_tokens=tokens,
        duration_s=duration,
        output_tokens_per_s=tokens / max(duration, 1e-9),
        requests_per_s=reqs / max(duration, 1e-9),
        decode_tokens_per_s=(decode_tokens / decode_time) if decode_time > 0 and decode_tokens > 0 else None,
        # Percentiles of a combined run are not derivable from parts: report the worst part.
        ttft_s=Latency(max(pick("ttft_s", "p50"), default=None), max(pick("ttft_s", "p99"), default=None)),
        itl_s=Latency(max(pick("itl_s", "p50"), default=None), max(pick("itl_s", "p99"), default=None)),
        e2e_latency_s=Latency(max(pick("e2e_latency_s", "p50"), default=None), max(pick("e2e_latency_s", "p99"), default=None)),
        adapter_loads=sum(p.adapter_loads or 0 for p in parts),
        adapter_evictions=sum(p.adapter_evictions or 0 for p in parts),
        startup_s=sum(p.startup_s or 0.0 for p in parts),
        notes=list(notes or []),
    )
