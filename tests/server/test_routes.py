"""Routes and response shapes over a fake engine: completions, chat, SSE, models, metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.server.conftest import running
from tests.server.fake_engine import FakeEngine


async def _sse_events(resp: aiohttp.ClientResponse) -> list[Any]:
    """Parse a whole SSE body into JSON events, checking every event is `data: ...` and the last is [DONE]."""
    raw = (await resp.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def test_completion_shape_and_adapter_output(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            r = await s.post(f"{srv.url}/v1/completions", json={"model": "upper", "prompt": "hello", "max_tokens": 32})
            assert r.status == 200
            body = await r.json()
            assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
            assert isinstance(body["created"], int) and body["model"] == "upper"
            choice = body["choices"][0]
            assert choice["text"] == "HELLO" and choice["finish_reason"] == "stop" and choice["index"] == 0
            # prompt = BOS + 5 bytes; completion = 5 letters + EOS
            assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 6, "total_tokens": 12}
            r = await s.post(f"{srv.url}/v1/completions", json={"model": "fake-base", "prompt": "hello", "max_tokens": 3})
            body = await r.json()
            assert body["choices"][0]["text"] == "hel" and body["choices"][0]["finish_reason"] == "length"
            assert body["model"] == "fake-base"
            # no model field: the base model (as vLLM does with one served model)
            r = await s.post(f"{srv.url}/v1/completions", json={"prompt": "abc"})
            assert (await r.json())["choices"][0]["text"] == "abc"

    arun(go())


def test_batch_prompts_n_and_echo(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            r = await s.post(f"{srv.url}/v1/completions",
                             json={"model": "reverse", "prompt": ["abc", "xyz"], "n": 2, "echo": True})
            body = await r.json()
            assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
            assert [c["text"] for c in body["choices"]] == ["abccba", "abccba", "xyzzyx", "xyzzyx"]
            assert body["usage"]["prompt_tokens"] == 8  # two prompts of 4 tokens, counted once each
            assert body["usage"]["completion_tokens"] == 16
            # a token-id prompt is passed through as ids
            ids = tokenizer.encode("hi", add_special_tokens=False)
            r = await s.post(f"{srv.url}/v1/completions", json={"model": "upper", "prompt": ids})
            assert (await r.json())["choices"][0]["text"] == "HI"
            assert engine.prompts[-1] == ids

    arun(go())


def test_streamed_completion_equals_non_streamed_and_carries_usage(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            req = {"model": "upper", "prompt": "stream me", "max_tokens": 40}
            full = await (await s.post(f"{srv.url}/v1/completions", json=req)).json()
            r = await s.post(f"{srv.url}/v1/completions",
                             json={**req, "stream": True, "stream_options": {"include_usage": True}})
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            events = await _sse_events(r)
            ids = {e["id"] for e in events}
            assert len(ids) == 1 and ids.pop().startswith("cmpl-")
            text_events, usage_event = events[:-1], events[-1]
            assert "".join(e["choices"][0]["text"] for e in text_events) == full["choices"][0]["text"] == "STREAM ME"
            assert [e["choices"][0]["finish_reason"] for e in text_events][-1] == "stop"
            # usage exactly once: only the final choices-less chunk carries it (clients that sum it count once)
            assert all(e.get("usage") is None for e in text_events)
            assert usage_event["choices"] == [] and usage_event["usage"] == full["usage"]
            # without include_usage: no usage at all, and no choices-less chunk (naive clients index choices[0])
            r = await s.post(f"{srv.url}/v1/completions", json={**req, "stream": True})
            plain = await _sse_events(r)
            assert all(e["choices"] for e in plain) and all(e.get("usage") is None for e in plain)
            # continuous_usage_stats (vLLM): usage on every chunk, still one final usage chunk
            r = await s.post(f"{srv.url}/v1/completions", json={**req, "stream": True, "stream_options": {
                "include_usage": True, "continuous_usage_stats": True}})
            cont = await _sse_events(r)
            assert all(e["usage"] is not None for e in cont) and cont[-1]["choices"] == []

    arun(go())


def test_chat_fallback_template_equals_completion(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            msgs = [{"role": "user", "content": "make me loud"}]
            r = await s.post(f"{srv.url}/v1/chat/completions", json={"model": "upper", "messages": msgs})
            body = await r.json()
            assert r.status == 200 and body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
            assert body["choices"][0]["message"] == {"role": "assistant", "content": "MAKE ME LOUD"}
            assert engine.prompts[-1] == "make me loud"  # no template: the plain content
            # text parts are joined by newlines; no max_tokens = what the context leaves (not 16)
            parts = [{"role": "user", "content": [{"type": "text", "text": "abcdefghij"}, {"type": "text", "text": "klmnopq"}]}]
            body = await (await s.post(f"{srv.url}/v1/chat/completions", json={"model": "fake-base", "messages": parts})).json()
            assert body["choices"][0]["message"]["content"] == "abcdefghij\nklmnopq"

    arun(go())


def test_chat_uses_the_tokenizers_template(chat_tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(chat_tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
            r = await s.post(f"{srv.url}/v1/chat/completions", json={"model": "fake-base", "messages": msgs, "max_tokens": 2})
            assert r.status == 200
            expected = chat_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert engine.prompts[-1] == chat_tokenizer.encode(expected, add_special_tokens=False)
            assert chat_tokenizer.decode(engine.prompts[-1]) == "<|system|>be nice\n<|user|>hi\n<|assistant|>"

    arun(go())


def test_chat_stream_shape(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            r = await s.post(f"{srv.url}/v1/chat/completions", json={
                "model": "reverse", "messages": [{"role": "user", "content": "abc"}], "stream": True,
                "stream_options": {"include_usage": True}})
            events = await _sse_events(r)
            assert all(e["object"] == "chat.completion.chunk" and e["id"].startswith("chatcmpl-") for e in events)
            assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
            assert content == "cba"
            assert events[-2]["choices"][0]["finish_reason"] == "stop"
            assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4

    arun(go())


def test_logprobs_shapes(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            body = await (await s.post(f"{srv.url}/v1/completions",
                                       json={"model": "fake-base", "prompt": "ab", "max_tokens": 2, "logprobs": 1})).json()
            lp = body["choices"][0]["logprobs"]
            assert lp["tokens"] == ["a", "b"] and lp["token_logprobs"] == [-0.5, -0.5] and lp["text_offset"] == [0, 1]
            body = await (await s.post(f"{srv.url}/v1/chat/completions", json={
                "model": "fake-base", "messages": [{"role": "user", "content": "ab"}], "max_tokens": 1,
                "logprobs": True, "top_logprobs": 2})).json()
            content = body["choices"][0]["logprobs"]["content"]
            assert content[0]["token"] == "a" and [t["token"] for t in content[0]["top_logprobs"]] == ["a", "A"]

    arun(go())


def test_models_lists_base_and_adapters(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer)
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            body = await (await s.get(f"{srv.url}/v1/models")).json()
            assert body["object"] == "list"
            cards = {m["id"]: m for m in body["data"]}
            assert set(cards) == {"fake-base", "upper", "reverse"}
            assert cards["fake-base"]["parent"] is None
            assert cards["upper"]["parent"] == cards["reverse"]["parent"] == "fake-base"
            assert all(m["object"] == "model" for m in body["data"])

    arun(go())


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(kv.split("=", 1) for kv in line[line.find("{") + 1:line.rfind("}")].split(",")) if "{" in line else {}
            got = {k: v.strip('"') for k, v in got.items()}
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in metrics")


def test_metrics_per_adapter_and_lora_info(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        engine = FakeEngine(tokenizer, delay=0.01)
        engine.gate = asyncio.Event()
        async with running(engine) as srv, aiohttp.ClientSession() as s:
            # two requests held mid-flight: one on `upper`, one on the base model
            held = [asyncio.create_task(s.post(f"{srv.url}/v1/completions", json={"model": m, "prompt": "abc"}))
                    for m in ("upper", "fake-base")]
            while len(engine.live) < 2:
                await asyncio.sleep(0.005)
            r = await s.get(f"{srv.url}/metrics")
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
            info = [ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info{")]
            assert len(info) == 1
            assert 'max_lora="2"' in info[0] and 'running_lora_adapters="upper"' in info[0]
            assert 'waiting_lora_adapters=""' in info[0]
            assert _metric(text, "mlora:kv_cache_free_blocks") == FakeEngine.KV_BLOCKS - 2
            assert _metric(text, "vllm:num_requests_running", model_name="fake-base") == 2
            engine.gate.set()
            await asyncio.gather(*held)
            text = await (await s.get(f"{srv.url}/metrics")).text()
            assert _metric(text, "mlora:requests_total", adapter="upper", outcome="stop") == 1
            assert _metric(text, "mlora:requests_total", adapter="fake-base", outcome="stop") == 1
            assert _metric(text, "mlora:generation_tokens_total", adapter="upper") == 4
            assert _metric(text, "mlora:time_to_first_token_seconds_count", adapter="upper") == 1
            assert _metric(text, "mlora:time_per_output_token_seconds_count", adapter="upper") == 3
            assert _metric(text, "mlora:kv_cache_free_blocks") == FakeEngine.KV_BLOCKS
            # errors are counted by status
            await s.post(f"{srv.url}/v1/completions", json={"model": "upper", "prompt": "x" * 100})
            text = await (await s.get(f"{srv.url}/metrics")).text()
            assert _metric(text, "mlora:requests_total", adapter="upper", outcome="400") == 1

    arun(go())


def test_health(tokenizer: Any, arun: Any) -> None:
    async def go() -> None:
        async with running(FakeEngine(tokenizer)) as srv, aiohttp.ClientSession() as s:
            assert (await s.get(f"{srv.url}/health")).status == 200

    arun(go())
