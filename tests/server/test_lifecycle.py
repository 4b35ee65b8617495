"""Client disconnects abort their requests; shutdown drains within the grace period (fake engine)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from engine.server.config import ServerConfig
from engine.server.run import shutdown, start_server
from tests.server.fake_engine import FakeEngine


async def _until(cond: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_disconnected_streams_are_aborted(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer, delay=0.005, max_model_len=20_000)  # room for max_tokens 10_000
        cfg = ServerConfig(engine=engine.config, port=0)
        srv = await start_server(engine, cfg)
        try:
            body = {"model": "upper", "prompt": "abc", "max_tokens": 10_000, "ignore_eos": True, "stream": True}
            for _ in range(3):
                async with aiohttp.ClientSession() as s:
                    r = await s.post(f"{srv.url}/v1/completions", json=body)
                    for _ in range(3):  # a few events, then hang up
                        line = await r.content.readline()
                        assert line.startswith(b"data: ") or line == b"\n"
                    r.close()
            await _until(lambda: not engine.live)
            assert len(engine.aborted) == 3
            # a non-streamed request whose client gives up is aborted too (handler cancellation)
            async with aiohttp.ClientSession() as s:
                task = asyncio.create_task(s.post(f"{srv.url}/v1/completions", json={**body, "stream": False}))
                await _until(lambda: len(engine.live) == 1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            await _until(lambda: not engine.live)
            assert len(engine.aborted) == 4
            assert engine.stats().kv_free_blocks == FakeEngine.KV_BLOCKS
        finally:
            await shutdown(srv, engine, 0.1)

    arun(go())


def test_shutdown_lets_in_flight_finish_within_grace(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer, delay=0.01)
        srv = await start_server(engine, ServerConfig(engine=engine.config, port=0))
        async with aiohttp.ClientSession() as s:
            req = asyncio.create_task(s.post(f"{srv.url}/v1/completions",
                                             json={"model": "upper", "prompt": "a" * 20, "max_tokens": 20}))
            await _until(lambda: engine.live)
            await shutdown(srv, engine, grace_period=30.0)
            r = await req
            assert r.status == 200 and (await r.json())["choices"][0]["text"] == "A" * 20
            with pytest.raises(aiohttp.ClientConnectionError):  # no longer accepting
                await s.get(f"{srv.url}/health")

    arun(go())


def test_shutdown_aborts_what_outlives_the_grace_period(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer, delay=0.001)
        engine.gate = asyncio.Event()  # generation never proceeds on its own
        srv = await start_server(engine, ServerConfig(engine=engine.config, port=0))
        async with aiohttp.ClientSession() as s:
            plain = asyncio.create_task(s.post(f"{srv.url}/v1/completions", json={"prompt": "abc"}))
            streamed = await s.post(f"{srv.url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "abc"}], "stream": True})
            assert streamed.status == 200  # headers and the first token are out; the rest is held
            await _until(lambda: len(engine.live) == 2)
            await shutdown(srv, engine, grace_period=0.2)
            r = await plain
            assert r.status == 503 and "shutting down" in (await r.json())["error"]["message"]
            raw = (await streamed.read()).decode()
            events = [b[len("data: "):] for b in raw.strip().split("\n\n")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == 503
            assert not engine.live

    arun(go())


def test_busy_port_is_a_one_line_config_error(tokenizer: Any, arun: Any) -> None:
    import socket

    from engine.errors import ConfigError

    async def go() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            engine = FakeEngine(tokenizer)
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
                await start_server(engine, ServerConfig(engine=engine.config, port=port))

    arun(go())
