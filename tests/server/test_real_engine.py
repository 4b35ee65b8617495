"""Acceptance tests against the REAL engine on a tiny Llama: a real server on a loopback port,
driven with the `openai` client (completions and chat, streamed and not) and raw HTTP.

Oracle: the offline `LLM.generate` on the same model (greedy), and the same request sent alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.server.config import ServerConfig
from tests.server.real_server import KEY, ServerThread, concurrency_check, scrape

MAX_LEN = 128


def _engine_config(model: Path, **kw: Any) -> EngineConfig:
    return EngineConfig(model=str(model), dtype="float32", device="cpu", max_model_len=MAX_LEN, seed=0, **kw)


@pytest.fixture(scope="module")
def server(tiny_base: Path) -> Iterator[ServerThread]:
    srv = ServerThread(ServerConfig(engine=_engine_config(tiny_base), port=0, api_key=KEY)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(tiny_base: Path) -> Any:
    from engine import LLM

    return LLM(model=str(tiny_base), dtype="float32", device="cpu", max_model_len=MAX_LEN)


def _greedy(offline: Any, prompt: str, max_tokens: int) -> str:
    return offline.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0].text


def test_openai_client_completions_and_chat(server: ServerThread, offline: Any) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    base = server.engine.model_name
    expected = _greedy(offline, "hello world", 12)
    assert expected  # the tiny model says something

    r = client.completions.create(model=base, prompt="hello world", max_tokens=12, temperature=0)
    assert r.choices[0].text == expected and r.id.startswith("cmpl-") and r.model == base
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12

    chunks = list(client.completions.create(model=base, prompt="hello world", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    # no chat template on the byte tokenizer: the fallback makes a one-message chat a completion of it
    msgs = [{"role": "user", "content": "hello world"}]
    chat = client.chat.completions.create(model=base, messages=msgs, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == expected and chat.choices[0].message.role == "assistant"
    assert chat.id.startswith("chatcmpl-")
    stream = client.chat.completions.create(model=base, messages=msgs, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected

    # seeded sampling is reproducible through the server
    a = client.completions.create(model=base, prompt="abc", max_tokens=8, temperature=1.0, seed=7)
    b = client.completions.create(model=base, prompt="abc", max_tokens=8, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_64_concurrent_base_requests_equal_alone(server: ServerThread, offline: Any) -> None:
    concurrency_check(server, offline, [server.engine.model_name])


def test_disconnecting_10_streams_frees_their_kv_blocks(server: ServerThread) -> None:
    free_before = scrape(server.url, "mlora:kv_cache_free_blocks")
    body = {"model": server.engine.model_name, "prompt": "a long one", "max_tokens": 100, "ignore_eos": True,
            "temperature": 0, "stream": True}

    async def go() -> None:
        sessions = [aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) for _ in range(10)]
        try:
            resps = await asyncio.gather(*(s.post(f"{server.url}/v1/completions", json=body) for s in sessions))
            for r in resps:
                assert r.status == 200
                line = await r.content.readline()  # the first token's event
                event = json.loads(line[len(b"data: "):])
                assert event["choices"][0]["finish_reason"] is None  # mid-generation
            assert scrape(server.url, "mlora:kv_cache_free_blocks") < free_before
            for r in resps:
                r.close()  # hang up
        finally:
            for s in sessions:
                await s.close()

    asyncio.run(go())
    deadline = time.monotonic() + 30
    while scrape(server.url, "mlora:kv_cache_free_blocks") != free_before:
        assert time.monotonic() < deadline, "KV blocks of disconnected streams were not freed"
        time.sleep(0.02)


def test_errors_and_auth_against_the_real_engine(server: ServerThread) -> None:
    base = server.engine.model_name

    async def go() -> None:
        auth = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession() as s:
            url = f"{server.url}/v1/completions"

            async def err(r: aiohttp.ClientResponse, status: int) -> str:
                assert r.status == status
                return (await r.json())["error"]["message"]

            assert "nope" in await err(await s.post(url, json={"model": "nope", "prompt": "a"}, headers=auth), 404)
            await err(await s.post(url, data=b'{"prompt": ', headers=auth), 400)
            long_prompt = "z" * (MAX_LEN + 20)
            await err(await s.post(url, json={"model": base, "prompt": long_prompt}, headers=auth), 400)
            await err(await s.post(f"{server.url}/v1/chat/completions", headers=auth,
                                   json={"model": base, "messages": [{"role": "user", "content": long_prompt}]}), 400)
            await err(await s.post(url, json={"model": base, "prompt": "a"}), 401)
            await err(await s.get(f"{server.url}/v1/models"), 401)
            assert (await s.get(f"{server.url}/health")).status == 200
            assert (await s.get(f"{server.url}/metrics")).status == 200
            models = await (await s.get(f"{server.url}/v1/models", headers=auth)).json()
            assert models["data"][0]["id"] == base and models["data"][0]["parent"] is None
            # a priority under the default (fair) policy would be silently ignored: refused, as vLLM does
            r = await s.post(url, json={"model": base, "prompt": "a", "priority": 1}, headers=auth)
            msg = await err(r, 400)
            assert "priority" in msg and "--scheduling-policy priority" in msg
            assert (await r.json())["error"]["param"] == "priority"  # was null: ConfigError carried no param
            r = await s.post(url, json={"model": base, "prompt": "still fine", "max_tokens": 2, "priority": 0}, headers=auth)
            assert r.status == 200

    asyncio.run(go())


def test_prompt_token_ids_are_checked_against_the_models_vocabulary(server: ServerThread) -> None:
    """The engine's InputProcessor is the one check: ids up to the MODEL's vocabulary (larger than the
    tokenizer's here, as in real models) are served, as vLLM; one id past it refuses the whole batch with
    400 naming `prompt` before any prompt starts, and the server keeps serving."""
    base, eng = server.engine.model_name, server.engine
    vocab, tok_len = eng.processor.vocab_size, len(eng.tokenizer)
    assert vocab > tok_len  # tests/tiny.py: the model's vocabulary is a little larger than the tokenizer's

    async def go() -> None:
        auth = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(headers=auth) as s:
            url = f"{server.url}/v1/completions"
            ok = {"model": base, "prompt": [104, tok_len, vocab - 1], "max_tokens": 2, "temperature": 0,
                  "echo": True, "logprobs": 1}
            r = await s.post(url, json=ok)
            assert r.status == 200, await r.text()
            assert (await r.json())["usage"]["prompt_tokens"] == 3
            before = eng.stats().tenant_prompt_tokens
            for stream in (False, True):
                r = await s.post(url, json={"model": base, "prompt": [[104, 105], [104, vocab]], "n": 2,
                                            "max_tokens": 2, "stream": stream})
                assert r.status == 400, await r.text()
                err = (await r.json())["error"]
                assert err["param"] == "prompt" and err["message"].startswith(
                    f"prompt token id {vocab} is out of range [0, {vocab})"), err
            assert eng.stats().tenant_prompt_tokens == before  # the good first prompt never ran
            r = await s.post(url, json={"model": base, "prompt": "still fine", "max_tokens": 2})
            assert r.status == 200

    asyncio.run(go())


def test_queue_overflow_is_429_with_retry_after(tiny_base: Path) -> None:
    srv = ServerThread(ServerConfig(engine=_engine_config(tiny_base, max_num_seqs=1, max_queue=1), port=0)).start()
    body = {"model": srv.engine.model_name, "prompt": "hold", "max_tokens": 110, "ignore_eos": True, "stream": True}
    try:
        async def go() -> None:
            async with aiohttp.ClientSession() as s:
                url = f"{srv.url}/v1/completions"
                running = await s.post(url, json=body)
                await running.content.readline()  # running: it holds the only sequence slot
                waiting = asyncio.create_task(s.post(url, json=body))
                while scrape(srv.url, "vllm:num_requests_waiting") < 1:
                    await asyncio.sleep(0.01)
                r = await s.post(url, json=body)
                assert r.status == 429 and r.headers["Retry-After"] == "1"
                assert "queue" in (await r.json())["error"]["message"]
                running.close()
                assert (await waiting).status == 200

        asyncio.run(go())
    finally:
        srv.stop()


def test_hostile_requests_never_take_the_server_down(server: ServerThread) -> None:
    """Odd but parseable requests get a JSON 4xx or a normal answer; afterwards the engine still answers."""
    base = server.engine.model_name
    probe = {"model": base, "prompt": "probe", "max_tokens": 6, "temperature": 0}
    c = f"{server.url}/v1/completions"
    nasty_bodies: list[Any] = [
        b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "top_p": Infinity}', b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe garbage", b"", b"null", b'"just a string"',
    ]
    nasty_json: list[dict[str, Any]] = [
        {"prompt": "a", "temperature": 1e-30, "max_tokens": 3},
        {"prompt": "a", "temperature": 1e300, "max_tokens": 3},
        {"prompt": "a", "seed": 2**70},
        {"prompt": "a", "seed": -1, "temperature": 1.0, "max_tokens": 3},
        {"prompt": "a", "top_k": 10**9, "temperature": 1.0, "max_tokens": 3},
        {"prompt": "a", "top_p": 1e-30, "temperature": 1.0, "max_tokens": 3},
        {"prompt": "a", "max_tokens": 10**12},
        {"prompt": "a", "max_tokens": 2, "logprobs": 20},
        {"prompt": "a", "max_tokens": 2, "stop": [""] + ["x" * 50] * 200},
        {"prompt": "a", "max_tokens": 2, "stop_token_ids": [10**12, -5]},
        {"prompt": [[]]}, {"prompt": [-1]}, {"prompt": [10**9]}, {"prompt": "\x00\ud83d\ude00 \u202e"},
        {"prompt": ["a", "b"], "n": 16, "max_tokens": 2, "echo": True},
        {"prompt": "a", "max_tokens": 2, "n": 0}, {"prompt": "a", "best_of": 3},
    ]

    async def go() -> None:
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        async with aiohttp.ClientSession(headers=auth) as s:
            before = await (await s.post(c, json=probe)).json()
            for raw in nasty_bodies:
                for path in ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"):
                    r = await s.post(server.url + path, data=raw)
                    assert r.status in (400, 403), (path, raw[:40], r.status)
                    assert "error" in await r.json()
            for body in nasty_json:
                r = await s.post(c, json={"model": base, **body})
                text = await r.text()
                assert r.status in (200, 400), (body, r.status, text)
                assert "Traceback" not in text
            after = await (await s.post(c, json=probe)).json()
            assert after["choices"][0]["text"] == before["choices"][0]["text"]
            assert (await s.get(f"{server.url}/health")).status == 200

    asyncio.run(go())


def test_one_tenant_cannot_fill_the_queue_for_the_others(tiny_base: Path) -> None:
    """--max-queue-per-tenant: a tenant holding its quota of unfinished requests gets 429 for more,
    while another tenant (a `tenant` field here; an adapter counts the same way) is still admitted and
    served; the quota frees as the tenant's requests finish."""
    cfg = _engine_config(tiny_base, max_num_seqs=1, max_queue=64, max_queue_per_tenant=2)
    srv = ServerThread(ServerConfig(engine=cfg, port=0)).start()
    base = srv.engine.model_name
    hold = {"model": base, "prompt": "hold", "max_tokens": 110, "ignore_eos": True, "stream": True, "tenant": "flood"}
    try:
        async def go() -> None:
            async with aiohttp.ClientSession() as s:
                url = f"{srv.url}/v1/completions"
                first = await s.post(url, json=hold)
                await first.content.readline()  # running
                second = asyncio.create_task(s.post(url, json=hold))
                while scrape(srv.url, "vllm:num_requests_waiting") < 1:
                    await asyncio.sleep(0.01)
                r = await s.post(url, json=hold)  # the flooder's third: over its quota
                assert r.status == 429 and r.headers["Retry-After"] == "1"
                assert "flood" in (await r.json())["error"]["message"]
                other = await s.post(url, json={"model": base, "prompt": "mine", "max_tokens": 2, "tenant": "quiet"})
                first.close()  # the quiet tenant is admitted (not 429) and finishes once a slot frees
                assert other.status == 200 and (await other.json())["choices"][0]["finish_reason"] == "length"
                (await second).close()
                for _ in range(200):  # the flooder's quota frees as its requests end
                    r = await s.post(url, json={**hold, "stream": False, "max_tokens": 1})
                    if r.status == 200:
                        break
                    await asyncio.sleep(0.05)
                assert r.status == 200

        asyncio.run(go())
    finally:
        srv.stop()
