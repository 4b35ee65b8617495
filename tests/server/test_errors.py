"""Error statuses and bodies, API key, runtime adapter loading and --adapter-root confinement (fake engine)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.server.config import ServerConfig
from engine.errors import ConfigError
from tests.server.conftest import running
from tests.server.fake_engine import FakeEngine


async def _error(r: aiohttp.ClientResponse, status: int) -> str:
    """Assert an OpenAI-shaped JSON error with `status`; return its message."""
    assert r.status == status, await r.text()
    body = await r.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    assert body["error"]["code"] == status and "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


def test_bad_requests_are_one_json_error_each(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        async with running(FakeEngine(tokenizer)) as srv, aiohttp.ClientSession() as s:
            url = f"{srv.url}/v1/completions"
            msg = await _error(await s.post(url, json={"model": "nope", "prompt": "a"}), 404)
            assert "nope" in msg
            await _error(await s.post(f"{srv.url}/v1/chat/completions",
                                      json={"model": "nope", "messages": [{"role": "user", "content": "a"}]}), 404)
            msg = await _error(await s.post(url, data=b"{not json", headers={"Content-Type": "application/json"}), 400)
            assert "malformed JSON" in msg
            await _error(await s.post(url, json=["a list"]), 400)
            cases = [
                ({"prompt": ""}, "prompt"),
                ({"prompt": 5}, "prompt"),
                ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
                ({"prompt": "a", "max_tokens": "ten"}, "max_tokens"),
                ({"prompt": "a", "temperature": -1}, "temperature"),
                ({"prompt": "a", "top_p": 0}, "top_p"),
                ({"prompt": "a", "n": 1000}, "n"),
                ({"prompt": "a", "stream": "yes"}, "stream"),
                ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
                ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
                ({"prompt": "a", "logit_bias": [1]}, "logit_bias"),
                ({"prompt": "a", "logit_bias": {"1": "high"}}, "logit_bias"),
                ({"prompt": "a", "max_tokens": 64}, "maximum context length"),
                ({"prompt": "a", "logprobs": 50}, "logprobs"),
                ({"prompt": "a", "stop": [1, 2]}, "stop"),
                ({"prompt": [1, 99999]}, "out of range"),
            ]
            for body, needle in cases:
                msg = await _error(await s.post(url, json=body), 400)
                assert needle in msg, (body, msg)
            chat = f"{srv.url}/v1/chat/completions"
            assert "messages" in await _error(await s.post(chat, json={"messages": []}), 400)
            assert "role" in await _error(await s.post(chat, json={"messages": [{"role": "wizard", "content": "a"}]}), 400)
            await _error(await s.post(chat, json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400)
            # prompt longer than the context (64 tokens)
            msg = await _error(await s.post(url, json={"model": "upper", "prompt": "x" * 100}), 400)
            assert "context" in msg
            # unknown route and wrong method are JSON too
            await _error(await s.get(f"{srv.url}/v1/nothing"), 404)
            await _error(await s.get(url), 405)
            # the server is still serving
            r = await s.post(url, json={"model": "upper", "prompt": "ok"})
            assert (await r.json())["choices"][0]["text"] == "OK"

    arun(go())


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_token_id_in_any_prompt_of_a_batch_refuses_it_all_and_starts_nothing(
        tokenizer: Any, arun: Any, stream: bool) -> None:
    """The engine's InputProcessor decides; every prompt is asked before any is submitted."""
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        vocab = engine.processor.vocab_size
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            url = f"{srv.url}/v1/completions"
            for prompt, bad_id in (([[104, 105], [104, vocab]], vocab), ([[104], [-1]], -1),
                                   ([[104, 105], "text", [7, 10**30, 8]], 10**30), ([5, vocab + 7], vocab + 7)):
                r = await s.post(url, json={"prompt": prompt, "n": 2, "max_tokens": 3, "stream": stream})
                assert r.status == 400, await r.text()
                err = (await r.json())["error"]
                assert err["param"] == "prompt" and err["type"] == "invalid_request_error", err
                assert err["message"].startswith(f"prompt token id {bad_id} is out of range [0, {vocab})"), err
            # a token prompt that fills the context is the same owner's decision, also before any start
            ctx = engine.max_model_len
            r = await s.post(url, json={"prompt": [[104, 105], [104] * ctx], "n": 2, "stream": stream})
            assert r.status == 400, await r.text()
            err = (await r.json())["error"]
            assert err["param"] == "prompt" and err["message"].startswith(
                f"the prompt has {ctx} tokens; this model's context is {ctx} tokens"), err
            assert engine.prompts == [] and engine.aborted == [] and not engine.live  # nothing started
            r = await s.post(url, json={"prompt": [[104, 105], [104, vocab - 1]], "max_tokens": 1})
            assert r.status == 200 and len((await r.json())["choices"]) == 2  # the last id is in range
            assert engine.prompts == [[104, 105], [104, vocab - 1]]

    arun(go())


def test_queue_full_is_429_with_retry_after(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        import asyncio

        engine = FakeEngine(tokenizer, max_queue=1)
        engine.gate = asyncio.Event()
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            held = asyncio.create_task(s.post(f"{srv.url}/v1/completions", json={"prompt": "abc"}))
            while not engine.live:
                await asyncio.sleep(0.005)
            r = await s.post(f"{srv.url}/v1/completions", json={"prompt": "abc"})
            assert "queue" in await _error(r, 429)
            assert r.headers["Retry-After"] == "1"
            engine.gate.set()
            assert (await held).status == 200

    arun(go())


def test_api_key_guards_v1_only(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        async with running(FakeEngine(tokenizer), api_key="s3cret") as srv, aiohttp.ClientSession() as s:
            for path, method in (("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST"),
                                 ("/v1/load_lora_adapter", "POST")):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                    await _error(await s.request(method, srv.url + path, json={}, headers=headers), 401)
            ok = {"Authorization": "Bearer s3cret"}
            assert (await s.get(f"{srv.url}/v1/models", headers=ok)).status == 200
            r = await s.post(f"{srv.url}/v1/completions", json={"prompt": "a"}, headers=ok)
            assert r.status == 200
            assert (await s.get(f"{srv.url}/health")).status == 200
            assert (await s.get(f"{srv.url}/metrics")).status == 200
            # every other path is guarded too (no spelling of a route slips past)
            for path in ("/", "/V1/models", "//v1/models", "/v1%2Fmodels", "/nothing"):
                await _error(await s.get(srv.url + path), 401)

    arun(go())


def _fake_adapter(src: Path, path: Path, kind: str = "upper") -> Path:
    """A copy of a real PEFT adapter (so the validate library passes it) that the fake engine reads as `kind`."""
    shutil.copytree(src, path)
    (path / "transform.txt").write_text(kind)
    return path


def test_runtime_load_unload(tokenizer: Any, peft_adapter: Path, tmp_path: Path, arun: Any) -> None:
    root = tmp_path / "adapters"
    _fake_adapter(peft_adapter, root / "shout")
    _fake_adapter(peft_adapter, root / "odd", "nonsense")  # valid PEFT files, refused by the engine
    broken = _fake_adapter(peft_adapter, root / "broken")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: the validate library must say so

    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine, allow_runtime_lora=True, adapter_root=str(root)) as srv, aiohttp.ClientSession() as s:
            load, unload = f"{srv.url}/v1/load_lora_adapter", f"{srv.url}/v1/unload_lora_adapter"
            r = await s.post(load, json={"lora_name": "shout", "lora_path": "shout"})
            assert r.status == 200 and "shout" in await r.text()
            r = await s.post(f"{srv.url}/v1/completions", json={"model": "shout", "prompt": "hey"})
            assert (await r.json())["choices"][0]["text"] == "HEY"
            models = await (await s.get(f"{srv.url}/v1/models")).json()
            card = next(m for m in models["data"] if m["id"] == "shout")
            assert card["parent"] == "fake-base" and card["root"] == os.path.realpath(root / "shout")
            msg = await _error(await s.post(load, json={"lora_name": "bad", "lora_path": str(root / "broken")}), 400)
            assert "failed validation" in msg and "weights_file" in msg
            msg = await _error(await s.post(load, json={"lora_name": "odd", "lora_path": "odd"}), 400)
            assert "nonsense" in msg
            assert "bad" not in engine.adapters and "odd" not in engine.adapters
            await _error(await s.post(load, json={"lora_name": "x", "lora_path": "missing"}), 400)
            await _error(await s.post(load, json={"lora_name": "fake-base", "lora_path": "shout"}), 400)
            await _error(await s.post(load, json={"lora_path": "shout"}), 400)
            for bad_name in ("a,b", "has space", "", "-dash-first", "x" * 200):
                msg = await _error(await s.post(load, json={"lora_name": bad_name, "lora_path": "shout"}), 400)
                assert "lora_name" in msg
            await _error(await s.post(load, json={"lora_name": "nul", "lora_path": "shout\x00/../x"}), 400)
            # still serving after the bad loads
            r = await s.post(f"{srv.url}/v1/completions", json={"model": "upper", "prompt": "ok"})
            assert (await r.json())["choices"][0]["text"] == "OK"
            r = await s.post(unload, json={"lora_name": "shout"})
            assert r.status == 200
            await _error(await s.post(f"{srv.url}/v1/completions", json={"model": "shout", "prompt": "hey"}), 404)
            await _error(await s.post(unload, json={"lora_name": "shout"}), 404)

    arun(go())


def test_runtime_load_is_off_by_default(tokenizer: Any, peft_adapter: Path, tmp_path: Path, arun: Any) -> None:
    _fake_adapter(peft_adapter, tmp_path / "a")

    async def go() -> None:
        async with running(FakeEngine(tokenizer)) as srv, aiohttp.ClientSession() as s:
            msg = await _error(await s.post(f"{srv.url}/v1/load_lora_adapter",
                                            json={"lora_name": "a", "lora_path": str(tmp_path / "a")}), 403)
            assert "--allow-runtime-lora" in msg
            await _error(await s.post(f"{srv.url}/v1/unload_lora_adapter", json={"lora_name": "upper"}), 403)

    arun(go())


def test_adapter_root_refuses_escapes(tokenizer: Any, peft_adapter: Path, tmp_path: Path, arun: Any) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    _fake_adapter(peft_adapter, outside / "evil")
    (root / "link_dir").symlink_to(outside / "evil", target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    for f in (outside / "evil").iterdir():  # every file a link to the outside copy
        (sneaky / f.name).symlink_to(f)
    _fake_adapter(peft_adapter, root / "good")
    (root / "good_link").symlink_to(root / "good", target_is_directory=True)  # a link that stays inside is fine

    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine, allow_runtime_lora=True, adapter_root=str(root)) as srv, aiohttp.ClientSession() as s:
            load = f"{srv.url}/v1/load_lora_adapter"
            for path in ("../outside/evil", str(outside / "evil"), "link_dir", "sneaky", "good/../../outside/evil",
                         "/etc"):
                msg = await _error(await s.post(load, json={"lora_name": "x", "lora_path": path}), 403)
                assert "outside the adapter root" in msg, path
            assert "x" not in engine.adapters
            assert (await s.post(load, json={"lora_name": "g", "lora_path": "good_link"})).status == 200

    arun(go())


def test_server_config_checks() -> None:
    with pytest.raises(ConfigError, match="port"):
        ServerConfig(port=70000)
    with pytest.raises(ConfigError, match="adapter-root"):
        ServerConfig(adapter_root="/definitely/not/here")


def test_server_answers_while_an_adapter_loads(tokenizer: Any, peft_adapter: Path, tmp_path: Path, arun: Any) -> None:
    import asyncio
    import threading

    _fake_adapter(peft_adapter, tmp_path / "slow")

    async def go() -> None:
        engine = FakeEngine(tokenizer)
        engine.load_gate = threading.Event()
        async with running(engine, allow_runtime_lora=True, adapter_root=str(tmp_path)) as srv, \
                aiohttp.ClientSession() as s:
            load = asyncio.create_task(s.post(f"{srv.url}/v1/load_lora_adapter",
                                              json={"lora_name": "slow", "lora_path": str(tmp_path / "slow")}))
            await asyncio.to_thread(engine.loading.wait, 30)
            # the load is in progress: health, models and generation still answer
            assert (await s.get(f"{srv.url}/health")).status == 200
            r = await s.post(f"{srv.url}/v1/completions", json={"model": "upper", "prompt": "busy"})
            assert (await r.json())["choices"][0]["text"] == "BUSY"
            assert not load.done()
            engine.load_gate.set()
            assert (await load).status == 200
            r = await s.post(f"{srv.url}/v1/completions", json={"model": "slow", "prompt": "now"})
            assert (await r.json())["choices"][0]["text"] == "NOW"

    arun(go())


def test_a_huge_integer_fair_share_weight_is_400_not_500(tokenizer: Any, peft_adapter: Path, tmp_path: Path,
                                                          arun: Any) -> None:
    """A 401-digit integer `weight` raised OverflowError in the weight check (HTTP 500)."""
    _fake_adapter(peft_adapter, tmp_path / "shout")

    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine, allow_runtime_lora=True, adapter_root=str(tmp_path)) as srv, \
                aiohttp.ClientSession() as s:
            load = f"{srv.url}/v1/load_lora_adapter"
            for weight in (10**400, -(10**400)):
                r = await s.post(load, json={"lora_name": "shout", "lora_path": "shout", "weight": weight})
                msg = await _error(r, 400)
                assert (await r.json())["error"]["param"] == "weight" and "more than 300 digits" in msg
            assert "shout" not in engine.adapters
            r = await s.post(load, json={"lora_name": "shout", "lora_path": "shout", "weight": 2})
            assert r.status == 200, await r.text()
            r = await s.post(f"{srv.url}/v1/completions", json={"model": "shout", "prompt": "hey"})
            assert (await r.json())["choices"][0]["text"] == "HEY"

    arun(go())


def test_a_400_names_the_field_at_fault(tokenizer: Any, arun: Any) -> None:
    """These 400s had `param: null` (the engine's ConfigError carried no field): each now names it, and a
    normal request still works afterwards (a non-zero `priority`: test_real_engine.py, the fake engine has
    no scheduling policy)."""

    async def go() -> None:
        async with running(FakeEngine(tokenizer)) as srv, aiohttp.ClientSession() as s:
            url, chat = f"{srv.url}/v1/completions", f"{srv.url}/v1/chat/completions"
            cases = [
                ({"prompt": ""}, "prompt", "empty"),
                ({"prompt": []}, "prompt", "empty"),
                ({"prompt": "a", "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
                ({"prompt": "a", "allowed_token_ids": []}, "allowed_token_ids", "must not be empty"),
                ({"prompt": "a", "min_tokens": 10, "max_tokens": 2}, "min_tokens", "max_tokens"),
                ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty", "> 0"),
                ({"prompt": "a", "top_k": 0.5}, "top_k", "integer"),
            ]
            for body, param, needle in cases:
                for path, b in ((url, body), (chat, {**{k: v for k, v in body.items() if k != "prompt"},
                                                     "messages": [{"role": "user", "content": "a"}]})):
                    if path == chat and param == "prompt":
                        continue
                    r = await s.post(path, json=b)
                    msg = await _error(r, 400)
                    assert (await r.json())["error"]["param"] == param and needle in msg, (path, b, msg)
            r = await s.post(url, json={"model": "upper", "prompt": "still here"})
            assert (await r.json())["choices"][0]["text"] == "STILL HERE"

    arun(go())
