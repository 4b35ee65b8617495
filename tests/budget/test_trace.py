"""Working-set replay on synthetic traces with known answers, and against a brute-force LRU."""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from pathlib import Path

import pytest

from engine.planning.trace import TraceError, replay_trace


def write_trace(path: Path, adapters: list, *, key: str = "adapter", t0: float = 1_700_000_000.0, dt: float = 0.5) -> Path:
    with open(path, "w") as f:
        for i, name in enumerate(adapters):
            f.write(json.dumps({"timestamp": t0 + i * dt, key: name, "prompt": "hi"}) + "\n")
    return path


def brute_force_lru_hits(adapters: list, slots: int) -> int:
    """Reference: an explicit LRU cache of `slots` entries, replayed request by request."""
    cache: OrderedDict[str, None] = OrderedDict()
    hits = 0
    for name in adapters:
        if not name:
            continue
        if name in cache:
            hits += 1
            cache.move_to_end(name)
        else:
            cache[name] = None
            if len(cache) > slots:
                cache.popitem(last=False)
    return hits


@pytest.mark.parametrize("k", [1, 3, 5, 8, 13])
def test_cyclic_trace_over_k_adapters_needs_exactly_k_slots(tmp_path, k):
    n = 200 * k
    replay = replay_trace(write_trace(tmp_path / "t.jsonl", [f"a{i % k}" for i in range(n)]))
    assert replay.distinct_adapters == k and replay.adapter_requests == n
    assert replay.hit_rate(k) == (n - k) / n  # only the k cold misses
    if k > 1:
        assert replay.hit_rate(k - 1) == 0.0  # LRU thrashes on a cycle one larger than the cache
    assert replay.smallest_slots_for(0.99) == k
    assert replay.loads(k) == k and replay.loads(k + 10) == k


@pytest.mark.parametrize("seed", [0, 1])
def test_zipf_trace_matches_brute_force_lru_for_every_size(tmp_path, seed):
    rng = random.Random(seed)
    names = [f"adapter-{i}" for i in range(40)]
    weights = [1 / (i + 1) ** 1.1 for i in range(len(names))]
    adapters = rng.choices(names, weights=weights, k=3000)
    adapters[5::97] = [None] * len(adapters[5::97])  # base-model requests sprinkled in
    replay = replay_trace(write_trace(tmp_path / "z.jsonl", adapters))
    assert replay.base_requests == len(adapters[5::97])
    assert replay.adapter_requests == len(adapters) - replay.base_requests
    for slots in range(1, replay.distinct_adapters + 3):
        assert replay.hits(slots) == brute_force_lru_hits(adapters, slots), slots
    target = 0.9
    best = replay.smallest_slots_for(target)
    assert best is not None
    assert brute_force_lru_hits(adapters, best) >= target * replay.adapter_requests
    assert brute_force_lru_hits(adapters, best - 1) < target * replay.adapter_requests


def test_capped_simulation_is_exact_up_to_the_cap(tmp_path):
    rng = random.Random(3)
    adapters = [f"a{rng.randrange(12)}" for _ in range(1500)]
    replay = replay_trace(write_trace(tmp_path / "c.jsonl", adapters), max_slots=4)
    assert replay.distinct_adapters == 12 and replay.exact_limit == 4
    for slots in range(1, 5):
        assert replay.hits(slots) == brute_force_lru_hits(adapters, slots)
    with pytest.raises(ValueError, match="up to 4"):
        replay.hits(5)
    assert replay.candidate_slots() == [1, 2, 4]
    assert replay.smallest_slots_for(0.99) is None
    assert replay.best_hit_rate == (1500 - 12) / 1500  # known without simulating: only cold misses


def test_openai_log_model_field_iso_timestamps_and_loads_per_second(tmp_path):
    lines = [
        {"timestamp": "2025-01-01T00:00:00Z", "model": "sql"},
        {"timestamp": "2025-01-01T00:00:10Z", "model": "chat"},
        {"timestamp": "2025-01-01T00:00:20Z", "model": "sql"},
        {"timestamp": "1735689640", "model": None},  # base model, numeric-string timestamp (+40 s)
    ]
    path = tmp_path / "o.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")  # trailing blank line is fine
    replay = replay_trace(path)
    assert (replay.requests, replay.adapter_requests, replay.base_requests) == (4, 3, 1)
    assert replay.duration_s == 40.0
    assert replay.loads(1) == 3 and replay.loads_per_second(1) == 3 / 40
    assert replay.loads(2) == 2 and replay.hit_rate(2) == 1 / 3
    assert replay.candidate_slots() == [1, 2]


def test_progress_is_reported_to_the_end(tmp_path):
    path = write_trace(tmp_path / "p.jsonl", [f"a{i % 3}" for i in range(70_000)])
    seen: list[tuple[int, int]] = []
    replay_trace(path, progress=lambda done, total: seen.append((done, total)))
    size = path.stat().st_size
    assert seen[-1] == (size, size) and len(seen) >= 2
    assert all(done <= total == size for done, total in seen)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"adapter": "a", "timestamp": 1', "line 3: malformed JSON"),
        ('["a", 1]', "line 3: expected a JSON object, got list"),
        ('{"timestamp": 5}', "line 3: no 'adapter' (or 'model') field"),
        ('{"adapter": 7}', "line 3: adapter name must be a string"),
        ('{"adapter": "a", "timestamp": "yesterday"}', "line 3: timestamp must be unix seconds or ISO 8601"),
        ('{"adapter": "a", "timestamp": NaN}', "line 3: timestamp must be a finite number of unix seconds, got nan"),
        ('{"adapter": "a", "timestamp": -Infinity}', "line 3: timestamp must be a finite number of unix seconds, got -inf"),
        ('{"adapter": "a", "timestamp": ' + "1" * 400 + "}", "line 3: timestamp must be a finite number of unix seconds"),
        ("[" * 100_000 + "]" * 100_000, "line 3: malformed JSON (nested too deeply)"),
    ],
)
def test_malformed_line_is_reported_with_its_line_number(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"adapter": "a"}\n\n' + bad_line + '\n{"adapter": "b"}\n')
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        replay_trace(path)


def test_missing_trace_file_is_a_trace_error(tmp_path):
    with pytest.raises(TraceError, match="cannot read trace"):
        replay_trace(tmp_path / "nope.jsonl")


def test_base_names_count_as_base_requests(tmp_path):
    names = ["a", "base", "b", "a", "base", None, "b"]
    path = write_trace(tmp_path / "m.jsonl", names, key="model")
    plain = replay_trace(path)
    assert (plain.adapter_requests, plain.base_requests, plain.distinct_adapters) == (6, 1, 3)
    replay = replay_trace(path, base_names={"base"})
    assert (replay.adapter_requests, replay.base_requests, replay.distinct_adapters) == (4, 3, 2)
    assert replay.hits(2) == brute_force_lru_hits([n for n in names if n != "base"], 2) == 2


def test_timestamps_far_apart_keep_a_finite_duration(tmp_path):
    """-1e300 .. 1e300 is the widest span allowed: its duration is still a finite float (strict JSON)."""
    path = tmp_path / "wide.jsonl"
    path.write_text('{"adapter": "a", "timestamp": -1e300}\n{"adapter": "b", "timestamp": 1e300}\n')
    assert replay_trace(path).duration_s == 2e300
    path.write_text('{"adapter": "a", "timestamp": -1e308}\n{"adapter": "b", "timestamp": 1e308}\n')
    with pytest.raises(TraceError, match="line 1: timestamp must be a finite number"):
        replay_trace(path)
