"""The adapter-count and rank sweep of `mlora bench`: `--adapters N[,N...]` and `--rank R[,R...]`."""

from __future__ import annotations

import json

import pytest

from engine.bench.config import BenchConfig
from engine.bench.report import bound_mixed_bytes, bound_mixed_over_homogeneous, compute_ratios
from engine.bench.stats import RequestTiming, summarize
from engine.bench.workloads import adapter_ranks, build_workloads
from engine.errors import ConfigError, UsageError
from tests.bench.test_cli_bench import run_cli


def test_adapters_choose_the_mixed_workloads_instead_of_powers_of_two():
    wls = {w.name: w for w in build_workloads(num_requests=64, max_tokens=4, max_loras=64, adapters=(16, 32, 64))}
    mixed = {n: w for n, w in wls.items() if w.kind == "mixed"}
    assert sorted(mixed) == ["mixed-16", "mixed-32", "mixed-64"]
    assert all(len(w.adapters) == w.num_adapters == int(n.split("-")[1]) for n, w in mixed.items())
    with pytest.raises(ConfigError, match="needs 32 adapter slots"):
        build_workloads(num_requests=64, max_tokens=4, max_loras=16, adapters=(32,))


def test_ranks_cycle_across_adapters_the_first_is_the_homogeneous_one():
    assert adapter_ranks(5, (8, 64), 64) == [8, 64, 8, 64, 8]
    assert adapter_ranks(3, (), 16) == [16, 16, 16]


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(rank=16, ranks=(8, 64)), "exceed the slot rank 16"),
    (dict(adapters=(32,), max_loras=16), "--adapters 32 needs as many slots"),
    (dict(adapters=(40,), max_loras=64, num_requests=32), "needs at least as many requests"),
    (dict(adapters=(0,)), "--adapters must be integers >= 1"),
])
def test_config_refuses_a_sweep_it_cannot_run(kwargs, message):
    with pytest.raises(UsageError, match=message):
        BenchConfig(**kwargs)


def _result(name, kind, n, seconds):
    ts = [RequestTiming(arrival=0.0, first_token=0.1, last_token=0.1 + seconds, finished=0.1 + seconds, num_tokens=8)
          for _ in range(4)]  # fmt: skip
    return summarize(name, kind, "mlora", n, ts, start=0.0, end=0.1 + seconds, adapter_loads=0, adapter_evictions=0)


def test_mixed_rank_bound_counts_each_adapter_at_its_own_rank():
    w, a8, a64 = 1000, 10, 80
    results = [_result("homogeneous", "homogeneous", 1, 1.0), _result("mixed-2", "mixed", 2, 1.1)]
    out = compute_ratios(results, w=w, a=a8, metric="decode_tokens_per_s", mixed_bytes={"mixed-2": a8 + a64})
    assert out["bounds"]["mixed_over_homogeneous"] == pytest.approx((w + a8) / (w + a8 + a64))
    assert out["mixed"][0]["ratio"] == pytest.approx(1.0 / 1.1)
    # two adapters of one rank: the same as the N * a formula
    assert bound_mixed_bytes(w, a8, 2 * a8) == pytest.approx(bound_mixed_over_homogeneous(w, a8, 2))


def test_cli_sweep_runs_the_asked_n_and_ranks(tmp_path):
    out = tmp_path / "sweep.json"
    res = run_cli("--preset", "tiny", "--adapters", "3", "--rank", "4,8", "--num-requests", "4", "--max-tokens", "2",
                  "--no-alternatives", "--no-churn", "--json", str(out), cache=tmp_path / "cache")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert (rep["config"]["rank"], rep["config"]["ranks"], rep["config"]["adapters"]) == (8, [4, 8], [3])
    assert rep["config"]["max_loras"] == 16 and [m["n"] for m in rep["mixed"]] == [3]
    a4 = rep["traffic"]["a_bytes"]  # the homogeneous adapter, lora-000, is r4; mixed-3 holds r4 + r8 + r4
    assert rep["traffic"]["mixed_adapter_bytes"] == {"mixed-3": 4 * a4}
    assert "mixed-3 / homogeneous" in res.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--rank", "8,x"], "--rank must be positive integers separated by commas"),
    (["--adapters", "0"], "--adapters must be positive integers"),
    (["--rank", "8,16", "--kernels"], "several --rank values apply to the standard workload only"),
])
def test_bad_sweep_flags_are_one_line_errors(tmp_path, args, message):
    res = run_cli("--preset", "tiny", *args, cache=tmp_path)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
