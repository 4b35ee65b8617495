"""`mlora bench --workload flood|trace`: the requests and numbers (pure), and one short trace replay via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.bench.fairness import FairnessConfig, Timing, flood_requests, summarize_policy, trace_requests
from engine.errors import ConfigError
from tests.bench.test_cli_bench import run_cli


def test_flood_requests_heavy_first_then_light_tenants() -> None:
    cfg = FairnessConfig(heavy_requests=6, light_requests=2, light_tenants=2, light_delay_s=1.5, max_tokens=9)
    reqs = flood_requests(cfg, ["upper", "reverse", "rot13"])
    assert [(r.adapter, r.arrival_s) for r in reqs] == [("upper", 0.0)] * 6 + [("reverse", 1.5)] * 2 + [("rot13", 1.5)] * 2
    assert {r.max_tokens for r in reqs} == {9} and len({r.prompt for r in reqs}) == 10
    paced = flood_requests(FairnessConfig(light_requests=3, light_rate=2.0), ["a", "b"])
    light = [r.arrival_s for r in paced if r.adapter == "b"]
    assert light[0] == 1.0 and light == sorted(light) and light[-1] > 1.0
    with pytest.raises(ConfigError, match="needs 3 adapters"):
        flood_requests(FairnessConfig(light_tenants=2), ["a", "b"])


def test_trace_requests_arrivals_mapping_and_fields(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    lines = [{"timestamp": 100.5, "adapter": "prod-sql"}, {"timestamp": "1970-01-01T00:01:41Z", "model": "upper"},
             {"adapter": "prod-chat", "max_tokens": 3, "priority": 2, "tenant": "acme"},
             {"timestamp": 103, "adapter": None}, {"timestamp": 102, "adapter": "prod-sql"}]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    reqs = trace_requests(trace, ["upper", "reverse"], max_tokens=7)
    assert [(r.arrival_s, r.adapter, r.max_tokens, r.priority, r.label) for r in reqs] == [
        (0.0, "upper", 7, 0, "upper"),  # prod-sql -> the first adapter (by first appearance)
        (0.5, "upper", 7, 0, "upper"),  # an adapter the engine serves keeps its name
        (0.5, "reverse", 3, 2, "acme"),  # no timestamp: arrives with the line before; prod-chat -> the next one
        (1.5, "upper", 7, 0, "upper"),
        (2.5, None, 7, 0, "base"),
    ]
    trace.write_text('{"adapter": "a"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2"):
        trace_requests(trace, ["upper"], max_tokens=4)


@pytest.mark.parametrize(("line", "message"), [
    ('{"timestamp": Infinity, "adapter": "a"}', "line 2: timestamp must be a finite number"),  # the replay once waited forever
    ('{"timestamp": "1e999", "adapter": "a"}', "line 2: timestamp must be a finite number"),
    ("[" * 100_000 + "]" * 100_000, "line 2: malformed JSON"),  # was an internal RecursionError
    ('{"adapter": "a", "priority": "high"}', "line 2: priority must be an integer, got 'high'"),  # was an internal ValueError
    ('{"adapter": "a", "priority": NaN}', "line 2: priority must be an integer, got nan"),
    ('{"adapter": "a", "tenant": [1]}', r"line 2: tenant must be a string, got \[1\]"),  # once killed the engine loop
])  # fmt: skip
def test_trace_requests_refuses_hostile_lines_with_their_line_number(tmp_path: Path, line: str, message: str) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 1, "adapter": "a"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message):
        trace_requests(trace, ["upper"], max_tokens=4)


def test_trace_that_is_not_utf8_is_one_line_error(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(b'{"adapter": "\xff\xfe"}\n')
    with pytest.raises(ConfigError, match="t.jsonl is not UTF-8 text"):
        trace_requests(trace, ["upper"], max_tokens=4)
    res = run_cli("--trace", str(trace), "--device", "cpu", "--threads", "1", cache=tmp_path / "cache")
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr and "internal error" not in res.stderr
    assert [line for line in res.stderr.splitlines() if line.strip()][0] == \
        "error: t.jsonl is not UTF-8 text (byte 13): is it a JSONL trace?"


def test_summarize_policy_per_tenant_percentiles_and_tokens_per_s() -> None:
    timings = [Timing("h", 0.0, 1.0, 4.0, 10), Timing("h", 0.0, 3.0, 5.0, 10), Timing("l", 1.0, 1.5, 2.0, 10)]
    res = summarize_policy("fair", timings, engine_steps=30)
    assert res.tenants["h"] == {"requests": 2, "ttft_p50_s": 2.0, "ttft_p99_s": pytest.approx(2.98)}
    assert res.tenants["l"]["ttft_p50_s"] == 0.5
    assert (res.output_tokens, res.duration_s, res.output_tokens_per_s, res.engine_steps) == (30, 5.0, 6.0, 30)


@pytest.mark.parametrize("kwargs, message", [
    ({"workload": "trace"}, "--trace FILE and --workload trace"),
    ({"policies": ("fair", "lottery")}, "policies must be among"),
    ({"light_rate": 0.0}, "--rate must be > 0"),
    ({"heavy_requests": 0}, "--heavy-requests must be"),
])  # fmt: skip
def test_bad_fairness_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FairnessConfig(**kwargs)


def test_trace_replay_through_the_cli_reports_each_policy(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 0, "adapter": "upper"}] * 6 + [{"timestamp": 0.2, "adapter": "reverse", "priority": -1}]
    trace.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    out = tmp_path / "out.json"
    res = run_cli("--trace", str(trace), "--device", "cpu", "--threads", "1", "--max-tokens", "4", "--max-num-seqs", "2",
                  "--policy", "fcfs", "--policy", "priority", "--json", str(out), cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fcfs p50" in res.stdout and "priority p99" in res.stdout and "output tokens/s" in res.stdout
    rep = json.loads(out.read_text())
    assert [p["policy"] for p in rep["policies"]] == ["fcfs", "priority"]
    for p in rep["policies"]:
        assert p["tenants"]["upper"]["requests"] == 6 and p["tenants"]["reverse"]["requests"] == 1
        assert p["output_tokens"] == 28
