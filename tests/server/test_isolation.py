"""Tenant isolation at the HTTP layer (issue 15): bounded work per request, 4xx for bad input, safe defaults.

A hostile client sends what a well-formed one would not: its own Jinja, huge fan-out, numbers that
overflow, lone surrogates, half-sent requests. Each must be refused with one 4xx JSON error, quickly,
while the server keeps answering everyone else; every response stays strict JSON.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest

from engine.errors import ConfigError
from engine.server import protocol
from engine.server.config import ServerConfig
from engine.server.run import shutdown, start_server
from tests.server.conftest import running
from tests.server.fake_engine import FakeEngine

CHAT = [{"role": "user", "content": "hi"}]


def _strict(text: str) -> Any:
    """json.loads that refuses NaN/Infinity, as every JSON parser but Python's does."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {text[:200]}"))


async def _error(r: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    text = await r.text()
    assert r.status == status, text
    err = _strict(text)["error"]
    assert err["code"] == status and "Traceback" not in err["message"]
    return err


async def _health_latency(url: str, s: aiohttp.ClientSession) -> float:
    t = time.monotonic()
    assert (await s.get(f"{url}/health")).status == 200
    return time.monotonic() - t


# -- client chat templates --------------------------------------------------------------------------


def test_client_chat_template_is_refused_unless_trusted(chat_tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(chat_tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            url = f"{srv.url}/v1/chat/completions"
            for body in ({"messages": CHAT, "chat_template_kwargs": {"chat_template": "{{ 'x' * 20000000 }}"}},
                         {"messages": CHAT, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}):
                err = await _error(await s.post(url, json=body), 400)
                assert err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"]
            assert engine.prompts == []  # nothing was rendered or queued
            # other template variables are still the client's to set
            r = await s.post(url, json={"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}})
            assert r.status == 200, await r.text()

    arun(go())


def test_trusted_client_template_renders_in_a_bounded_sandbox_off_the_event_loop(chat_tokenizer: Any,
                                                                                   arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(chat_tokenizer, max_model_len=64)
        async with running(engine, trust_request_chat_template=True) as srv, aiohttp.ClientSession() as s:
            url = f"{srv.url}/v1/chat/completions"
            ok = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
            r = await s.post(url, json={"messages": CHAT, "chat_template": ok, "max_tokens": 4})
            assert r.status == 200, await r.text()
            assert chat_tokenizer.decode(engine.prompts[-1]) == "[user]hi"
            hostile = {
                "{{ 'x' * 20000000 }}": "larger than",
                "{{ ['x'] * 20000000 }}": "larger than",
                "{{ 10 ** 100000 }}": "too large",
                "{{ (10 ** 60) ** 60 ** 60 }}": "too large",
                "{% for i in range(100000) %}xxxxxxxxxx{% endfor %}": "rendered more than",
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "longer than",
                "{{ ''.__class__.__mro__ }}": "chat template",  # the sandbox refuses internals
                "{% for %}": "chat template error",
                "{{ raise_exception('nope') }}": "nope",
            }
            for template, needle in hostile.items():
                t0 = time.monotonic()
                task = asyncio.create_task(s.post(url, json={"messages": CHAT, "chat_template": template}))
                await asyncio.sleep(0.05)
                assert await _health_latency(srv.url, s) < 1.0  # the loop serves others meanwhile
                err = await _error(await task, 400)
                assert needle in err["message"], (template, err)
                assert time.monotonic() - t0 < 10
            # an oversized template is refused before it is compiled
            err = await _error(await s.post(url, json={"messages": CHAT, "chat_template": "x" * 200_000}), 400)
            assert "at most" in err["message"]

    arun(go())


def test_chat_template_kwargs_never_collide_with_the_renderer(chat_tokenizer: Any, arun: Any) -> None:
    """chat_template_kwargs are template variables: a key that names one of the renderer's own arguments was a
    TypeError (500) with a trusted client template; now each key is a variable, the request's own template flags
    may be set there as vLLM merges them, 'messages' is a 400, and both flags true is vLLM's 400."""
    async def go() -> None:
        engine = FakeEngine(chat_tokenizer, max_model_len=64)
        async with running(engine, trust_request_chat_template=True) as srv, aiohttp.ClientSession() as s:
            url = f"{srv.url}/v1/chat/completions"
            own = "[{{ template }}|{{ tokenizer }}|{{ max_chars }}]{% for m in messages %}{{ m['content'] }}{% endfor %}"
            flags = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}<gen>{% endif %}"
            for path in ("/v1/chat/completions", "/tokenize"):
                r = await s.post(f"{srv.url}{path}", json={
                    "messages": CHAT, "chat_template": own, "max_tokens": 2,
                    "chat_template_kwargs": {"template": "t", "tokenizer": "k", "max_chars": 1}})
                assert r.status == 200, (path, await r.text())
            assert chat_tokenizer.decode(engine.prompts[-1]) == "[t|k|1]hi"
            for kw, rendered in (({"add_generation_prompt": False}, "hi"), ({"add_generation_prompt": True}, "hi<gen>"),
                                 ({"continue_final_message": True}, "hi")):
                r = await s.post(url, json={"messages": CHAT, "chat_template": flags, "chat_template_kwargs": kw,
                                            "max_tokens": 2})
                assert r.status == 200, (kw, await r.text())
                assert chat_tokenizer.decode(engine.prompts[-1]) == rendered, kw
            cases = (({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
                     ({"chat_template_kwargs": {"add_generation_prompt": "yes"}}, "add_generation_prompt"),
                     ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
                     ({"chat_template_kwargs": {"continue_final_message": True, "add_generation_prompt": True}},
                      "continue_final_message"))
            for extra, param in cases:
                for path in ("/v1/chat/completions", "/tokenize"):
                    err = await _error(await s.post(f"{srv.url}{path}", json={"messages": CHAT, "chat_template": flags,
                                                                            **extra}), 400)
                    assert err["param"] == param, (extra, err)
            r = await s.post(url, json={"messages": CHAT, "max_tokens": 2})  # still serving
            assert r.status == 200, await r.text()

    arun(go())


# -- fan-out, queue, body and prompt size -----------------------------------------------------------


def test_a_request_may_not_fan_out_beyond_max_seqs_per_request(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine, max_seqs_per_request=8) as srv, aiohttp.ClientSession() as s:
            url = f"{srv.url}/v1/completions"
            t0 = time.monotonic()
            err = await _error(await s.post(url, json={"prompt": ["hello"] * 2000, "n": 16}), 400)
            assert "32000 sequences" in err["message"] and "--max-seqs-per-request" in err["message"]
            assert time.monotonic() - t0 < 2 and engine.prompts == []
            await _error(await s.post(url, json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2}), 400)
            await _error(await s.post(f"{srv.url}/v1/chat/completions", json={"messages": CHAT, "n": 9}), 400)
            r = await s.post(url, json={"prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 2})
            assert r.status == 200 and len((await r.json())["choices"]) == 8

    arun(go())


def test_serve_defaults_bound_the_queue_and_the_fan_out() -> None:
    from mlora_cli.serve import serve

    params = inspect.signature(serve).parameters
    assert params["max_queue"].default == 1024
    assert params["max_seqs_per_request"].default == ServerConfig().max_seqs_per_request == 256
    assert params["trust_request_chat_template"].default is False
    assert params["max_body_bytes"].default == ServerConfig().max_body_bytes


def test_oversized_bodies_and_prompts_are_refused_before_any_work(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer, max_model_len=64)
        async with running(engine, max_body_bytes=1024 * 1024) as srv, aiohttp.ClientSession() as s:
            url = f"{srv.url}/v1/completions"
            await _error(await s.post(url, json={"prompt": "x" * (2 * 1024 * 1024)}), 413)
            t0 = time.monotonic()
            err = await _error(await s.post(url, json={"prompt": "x" * 900_000}), 400)
            assert "characters" in err["message"] and time.monotonic() - t0 < 2
            await _error(await s.post(url, json={"prompt": [5] * 200_000}), 400)
            chat = f"{srv.url}/v1/chat/completions"
            await _error(await s.post(chat, json={"messages": [{"role": "user", "content": "y" * 900_000}]}), 400)
            assert engine.prompts == []  # none of them reached the engine
            r = await s.post(url, json={"model": "upper", "prompt": "still here"})
            assert (await r.json())["choices"][0]["text"] == "STILL HERE"

    arun(go())


# -- numbers, surrogates, strict JSON ----------------------------------------------------------------


BIG = "1" + "0" * 400  # a 401-digit integer


@pytest.mark.parametrize("raw, needle", [
    ('{"prompt": "a", "temperature": %s}' % BIG, "temperature"),
    ('{"prompt": "a", "top_p": %s}' % BIG, "top_p"),
    ('{"prompt": "a", "temperature": 1e999}', "temperature"),
    ('{"prompt": "a", "top_p": -1e999}', "top_p"),
    ('{"prompt": "a", "temperature": NaN}', "malformed"),
    ('{"prompt": "a", "presence_penalty": 1e999}', "presence_penalty"),
    ('{"prompt": "a", "repetition_penalty": %s}' % BIG, "repetition_penalty"),
    ('{"prompt": "a", "max_tokens": %s}' % BIG, "max_tokens"),
    ('{"prompt": "a", "top_k": %s}' % BIG, "top_k"),
    ('{"prompt": "a", "seed": %s}' % BIG, "seed"),
    ('{"prompt": "a", "n": %s}' % BIG, "'n'"),
    ('{"prompt": "a", "best_of": %s}' % BIG, "best_of"),
    ('{"prompt": "a", "logprobs": %s}' % BIG, "logprobs"),
    ('{"prompt": "\\ud800"}', "surrogate"),
    ('{"prompt": ["ok", "\\udfff x"]}', "surrogate"),
    ('{"prompt": "a", "stop": ["\\ud800"]}', "surrogate"),
    ('{"prompt": "a", "model": "\\ud800"}', "surrogate"),
    ('{"prompt": "a", "\\ud800": 1}', "surrogate"),
    ('{"prompt": "a", "stop": %s}' % json.dumps(["s%d" % i for i in range(33)]), "at most 32"),
    ('{"prompt": "a", "stop": %s}' % json.dumps(["x" * 257]), "at most 256"),
    ('{"prompt": "a", "stop_token_ids": %s}' % json.dumps(list(range(257))), "at most 256"),
    ('{"prompt": "a", "stop_token_ids": [%s]}' % BIG, "stop_token_ids"),
    ('{"prompt": [%s]}' % BIG, "out of range"),
])
def test_bad_values_are_400_never_500(tokenizer: Any, arun: Any, raw: str, needle: str) -> None:
    async def go() -> None:
        async with running(FakeEngine(tokenizer)) as srv, aiohttp.ClientSession() as s:
            headers = {"Content-Type": "application/json"}
            err = await _error(await s.post(f"{srv.url}/v1/completions", data=raw.encode(), headers=headers), 400)
            assert needle in err["message"], err
            chat = raw.replace('"prompt": "a"', '"messages": [{"role": "user", "content": "a"}]')
            if chat != raw:
                err = await _error(await s.post(f"{srv.url}/v1/chat/completions", data=chat.encode(),
                                                headers=headers), 400)
            msg = '{"messages": [{"role": "user", "content": "\\ud800"}]}'
            await _error(await s.post(f"{srv.url}/v1/chat/completions", data=msg.encode(), headers=headers), 400)

    arun(go())


@pytest.mark.parametrize("value, written", [(math.nan, None), (-math.inf, -9999.0), (math.inf, None)])
def test_non_finite_logprobs_are_written_as_json(tokenizer: Any, arun: Any, value: float, written: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        engine.logprob = value
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            base = {"prompt": "ab", "max_tokens": 2, "logprobs": 1}
            body = _strict(await (await s.post(f"{srv.url}/v1/completions", json=base)).text())
            lp = body["choices"][0]["logprobs"]
            assert lp["token_logprobs"] == [written, written]
            r = await s.post(f"{srv.url}/v1/completions", json={**base, "stream": True})
            events = [e[6:] for e in (await r.text()).strip().split("\n\n") if e != "data: [DONE]"]
            assert [_strict(e)["choices"][0]["logprobs"]["token_logprobs"] for e in events[:2]] == [[written]] * 2
            chat = {"messages": [{"role": "user", "content": "ab"}], "max_tokens": 2, "logprobs": True,
                    "top_logprobs": 2}
            body = _strict(await (await s.post(f"{srv.url}/v1/chat/completions", json=chat)).text())
            content = body["choices"][0]["logprobs"]["content"]
            assert [c["logprob"] for c in content] == [written, written]
            r = await s.post(f"{srv.url}/v1/chat/completions", json={**chat, "stream": True})
            for e in (await r.text()).strip().split("\n\n"):
                if e != "data: [DONE]":
                    _strict(e[6:])

    arun(go())


def test_every_json_writer_refuses_nan() -> None:
    assert protocol.safe_logprob(-math.inf) == -9999.0 and protocol.safe_logprob(math.nan) is None and protocol.safe_logprob(-1.5) == -1.5
    with pytest.raises(ValueError):
        protocol.dumps({"x": math.nan})
    with pytest.raises(ValueError):
        protocol.sse({"x": math.inf})


def test_a_request_whose_adapter_is_unloaded_is_told_so(tokenizer: Any, tmp_path: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        engine.gate = asyncio.Event()
        async with running(engine, allow_runtime_lora=True, adapter_root=str(tmp_path)) as srv, \
                aiohttp.ClientSession() as s:
            url = f"{srv.url}/v1/completions"
            plain = asyncio.create_task(s.post(url, json={"model": "upper", "prompt": "abc"}))
            streamed = asyncio.create_task(s.post(url, json={"model": "upper", "prompt": "abc", "stream": True}))
            while len(engine.live) < 2:
                await asyncio.sleep(0.01)
            r = await s.post(f"{srv.url}/v1/unload_lora_adapter", json={"lora_name": "upper"})
            assert r.status == 200
            engine.gate.set()
            err = await _error(await plain, 404)
            assert "unloaded" in err["message"] and "shutting down" not in err["message"]
            text = await (await streamed).text()
            assert "unloaded" in text and "shutting down" not in text and text.endswith("data: [DONE]\n\n")

    arun(go())


# -- slow clients ----------------------------------------------------------------------------------


async def _half_open(url: str, *, body: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    if body:  # complete headers, a tenth of the body
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\":")
    else:  # half a request head
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    await writer.drain()
    return reader, writer


def test_slow_clients_are_dropped_and_do_not_delay_shutdown(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        cfg = ServerConfig(engine=engine.config, host="127.0.0.1", port=0, header_timeout=0.5, body_timeout=0.5)
        await engine.start()
        srv = await start_server(engine, cfg)
        # slow headers: closed after header_timeout, with no response
        reader, writer = await _half_open(srv.url, body=False)
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - t0 < 3
        writer.close()
        # slow body: 408 after body_timeout, then the connection closes
        reader, writer = await _half_open(srv.url, body=True)
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 408") and b"did not arrive" in data
        writer.close()
        # 20 held connections do not hold up a shutdown with a 30 s grace period
        held = [await _half_open(srv.url, body=i % 2 == 0) for i in range(20)]
        t0 = time.monotonic()
        await shutdown(srv, engine, 30.0)
        assert time.monotonic() - t0 < 5
        for _, w in held:
            w.close()

    arun(go())


def test_idle_half_open_connections_do_not_delay_shutdown_even_before_the_timeouts(tokenizer: Any,
                                                                                     arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        cfg = ServerConfig(engine=engine.config, host="127.0.0.1", port=0, header_timeout=60, body_timeout=60)
        await engine.start()
        srv = await start_server(engine, cfg)
        held = [await _half_open(srv.url, body=i % 2 == 0) for i in range(20)]
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await shutdown(srv, engine, 30.0)
        assert time.monotonic() - t0 < 5
        for _, w in held:
            w.close()

    arun(go())


# -- safe defaults ---------------------------------------------------------------------------------


def test_open_by_accident_is_a_startup_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="empty"):
        ServerConfig(api_key="")
    with pytest.raises(ConfigError, match="empty"):
        ServerConfig(api_key="  ")
    with pytest.raises(ConfigError, match="--adapter-root"):
        ServerConfig(allow_runtime_lora=True)
    assert ServerConfig(allow_runtime_lora=True, adapter_root="/").adapter_root == "/"
    assert ServerConfig(allow_runtime_lora=True, adapter_root=str(tmp_path)).allow_runtime_lora


@pytest.mark.parametrize("args, env, needle", [
    ([], {"MLORA_API_KEY": ""}, "API key is empty"),
    (["--api-key", ""], {}, "API key is empty"),
    (["--allow-runtime-lora"], {}, "--allow-runtime-lora needs --adapter-root"),
])
def test_serve_refuses_to_start_open_by_accident(args: list[str], env: dict[str, str], needle: str) -> None:
    full_env = {k: v for k, v in os.environ.items() if k != "MLORA_API_KEY"}
    full_env.update(env, COLUMNS="200")
    res = subprocess.run([sys.executable, "-m", "mlora_cli.main", "serve", "--port", "0", *args],
                         capture_output=True, text=True, env=full_env, timeout=120)
    assert res.returncode == 1
    assert needle in res.stderr + res.stdout and "Traceback" not in res.stderr
    assert "loading the model" not in res.stdout  # refused before any work


def test_the_engine_tokenizes_text_prompts_off_the_event_loop(tiny_base: Any, arun: Any) -> None:
    """AsyncLLM.generate tokenizes a text prompt in a worker thread: a slow tokenization (a huge prompt)
    does not stop the event loop, which serves every other client meanwhile."""
    from engine import AsyncLLM, SamplingParams
    from engine.config import EngineConfig

    async def go() -> None:
        engine = AsyncLLM(EngineConfig(model=str(tiny_base), dtype="float32", device="cpu", max_model_len=64))
        process = engine.processor.process

        def slow(*args: Any) -> Any:
            time.sleep(1.0)
            return process(*args)

        object.__setattr__(engine.processor, "process", slow)  # a frozen dataclass: patch the instance
        await engine.start()
        try:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            t = asyncio.create_task(ticker())
            outs = [o async for o in engine.generate("hello", SamplingParams(max_tokens=2, temperature=0),
                                                     request_id="r1")]
            t.cancel()
            assert outs[-1].finished and ticks > 30  # the loop ran on while the prompt was tokenized
        finally:
            await engine.stop(grace_s=0)

    arun(go())


def test_prompt_logprobs_are_written_as_strict_json(tokenizer: Any) -> None:
    """Echoed prompt logprobs and vLLM's prompt_logprobs field go through safe_logprob like the others."""
    from engine.outputs import Logprob

    entries = [None, {65: Logprob(-math.inf, rank=50), 66: Logprob(math.nan, rank=1)}]
    echoed = protocol.completion_logprobs(tokenizer, [], 0, ([64, 65], entries))
    assert echoed["token_logprobs"] == [None, -9999.0] and None in echoed["top_logprobs"][1].values()
    field = protocol.prompt_logprobs_json(tokenizer, entries)
    assert field[1]["65"]["logprob"] == -9999.0 and field[1]["66"]["logprob"] is None
    _strict(protocol.dumps({"logprobs": echoed, "prompt_logprobs": field}))


@pytest.mark.parametrize("raw", [
    b'{"prompt": "a", "presence_penalty": 1e999}', b'{"prompt": "a", "frequency_penalty": -1e999}',
    b'{"prompt": "a", "repetition_penalty": 1e999}', b'{"prompt": "a", "min_p": 1e999}',
    b'{"prompt": "a", "repetition_penalty": 1' + b"0" * 400 + b"}",
    b'{"prompt": "a", "logit_bias": {"1": 1' + b"0" * 400 + b"}}", b'{"prompt": "a", "logit_bias": {"1": 1e999}}',
    b'{"prompt": "a", "min_tokens": 1' + b"0" * 30 + b"}", b'{"prompt": "a", "prompt_logprobs": 1' + b"0" * 30 + b"}",
    b'{"prompt": "a", "allowed_token_ids": [1' + b"0" * 400 + b"]}", b'{"prompt": "a", "seed": 1' + b"0" * 30 + b"}",
    b'{"prompt": "a", "bad_words": [' + b",".join([b'"x"'] * 40) + b"]}",
    b'{"prompt": "a", "bad_words": ["' + b"x" * 5000 + b'"]}',
])
def test_new_sampling_numbers_are_400_never_500(tokenizer: Any, arun: Any, raw: bytes) -> None:
    """issue 18's sampling fields under issue 15's validation: non-finite or oversized values are a 400."""
    async def go() -> None:
        async with running(FakeEngine(tokenizer)) as srv, aiohttp.ClientSession() as s:
            headers = {"Content-Type": "application/json"}
            await _error(await s.post(f"{srv.url}/v1/completions", data=raw, headers=headers), 400)
            chat = raw.replace(b'"prompt": "a"', b'"messages": [{"role": "user", "content": "a"}]')
            await _error(await s.post(f"{srv.url}/v1/chat/completions", data=chat, headers=headers), 400)

    arun(go())
