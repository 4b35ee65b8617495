"""Scheduling fields on the wire (fake engine): `priority`, `tenant` / X-Tenant-Id, a runtime adapter's `weight`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from tests.server.conftest import running
from tests.server.fake_engine import FakeEngine
from tests.server.test_errors import _fake_adapter


def test_priority_and_tenant_reach_the_engine(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            url = f"{srv.url}/v1/completions"
            assert (await s.post(url, json={"prompt": "a", "max_tokens": 1})).status == 200
            assert (await s.post(url, json={"prompt": "a", "max_tokens": 1, "priority": -3, "tenant": "acme"})).status == 200
            r = await s.post(url, json={"prompt": "a", "max_tokens": 1}, headers={"X-Tenant-Id": "globex"})
            assert r.status == 200
            r = await s.post(url, json={"prompt": "a", "max_tokens": 1, "tenant": "body"}, headers={"X-Tenant-Id": "hdr"})
            assert r.status == 200  # the body wins over the header
            r = await s.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}],
                                                                      "max_tokens": 1, "priority": 2, "tenant": "acme"})
            assert r.status == 200
            assert engine.scheduling == [(0, None), (-3, "acme"), (0, "globex"), (0, "body"), (2, "acme")]
            for bad in ({"priority": "high"}, {"priority": 1.5}, {"tenant": 7}, {"tenant": "two words"}, {"tenant": ""}):
                r = await s.post(url, json={"prompt": "a", **bad})
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] in ("priority", "tenant"), (bad, body)
            r = await s.post(url, json={"prompt": "a"}, headers={"X-Tenant-Id": "a,b"})
            assert r.status == 400 and (await r.json())["error"]["param"] == "tenant"

    arun(go())


def test_runtime_load_takes_a_weight(tokenizer: Any, peft_adapter: Path, tmp_path: Path, arun: Any) -> None:
    _fake_adapter(peft_adapter, tmp_path / "gold")

    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine, allow_runtime_lora=True, adapter_root=str(tmp_path)) as srv, aiohttp.ClientSession() as s:
            load = f"{srv.url}/v1/load_lora_adapter"
            for bad in (0, -1, "2", True):
                r = await s.post(load, json={"lora_name": "gold", "lora_path": str(tmp_path / "gold"), "weight": bad})
                assert r.status == 400 and (await r.json())["error"]["param"] == "weight", bad
            assert "gold" not in engine.adapters
            r = await s.post(load, json={"lora_name": "gold", "lora_path": str(tmp_path / "gold"), "weight": 2.5})
            assert r.status == 200 and engine.weights == {"gold": 2.5}

    arun(go())


def test_serve_flags_build_the_scheduling_config() -> None:
    import pytest

    from engine.errors import ConfigError
    from mlora_cli.serve import build_config

    base = dict(host="127.0.0.1", port=0, allow_runtime_lora=False, grace_period=1.0)
    cfg = build_config(**base, scheduling_policy="priority", lora_weight=["upper=2", "acme=0.5"], max_seqs_per_tenant=3)
    assert cfg.engine.scheduling_policy == "priority" and cfg.engine.max_seqs_per_tenant == 3
    assert cfg.engine.lora_weights == (("upper", 2.0), ("acme", 0.5))
    assert build_config(**base).engine.scheduling_policy == "fair"
    for spec in ("upper", "upper=", "=2", "upper=heavy", "upper=0", "upper=-1"):
        with pytest.raises(ConfigError, match="--lora-weight"):
            build_config(**base, lora_weight=[spec])
