"""Bench workloads: the same prompts and output lengths, different adapter assignments.

Pure Python (no torch). Every workload has the same `num_requests` requests, in the same
order, with the same prompt and `max_tokens` for request i; only the adapter differs:
`base` (no adapter), `homogeneous` (all on one adapter), `mixed-N` (N distinct adapters in
the same batch, round-robin or Zipf-popular) and `churn` (more adapters than device slots,
so the engine must load and evict). Requests are run with `ignore_eos` so every workload
produces exactly the same number of output tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from engine.errors import ConfigError

_WORDS = (
    "adapter batch cache decode engine fleet gradient header index kernel latency memory "
    "network offset prompt query router sample tensor update vector weight yield zone "
    "alpha bravo delta echo garden harbor island jungle lantern meadow orbit pepper river"
).split()


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: prompt text, adapter name (None = base), output length."""

    prompt: str
    adapter: str | None
    max_tokens: int
    arrival_s: float = 0.0  # offset from the start of the run (Poisson mode); 0 = all at once
    composition: tuple[tuple[str, float], ...] | None = None  # adapters composed with weights (issue 20); None = `adapter`

    @property
    def engine_adapters(self) -> str | tuple[tuple[str, float], ...] | None:
        """What `LLM.generate(adapters=[...])` takes for this request."""
        return self.composition if self.composition is not None else self.adapter


@dataclass(frozen=True)
class Workload:
    """A named list of requests. `num_adapters` is the number of distinct adapters used."""

    name: str
    kind: str  # "base" | "homogeneous" | "mixed" | "churn" | "composed"
    requests: tuple[BenchRequest, ...]
    num_adapters: int

    @property
    def adapters(self) -> list[str]:
        """Distinct adapters in first-use order."""
        names = [n for r in self.requests for n, _ in (r.composition or ())]
        return list(dict.fromkeys(names + [r.adapter for r in self.requests if r.adapter is not None]))

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)


def adapter_name(i: int) -> str:
    return f"lora-{i:03d}"


def make_prompts(num: int, *, length_chars: int, seed: int = 0) -> list[str]:
    """`num` seeded prompts of exactly `length_chars` characters (distinct per request)."""
    rng = random.Random(seed)
    out = []
    for i in range(num):
        words = [f"request {i}:"]
        while sum(len(w) + 1 for w in words) < length_chars:
            words.append(rng.choice(_WORDS))
        out.append(" ".join(words)[:length_chars])
    return out


def output_lengths(num: int, *, max_tokens: int, varied: bool, seed: int = 0) -> list[int]:
    """Per-request output lengths: all `max_tokens`, or seeded uniform in [max_tokens/4, max_tokens]."""
    if not varied:
        return [max_tokens] * num
    rng = random.Random(seed + 1)
    lo = max(1, max_tokens // 4)
    return [rng.randint(lo, max_tokens) for _ in range(num)]


def poisson_arrivals(num: int, *, rate: float, seed: int = 0) -> list[float]:
    """Seeded Poisson-process arrival offsets (seconds) at `rate` requests/s; the first is 0."""
    if rate <= 0:
        raise ConfigError(f"--rate must be > 0 requests/s, got {rate}")
    rng = random.Random(seed + 2)
    t, out = 0.0, []
    for i in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def assign_adapters(num_requests: int, num_adapters: int, *, zipf: float | None = None, seed: int = 0) -> list[str]:
    """Adapter names for `num_requests` requests over `num_adapters` adapters.

    Round-robin by default. With `zipf=alpha`, adapter k (0-based) is drawn with weight
    1/(k+1)^alpha, after the first `num_adapters` requests take one adapter each so every
    adapter is present (N distinct adapters in the batch means N, not "up to N").
    """
    if num_adapters < 1:
        raise ConfigError(f"number of adapters must be >= 1, got {num_adapters}")
    if num_adapters > num_requests:
        raise ConfigError(f"{num_adapters} adapters need at least as many requests, got --num-requests {num_requests}")
    if zipf is None:
        return [adapter_name(i % num_adapters) for i in range(num_requests)]
    if zipf <= 0:
        raise ConfigError(f"--zipf must be > 0, got {zipf}")
    rng = random.Random(seed + 3)
    weights = [1.0 / (k + 1) ** zipf for k in range(num_adapters)]
    picks = list(range(num_adapters)) + rng.choices(range(num_adapters), weights=weights, k=num_requests - num_adapters)
    rng.shuffle(picks)
    return [adapter_name(k) for k in picks]


def mixed_sizes(max_loras: int, num_requests: int) -> list[int]:
    """N values for the mixed workloads: 2, 4, 8, ... up to max_loras (and max_loras itself)."""
    cap = min(max_loras, num_requests)
    sizes, n = [], 2
    while n <= cap:
        sizes.append(n)
        n *= 2
    if cap >= 2 and cap not in sizes:
        sizes.append(cap)
    return sizes


def adapter_ranks(num_adapters: int, ranks: tuple[int, ...], rank: int) -> list[int]:
    """The LoRA rank of adapters 0..num_adapters-1: `ranks` cycled (adapter i has ranks[i % len]), or
    all `rank` when `ranks` is empty. `--rank 8,64`: lora-000 r8 (the homogeneous one), lora-001 r64, ..."""
    return [ranks[i % len(ranks)] if ranks else rank for i in range(num_adapters)]


def churn_adapters(max_loras: int) -> int:
    """How many adapters the churn workload cycles through: twice the device slots."""
    return 2 * max_loras


def build_workloads(
    *,
    num_requests: int,
    max_tokens: int,
    max_loras: int,
    prompt_chars: int = 32,
    zipf: float | None = None,
    rate: float | None = None,
    churn: bool = True,
    composed: bool = False,
    seed: int = 0,
    adapters: tuple[int, ...] = (),
    num_churn: int | None = None,
) -> list[Workload]:
    """base, homogeneous, mixed-N for every N in `adapters` (default: `mixed_sizes`), (optionally) churn over
    `num_churn` adapters (default: `churn_adapters`) and (optionally) composed-2:
    every request composes lora-000 and lora-001 (weights 0.7, 0.5), the same batch as mixed-2 (each request
    one of those two adapters), so composed-2 / mixed-2 is the cost of composing at equal slots.

    With `rate`, requests arrive as a seeded Poisson process and output lengths vary
    (seeded, identical across workloads); without, all arrive at once with `max_tokens` each.
    """
    if num_requests < 1:
        raise ConfigError(f"--num-requests must be >= 1, got {num_requests}")
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {max_tokens}")
    if max_loras < 1:
        raise ConfigError(f"--max-loras must be >= 1, got {max_loras}")
    prompts = make_prompts(num_requests, length_chars=prompt_chars, seed=seed)
    lengths = output_lengths(num_requests, max_tokens=max_tokens, varied=rate is not None, seed=seed)
    arrivals = poisson_arrivals(num_requests, rate=rate, seed=seed) if rate is not None else [0.0] * num_requests

    def make(name: str, kind: str, adapters: list[str | None]) -> Workload:
        reqs = tuple(BenchRequest(p, a, n, t) for p, a, n, t in zip(prompts, adapters, lengths, arrivals))
        return Workload(name, kind, reqs, len({a for a in adapters if a is not None}))

    out = [
        make("base", "base", [None] * num_requests),
        make("homogeneous", "homogeneous", [adapter_name(0)] * num_requests),
    ]
    for n in adapters or mixed_sizes(max_loras, num_requests):
        if n > max_loras:
            raise ConfigError(f"mixed-{n} needs {n} adapter slots, got --max-loras {max_loras}")
        out.append(make(f"mixed-{n}", "mixed", list(assign_adapters(num_requests, n, zipf=zipf, seed=seed))))
    n_churn = min(num_churn or churn_adapters(max_loras), num_requests)
    if churn and n_churn > max_loras:
        out.append(make(f"churn-{n_churn}", "churn", list(assign_adapters(num_requests, n_churn, zipf=zipf, seed=seed))))
    if composed:
        if max_loras < 2:
            raise ConfigError("--composed needs --max-loras >= 2 (each request composes 2 adapters)")
        if not any(w.name == "mixed-2" for w in out):
            out.append(make("mixed-2", "mixed", list(assign_adapters(num_requests, 2, zipf=zipf, seed=seed))))
        comp = ((adapter_name(0), 0.7), (adapter_name(1), 0.5))
        reqs = tuple(BenchRequest(p, None, n, t, composition=comp) for p, n, t in zip(prompts, lengths, arrivals))
        out.append(Workload("composed-2", "composed", reqs, 2))
    return out
