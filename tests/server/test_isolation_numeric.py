"""Numerical isolation through the real server (real AsyncLLM on the demo model, fp32, CPU):
poisoned adapters are refused at runtime load with a 400 and the reason; one that gets past
validation fails only its own requests (500 with the reason) while every other tenant's
concurrent greedy and sampled requests equal their solo runs; an engine loop that cannot continue
turns /health into 503 and makes `serve` exit non-zero."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig
from engine.errors import EngineDeadError
from engine.loader import demo_adapters
from engine.server.config import ServerConfig
from tests.server.real_server import KEY, ServerThread

AUTH = {"Authorization": f"Bearer {KEY}"}
TENANTS = [("hello world", None), ("the cat sat on the mat", "upper"), ("abc", "reverse"),
           ("isolation matters a lot here", "rot13"), ("x", None), ("one more", "upper")]


def _engine_cfg() -> EngineConfig:
    # a small pool of small blocks: freed blocks come back quickly, so stale K/V would be read if it could
    return EngineConfig(dtype="float32", device="cpu", seed=0, enable_lora=True, max_loras=4,
                        num_kv_blocks=48, block_size=4)


def _poison_b(d: Path, factor: float, dtype: torch.dtype | None = None) -> None:
    p = d / "adapter_model.safetensors"
    sd = load_file(str(p))
    sd = {k: (t.to(dtype) if dtype is not None else t) * (factor if "lora_B" in k else 1.0) for k, t in sd.items()}
    save_file(sd, str(p), metadata={"format": "pt"})


def _alpha(d: Path, alpha: float) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_alpha"] = alpha
    (d / "adapter_config.json").write_text(json.dumps(cfg))


POISONS = {
    "fp32_B_x1e30": lambda d: _poison_b(d, 1e30),
    "f64_B_x1e300": lambda d: _poison_b(d, 1e300, torch.float64),
    "alpha_1e30": lambda d: _alpha(d, 1e30),
    "alpha_1e308": lambda d: _alpha(d, 1e308),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("adapter_root")
    for kind, poison in POISONS.items():
        shutil.copytree(dict(demo_adapters())["upper"], r / kind)
        poison(r / kind)
    return r


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[ServerThread]:
    srv = ServerThread(ServerConfig(engine=_engine_cfg(), port=0, api_key=KEY, allow_runtime_lora=True,
                                    adapter_root=str(root))).start()
    yield srv
    srv.stop()


async def _complete(s: aiohttp.ClientSession, url: str, prompt: str, model: str, **kw: Any) -> tuple[int, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **kw}
    r = await s.post(f"{url}/v1/completions", json=body)
    return r.status, await r.json()


def _model(server: ServerThread, adapter: str | None) -> str:
    return server.engine.model_name if adapter is None else adapter


@pytest.mark.parametrize("kind", list(POISONS))
def test_runtime_load_of_a_poisoned_adapter_is_a_400_with_the_reason(server, kind):
    async def go() -> None:
        async with aiohttp.ClientSession(headers=AUTH) as s:
            r = await s.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": kind})
            assert r.status == 400, await r.text()
            msg = (await r.json())["error"]["message"]
            assert ("magnitude" in msg or "finite" in msg) and ("gain" in msg or "scaling" in msg or "Inf" in msg), msg
            models = await (await s.get(f"{server.url}/v1/models")).json()
            assert "evil" not in {m["id"] for m in models["data"]}
            status, _ = await _complete(s, server.url, "still fine", "upper")
            assert status == 200

    asyncio.run(go())


def test_a_request_that_turns_non_finite_fails_alone_over_http(server, monkeypatch):
    """Past validation on purpose (both checks switched off): the poisoned request gets a 500 with
    the reason; all other tenants' concurrent greedy and seeded sampled requests, and requests after
    it, equal their solo runs; /health stays 200 and the KV cache drains to empty."""
    import engine.adapters.loader as adapter_loader
    import engine.server.app as app_module

    monkeypatch.setattr(app_module, "_validation_failures", lambda path, config: [])
    monkeypatch.setattr(adapter_loader, "module_value_issue", lambda *a, **k: None)
    sampled = {"temperature": 0.9, "top_p": 0.95}

    async def go() -> None:
        async with aiohttp.ClientSession(headers=AUTH) as s:
            url = server.url
            solo = [await _complete(s, url, p, _model(server, a)) for p, a in TENANTS]
            solo_sampled = [await _complete(s, url, p, _model(server, a), seed=40 + i, **sampled)
                            for i, (p, a) in enumerate(TENANTS)]
            assert all(st == 200 for st, _ in solo + solo_sampled)
            r = await s.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "fp32_B_x1e30"})
            assert r.status == 200, await r.text()
            status, body = await _complete(s, url, "poison first", "evil")
            assert status == 500 and "non-finite" in body["error"]["message"], body
            for _ in range(2):
                jobs = [_complete(s, url, "poison again", "evil")]
                jobs += [_complete(s, url, p, _model(server, a)) for p, a in TENANTS]
                jobs += [_complete(s, url, p, _model(server, a), seed=40 + i, **sampled) for i, (p, a) in enumerate(TENANTS)]
                jobs += [_complete(s, url, "and more poison", "evil", seed=3, **sampled)]
                got = await asyncio.gather(*jobs)
                for st, b in (got[0], got[-1]):
                    assert st == 500 and "non-finite" in b["error"]["message"] and "'evil'" in b["error"]["message"]
                mid = got[1:-1]
                for (st, b), (_, want) in zip(mid, solo + solo_sampled):
                    assert st == 200 and b["choices"][0]["text"] == want["choices"][0]["text"]
            after = [await _complete(s, url, p, _model(server, a)) for p, a in TENANTS]
            assert [b["choices"][0]["text"] for _, b in after] == [b["choices"][0]["text"] for _, b in solo]
            assert (await s.get(f"{url}/health")).status == 200
            assert (await s.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "evil"})).status == 200
        stats = server.engine.stats()
        assert stats.kv_free_blocks == stats.kv_total_blocks

    asyncio.run(go())


async def _stream(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, list[Any]]:
    """(status, the SSE events' JSON, "[DONE]" as is) of a streamed completion; (status, [error body]) if refused."""
    r = await s.post(f"{url}/v1/completions", json={**body, "stream": True})
    if r.status != 200:
        return r.status, [await r.json()]
    events = []
    async for line in r.content:
        text = line.decode().strip()
        if text.startswith("data: "):
            data = text[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return r.status, events


def test_a_request_whose_own_constraints_leave_no_token_is_a_400_not_a_500(server):
    """Sampling constraints that leave no token to sample were reported like non-finite model logits (500
    server_error). What is knowable up front is a 400 before anything starts; what only the engine sees
    (a multi-token bad word that completes, a tiny repetition_penalty over a temperature) ends the request
    with a 400 invalid_request_error naming the field, in the stream's error event (code 400) once the
    headers are sent; concurrent requests of other tenants equal their solo runs, and the server keeps serving."""

    async def go() -> None:
        async with aiohttp.ClientSession(headers=AUTH) as s:
            url, base = server.url, server.engine.model_name
            a = server.engine.tokenizer.encode("a", add_special_tokens=False)
            solo = [await _complete(s, url, p, _model(server, m)) for p, m in TENANTS]
            # knowable before any step: refused up front, naming the field
            for kw, param, says in (({"allowed_token_ids": a, "bad_words": ["a"]}, "allowed_token_ids", "bad_words"),
                                    ({"allowed_token_ids": [2], "min_tokens": 2, "ignore_eos": False},  # 2: EOS
                                     "allowed_token_ids", "min_tokens"),
                                    ({"repetition_penalty": 1e-300}, "repetition_penalty", "float32")):
                status, body = await _complete(s, url, "hello world", base, **kw)
                assert status == 400 and body["error"]["param"] == param and says in body["error"]["message"], body
            # only the engine sees it: "aa" is two tokens, so "a" is masked once the output ends with "a"
            words = {"allowed_token_ids": a, "bad_words": ["aa"], "max_tokens": 6, "ignore_eos": False}
            jobs = [_complete(s, url, "hello world", base, **words)]
            jobs += [_complete(s, url, p, _model(server, m)) for p, m in TENANTS]
            jobs += [_complete(s, url, "hello world", "upper", temperature=1.0, seed=1, repetition_penalty=1e-38)]
            got = await asyncio.gather(*jobs)
            for (status, body), param, says in ((got[0], "allowed_token_ids", "allowed_token_ids and bad_words"),
                                                (got[-1], "repetition_penalty", "repetition_penalty and temperature")):
                err = body["error"]
                assert status == 400 and err["type"] == "invalid_request_error" and err["code"] == 400, body
                assert err["param"] == param and says in err["message"] and "non-finite" not in err["message"], body
            assert "output token 2" in got[0][1]["error"]["message"]
            for (status, body), (_, want) in zip(got[1:-1], solo):
                assert status == 200 and body["choices"][0]["text"] == want["choices"][0]["text"]
            # streamed, ended after the first token: the error event carries the same 400
            status, events = await _stream(s, url, {"model": base, "prompt": "hello world", "temperature": 0, **words})
            assert status == 200 and events[-1] == "[DONE]", events
            assert events[0]["choices"][0]["text"] == "a"
            err = events[-2]["error"]
            assert err["code"] == 400 and err["param"] == "allowed_token_ids" and "bad_words" in err["message"], events
            # streamed, ended at its first token: the headers are not sent yet, so a plain HTTP 400
            status, events = await _stream(s, url, {"model": base, "prompt": "hello world", "temperature": 1.0,
                                                    "seed": 1, "repetition_penalty": 1e-38})
            assert status == 400 and events[0]["error"]["param"] == "repetition_penalty", events
            r = await s.post(f"{url}/v1/chat/completions", json={"model": base, "messages": [{"role": "user", "content": "hi"}],
                                                                 "max_tokens": 6, **words})
            assert r.status == 400 and (await r.json())["error"]["param"] == "allowed_token_ids"
            after = [await _complete(s, url, p, _model(server, m)) for p, m in TENANTS]
            assert [b["choices"][0]["text"] for _, b in after] == [b["choices"][0]["text"] for _, b in solo]
            assert (await s.get(f"{url}/health")).status == 200
        stats = server.engine.stats()
        assert stats.kv_free_blocks == stats.kv_total_blocks

    asyncio.run(go())


def test_an_engine_loop_that_cannot_continue_makes_health_503(monkeypatch):
    """Every step fails (a lost device): each failed step's request gets a 500 with the reason, then
    the engine gives up, /health answers 503 and new requests 503."""
    srv = ServerThread(ServerConfig(engine=_engine_cfg(), port=0, api_key=KEY)).start()
    try:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("device lost")

        monkeypatch.setattr(srv.engine.core.runner, "run", broken)

        async def go() -> None:
            async with aiohttp.ClientSession(headers=AUTH) as s:
                assert (await s.get(f"{srv.url}/health")).status == 200
                statuses = [(await _complete(s, srv.url, "hi", srv.engine.model_name))[0] for _ in range(3)]
                assert statuses[:2] == [500, 500] and statuses[2] == 503
                r = await s.get(f"{srv.url}/health")
                assert r.status == 503 and "device lost" in await r.text()
                status, body = await _complete(s, srv.url, "hi", srv.engine.model_name)
                assert status == 503 and "engine loop failed" in body["error"]["message"]

        asyncio.run(go())
    finally:
        srv.stop()


def test_serve_exits_non_zero_when_the_engine_dies(monkeypatch):
    """`serve` (what `mlora serve` runs) raises EngineDeadError (exit 1 in the CLI) instead of
    staying up with a dead engine."""
    from engine.core import EngineCore
    from engine.server.run import serve_async

    def dead_step(self: Any) -> Any:
        raise EngineDeadError("3 engine steps failed in a row; last: RuntimeError: device lost")

    monkeypatch.setattr(EngineCore, "has_unfinished", lambda self: True)
    monkeypatch.setattr(EngineCore, "step", dead_step)
    cfg = ServerConfig(engine=_engine_cfg(), port=0, api_key=KEY)
    with pytest.raises(EngineDeadError, match="the engine died: EngineDeadError: 3 engine steps failed") as exc:
        asyncio.run(asyncio.wait_for(serve_async(cfg), timeout=120))
    assert exc.value.exit_code == 1


def test_a_ray_replica_with_a_dead_engine_fails_its_health_check():
    """Ray Serve calls check_health() on each replica and replaces one that raises."""
    from engine.server.ray_replica import MloraReplica

    class Engine:
        error: str | None = None

    replica = MloraReplica.__new__(MloraReplica)
    replica.engine = Engine()
    asyncio.run(replica.check_health())
    replica.engine.error = "EngineDeadError: device lost"
    with pytest.raises(RuntimeError, match="the engine died: EngineDeadError: device lost"):
        asyncio.run(replica.check_health())
