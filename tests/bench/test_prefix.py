"""`mlora bench --workload shared-prefix`: its requests, numbers and flags (the engine run is the bench itself),
plus the prefix-cache series in /metrics and the serve flag."""

from __future__ import annotations

import pytest

from engine.bench.prefix import PrefixConfig, compare, hit_rate, shared_prefix_requests
from engine.core import EngineStats
from engine.errors import UsageError
from engine.server.metrics import ServerMetrics
from mlora_cli.serve import build_config


def test_requests_share_one_system_prompt_per_tenant_and_differ_in_the_user_turn() -> None:
    cfg = PrefixConfig(tenants=8, system_tokens=512, user_tokens=16, num_requests=64, max_tokens=32)
    reqs = shared_prefix_requests(cfg, vocab_size=32000)
    assert len(reqs) == 64 and all(len(r.prompt_token_ids) == 528 and r.max_tokens == 32 for r in reqs)
    assert [r.tenant for r in reqs[:9]] == [0, 1, 2, 3, 4, 5, 6, 7, 0]  # interleaved tenants
    assert len({r.adapter for r in reqs}) == 8
    for t in range(8):
        mine = [r.prompt_token_ids for r in reqs if r.tenant == t]
        assert len({p[:512] for p in mine}) == 1 and len({p[512:] for p in mine}) == len(mine)
    assert len({r.prompt_token_ids[:512] for r in reqs}) == 8
    assert shared_prefix_requests(cfg, 32000) == reqs  # seeded
    assert all(16 <= t < 32000 for r in reqs for t in r.prompt_token_ids)


def test_numbers_and_config() -> None:
    assert hit_rate(0, 0) is None and hit_rate(200, 150) == 0.75
    off = {"result": {"ttft_s": {"p50": 3.0}, "output_tokens_per_s": 100.0}}
    on = {"result": {"ttft_s": {"p50": 0.5}, "output_tokens_per_s": 250.0}}
    assert compare(off, on) == {"ttft_p50_speedup": 6.0, "tokens_per_s_ratio": 2.5}
    with pytest.raises(UsageError, match="--tenants"):
        PrefixConfig(tenants=0)
    with pytest.raises(UsageError, match="exactly one"):
        PrefixConfig(preset="small", model="x")


def test_prefix_cache_counters_in_metrics() -> None:
    m = ServerMetrics("base", max_loras=2)
    m.refresh(EngineStats(prefix_cache_queries=1000, prefix_cache_hits=750))
    text = m.render().decode()
    assert 'vllm:prefix_cache_queries_total{engine="0",model_name="base"} 1000.0' in text
    assert 'vllm:prefix_cache_hits_total{engine="0",model_name="base"} 750.0' in text


def test_serve_flag_turns_prefix_caching_off() -> None:
    base = dict(host="127.0.0.1", port=8000, allow_runtime_lora=False, grace_period=10.0)
    assert build_config(**base).engine.enable_prefix_caching is True  # on by default, as vLLM
    assert build_config(**base, enable_prefix_caching=False).engine.enable_prefix_caching is False
