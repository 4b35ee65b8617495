"""issue 18, server rows: vLLM's utility endpoints, X-Request-Id, the filesystem LoRA resolver and
vLLM's metric names, as a vLLM user's client, probe or dashboard sees them (fake engine, real HTTP)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from engine.errors import ConfigError
from engine.server.config import ServerConfig
from tests.server.conftest import running
from tests.server.fake_engine import FakeEngine
from tests.server.test_routes import _metric, _sse_events


def test_version_ping_and_one_model(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        async with running(FakeEngine(tokenizer), api_key="k") as srv, aiohttp.ClientSession() as s:
            from engine.version import __version__

            r = await s.get(f"{srv.url}/version")  # open, like /health (probes carry no key)
            assert r.status == 200 and await r.json() == {"version": __version__}
            for method in (s.get, s.post):
                assert (await method(f"{srv.url}/ping")).status == 200
            auth = {"Authorization": "Bearer k"}
            card = await (await s.get(f"{srv.url}/v1/models/upper", headers=auth)).json()
            assert card["id"] == "upper" and card["object"] == "model" and card["parent"] == "fake-base"
            base = await (await s.get(f"{srv.url}/v1/models/fake-base", headers=auth)).json()
            assert base["id"] == "fake-base" and base["parent"] is None and base["max_model_len"] == 64
            r = await s.get(f"{srv.url}/v1/models/nope", headers=auth)
            assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
            assert (await s.get(f"{srv.url}/v1/models/upper")).status == 401

        # the openai client's models.retrieve
        async with running(FakeEngine(tokenizer)) as srv:
            client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
            assert (await client.models.retrieve("reverse")).id == "reverse"
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("missing")
            await client.close()

    arun(go())


def test_tokenize_and_detokenize(chat_tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        async with running(FakeEngine(chat_tokenizer)) as srv, aiohttp.ClientSession() as s:
            r = await s.post(f"{srv.url}/tokenize", json={"model": "upper", "prompt": "hello"})
            body = await r.json()
            assert r.status == 200 and set(body) == {"count", "max_model_len", "tokens"}
            assert body["tokens"] == chat_tokenizer("hello").input_ids and body["count"] == len(body["tokens"])
            assert body["max_model_len"] == 64
            r = await s.post(f"{srv.url}/detokenize", json={"model": "upper", "tokens": body["tokens"]})
            assert chat_tokenizer.decode(body["tokens"]) == (await r.json())["prompt"]
            msgs = [{"role": "user", "content": "hi"}]
            r = await s.post(f"{srv.url}/tokenize", json={"model": "fake-base", "messages": msgs,
                                                           "add_generation_prompt": True})
            chat = await r.json()
            text = chat_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert chat["tokens"] == chat_tokenizer.encode(text, add_special_tokens=False)  # what chat would send
            r = await s.post(f"{srv.url}/tokenize", json={"messages": msgs, "add_generation_prompt": False})
            assert (await r.json())["count"] < chat["count"]
            assert (await s.post(f"{srv.url}/tokenize", json={"model": "nope", "prompt": "x"})).status == 404
            assert (await s.post(f"{srv.url}/tokenize", json={"prompt": 3})).status == 400
            assert (await s.post(f"{srv.url}/tokenize", json={"model": 3, "prompt": "x"})).status == 400
            assert (await s.post(f"{srv.url}/tokenize", json=["x"])).status == 400
            assert (await s.post(f"{srv.url}/tokenize", json={"prompt": "x" * 100_000})).status == 400  # bounded
            assert (await s.post(f"{srv.url}/detokenize", json={"tokens": [10**9]})).status == 400

    arun(go())


def test_x_request_id_is_echoed_and_names_the_response(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            hdr = {"X-Request-Id": "trace-42"}
            req = {"model": "upper", "prompt": "abc", "max_tokens": 5}
            r = await s.post(f"{srv.url}/v1/completions", json=req, headers=hdr)
            assert r.headers["X-Request-Id"] == "trace-42" and (await r.json())["id"] == "cmpl-trace-42"
            r = await s.post(f"{srv.url}/v1/completions", json={**req, "stream": True}, headers=hdr)
            assert r.headers["X-Request-Id"] == "trace-42"
            assert {e["id"] for e in await _sse_events(r)} == {"cmpl-trace-42"}
            r = await s.post(f"{srv.url}/v1/chat/completions", headers=hdr,
                             json={"model": "upper", "messages": [{"role": "user", "content": "x"}]})
            assert (await r.json())["id"] == "chatcmpl-trace-42"
            r = await s.post(f"{srv.url}/v1/completions", json={"model": "nope", "prompt": "x"}, headers=hdr)
            assert r.status == 404 and r.headers["X-Request-Id"] == "trace-42"  # errors carry it too
            # two concurrent requests with one id both succeed (the engine's ids stay unique)
            rs = await asyncio.gather(*(s.post(f"{srv.url}/v1/completions", json=req, headers=hdr) for _ in range(2)))
            assert [r.status for r in rs] == [200, 200]
            r = await s.post(f"{srv.url}/v1/completions", json=req)
            assert "X-Request-Id" not in r.headers and (await r.json())["id"].startswith("cmpl-")

    arun(go())


def _fake_adapter(src: Path, path: Path, kind: str = "upper") -> Path:
    shutil.copytree(src, path)
    (path / "transform.txt").write_text(kind)
    return path


def test_lora_dir_resolver_serves_a_new_adapter_on_first_use(tokenizer: Any, peft_adapter: Path, tmp_path: Path,
                                                             arun: Any) -> None:
    root = tmp_path / "root"
    lora_dir = root / "loras"
    lora_dir.mkdir(parents=True)

    async def go() -> None:
        engine = FakeEngine(tokenizer)
        engine.load_gate = threading.Event()
        async with running(engine, allow_runtime_lora=True, adapter_root=str(root), lora_dir=str(lora_dir)) as srv, \
                aiohttp.ClientSession() as s:
            req = {"model": "shout", "prompt": "hey", "max_tokens": 5}
            assert (await s.post(f"{srv.url}/v1/completions", json=req)).status == 404  # not there yet
            _fake_adapter(peft_adapter, lora_dir / "shout")  # added while serving
            first = [asyncio.create_task(s.post(f"{srv.url}/v1/completions", json=req)) for _ in range(4)]
            await asyncio.to_thread(engine.loading.wait, 10)
            await asyncio.sleep(0.05)
            engine.load_gate.set()
            rs = await asyncio.gather(*first)
            assert [(await r.json())["choices"][0]["text"] for r in rs] == ["HEY"] * 4
            assert engine.loads == 1  # four concurrent first requests, one load
            models = [m["id"] for m in (await (await s.get(f"{srv.url}/v1/models")).json())["data"]]
            assert "shout" in models
            # a broken one is a 400 naming the adapter; unsafe names never reach the filesystem
            broken = _fake_adapter(peft_adapter, lora_dir / "broken")
            (broken / "adapter_model.safetensors").write_bytes(b"garbage")
            r = await s.post(f"{srv.url}/v1/completions", json={**req, "model": "broken"})
            assert r.status == 400 and "broken" in (await r.json())["error"]["message"]
            _fake_adapter(peft_adapter, root / "outside")
            for name in ("../outside", "loras/../outside", ".hidden", "a/b"):
                assert (await s.post(f"{srv.url}/v1/completions", json={**req, "model": name})).status == 404

    arun(go())


def test_lora_dir_resolver_is_off_without_runtime_lora_and_confined(tokenizer: Any, peft_adapter: Path,
                                                                    tmp_path: Path, arun: Any) -> None:
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()

    async def go() -> None:
        async with running(FakeEngine(tokenizer), lora_dir=str(lora_dir)) as srv, aiohttp.ClientSession() as s:
            _fake_adapter(peft_adapter, lora_dir / "shout")
            r = await s.post(f"{srv.url}/v1/completions", json={"model": "shout", "prompt": "x"})
            assert r.status == 404

    arun(go())
    other = tmp_path / "root"
    other.mkdir()
    with pytest.raises(ConfigError, match="outside --adapter-root"):
        ServerConfig(allow_runtime_lora=True, adapter_root=str(other), lora_dir=str(lora_dir))


def test_vllm_metric_names_beside_mloras(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            for model in ("upper", "fake-base"):
                r = await s.post(f"{srv.url}/v1/completions", json={"model": model, "prompt": "abcd", "max_tokens": 3})
                assert r.status == 200
            engine.load_seconds.append(0.02)
            text = await (await s.get(f"{srv.url}/metrics")).text()
            v = {"model_name": "fake-base", "engine": "0"}
            assert _metric(text, "vllm:request_success_total", finished_reason="length", **v) == 2
            assert _metric(text, "vllm:prompt_tokens_total", **v) == 10  # "abcd" + BOS, twice
            assert _metric(text, "vllm:generation_tokens_total", **v) == 6
            for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
                         "request_generation_tokens"):
                assert _metric(text, f"vllm:{hist}_count", **v) == 2, hist
            assert _metric(text, "vllm:inter_token_latency_seconds_count", **v) == 4
            assert _metric(text, "vllm:time_per_output_token_seconds_count", **v) == 4
            assert _metric(text, "vllm:num_preemptions_total", **v) == 0
            for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
                _metric(text, f"vllm:{gauge}", **v)
            assert _metric(text, "mlora:requests_total", adapter="upper", outcome="length") == 1  # still per adapter
            assert _metric(text, "mlora:lora_load_duration_seconds_count", tier="disk") == 1

    arun(go())



NOT_IMPLEMENTED = [  # (endpoint, vLLM field, a value vLLM would honour): each was accepted and had no effect
    ("completions", "guided_json", {"type": "object"}), ("completions", "guided_choice", ["yes", "no"]),
    ("chat", "guided_regex", "[0-9]+"), ("chat", "guided_grammar", "root ::= 'x'"),
    ("completions", "structured_outputs", {"choice": ["a"]}), ("completions", "use_beam_search", True),
    ("completions", "length_penalty", 2.0), ("completions", "truncate_prompt_tokens", 2),
    ("completions", "add_special_tokens", False), ("chat", "add_special_tokens", True),
    ("completions", "skip_special_tokens", False), ("chat", "spaces_between_special_tokens", False),
    ("completions", "return_tokens_as_token_ids", True), ("completions", "logits_processors", ["my.Proc"]),
    ("chat", "cache_salt", "s3cret-salt"), ("completions", "kv_transfer_params", {"do_remote_decode": True}),
    ("completions", "vllm_xargs", {"k": 1}), ("completions", "prompt_embeds", "AAAA"),
    ("chat", "echo", True), ("chat", "documents", [{"title": "t", "text": "x"}]), ("chat", "tool_choice", "auto"),
]


@pytest.mark.parametrize("endpoint, key, value", NOT_IMPLEMENTED)
def test_vllm_parameters_mlora_lacks_are_400_never_ignored(tokenizer: Any, arun: Any, endpoint: str, key: str,
                                                           value: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            url = f"{srv.url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
            base = {"messages": [{"role": "user", "content": "abc"}]} if endpoint == "chat" else {"prompt": "abc"}
            for stream in (False, True):
                r = await s.post(url, json={**base, "model": "upper", "max_tokens": 3, "stream": stream, key: value})
                assert r.status == 400, await r.text()
                err = (await r.json())["error"]
                assert err["param"] == key and "not supported by mlora" in err["message"], err
            assert engine.prompts == []  # refused before anything started
            # vLLM's default (the value meaning "off") and null are accepted, and the server still serves
            defaults = {"add_special_tokens": endpoint == "completions", "use_beam_search": False, "echo": False,
                        "length_penalty": 1.0, "skip_special_tokens": True, "spaces_between_special_tokens": True,
                        "return_tokens_as_token_ids": False, "logits_processors": [], "vllm_xargs": {},
                        "tool_choice": "none"}
            for off in [None, defaults[key]] if key in defaults else [None]:
                r = await s.post(url, json={**base, "model": "upper", "max_tokens": 3, key: off})
                assert r.status == 200, (off, await r.text())

    arun(go())


def test_the_body_request_id_names_the_response_as_in_vllm(tokenizer: Any, arun: Any) -> None:
    """vLLM's `request_id` body field (used when no X-Request-Id header is sent) was silently ignored."""
    async def go() -> None:
        async with running(FakeEngine(tokenizer)) as srv, aiohttp.ClientSession() as s:
            req = {"model": "upper", "prompt": "abc", "max_tokens": 3, "request_id": "job-7"}
            assert (await (await s.post(f"{srv.url}/v1/completions", json=req)).json())["id"] == "cmpl-job-7"
            r = await s.post(f"{srv.url}/v1/completions", json={**req, "stream": True})
            assert {e["id"] for e in await _sse_events(r)} == {"cmpl-job-7"}
            chat = {"model": "upper", "messages": [{"role": "user", "content": "x"}], "request_id": "job-8"}
            assert (await (await s.post(f"{srv.url}/v1/chat/completions", json=chat)).json())["id"] == "chatcmpl-job-8"
            r = await s.post(f"{srv.url}/v1/completions", json=req, headers={"X-Request-Id": "hdr"})
            assert (await r.json())["id"] == "cmpl-hdr"  # the header wins, as in vLLM
            for bad in (5, "", "x" * 300, "tab\there", ["job"]):
                r = await s.post(f"{srv.url}/v1/completions", json={**req, "request_id": bad})
                assert r.status == 400 and (await r.json())["error"]["param"] == "request_id", await r.text()
            r = await s.post(f"{srv.url}/v1/completions", json={**req, "request_id": None})
            assert r.status == 200 and (await r.json())["id"].startswith("cmpl-")

    arun(go())
