"""Unloading an adapter removes its /metrics series (issue 15: 200 loads/unloads left 15,600)."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

from engine.outputs import RequestOutput
from engine.server.metrics import ServerMetrics


def _series_for(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#") and f'adapter="{name}"' in line]


def _serve_one(m: ServerMetrics, label: str) -> None:
    t = m.tracker(label)
    t.on_output(RequestOutput("r", "hi", [1, 2], adapter=label, token_ids=[5], delta_token_ids=[5]))
    t.on_output(RequestOutput("r", "hi", [1, 2], adapter=label, token_ids=[5, 6], delta_token_ids=[6],
                              finished=True, finish_reason="stop"))


def test_forget_adapter_drops_every_series_of_it() -> None:
    m = ServerMetrics("base", max_loras=2)
    _serve_one(m, "base")
    for i in range(200):
        _serve_one(m, f"ad{i}")
        m.count_error(f"ad{i}", 400)
        m.forget_adapter(f"ad{i}")
    text = m.render().decode()
    assert not any(_series_for(text, f"ad{i}") for i in range(200))
    assert _series_for(text, "base")  # the base model's series are kept
    m.forget_adapter("base")  # the base model is never "unloaded"
    assert _series_for(m.render().decode(), "base")


def test_a_request_finishing_after_the_unload_leaves_nothing_behind() -> None:
    m = ServerMetrics("base", max_loras=2)
    t = m.tracker("late")
    t.on_output(RequestOutput("r", "hi", [1], adapter="late", token_ids=[5], delta_token_ids=[5]))
    m.forget_adapter("late")
    t.on_output(RequestOutput("r", "hi", [1], adapter="late", token_ids=[5, 6], delta_token_ids=[6],
                              finished=True, finish_reason="stop"))
    assert _series_for(m.render().decode(), "late") == []
    m.count_error("late", 404)  # a request racing the unload
    assert _series_for(m.render().decode(), "late") == []
    _serve_one(m, "late")  # loaded again and used: counted again
    assert _series_for(m.render().decode(), "late")


def test_server_load_unload_cycles_leave_no_series(tmp_path: Path) -> None:
    """Through HTTP: load, use and unload 20 adapters; /metrics holds none of them afterwards."""
    from engine.config import EngineConfig
    from engine.demo import DEMO_ADAPTERS
    from engine.server.config import ServerConfig
    from tests.server.real_server import KEY, ServerThread

    root = tmp_path / "root"
    shutil.copytree(DEMO_ADAPTERS["upper"], root / "up")
    cfg = ServerConfig(engine=EngineConfig(max_loras=2), port=0, api_key=KEY, allow_runtime_lora=True,
                       adapter_root=str(root))
    srv = ServerThread(cfg).start()

    def post(path: str, body: dict) -> tuple[int, bytes]:
        req = urllib.request.Request(f"{srv.url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()

    try:
        for i in range(20):
            assert post("/v1/load_lora_adapter", {"lora_name": f"t{i}", "lora_path": "up"})[0] == 200
            status, body = post("/v1/completions", {"model": f"t{i}", "prompt": "hello", "max_tokens": 8,
                                                    "temperature": 0})
            assert status == 200 and json.loads(body)["choices"][0]["text"] == "HELLO"
            assert post("/v1/unload_lora_adapter", {"lora_name": f"t{i}"})[0] == 200
        text = urllib.request.urlopen(f"{srv.url}/metrics", timeout=30).read().decode()
        assert not re.search(r'adapter="t\d+"', text), [l for l in text.splitlines() if 'adapter="t' in l][:3]
        # nor tenant series: each adapter was its own tenant (fair share), forgotten with it
        assert not re.search(r'tenant="t\d+"', text), [l for l in text.splitlines() if 'tenant="t' in l][:3]
    finally:
        srv.stop()
