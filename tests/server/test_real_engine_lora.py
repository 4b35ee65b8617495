"""Multi-LoRA acceptance tests against the REAL engine: 4 PEFT adapters + the base model behind one
server; runtime load/unload with the validate library; --adapter-root confinement.

Oracle: the offline `LLM.generate(..., adapters=...)` with the same adapters, and each request alone.
"""

from __future__ import annotations

import asyncio
import json
import shutil
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
# (name, PEFT kwargs): different ranks, one attention-only, one rsLoRA
ADAPTERS = [
    ("a4", dict(r=4, lora_alpha=8)),
    ("a8", dict(r=8, lora_alpha=16, use_rslora=True)),
    ("a16", dict(r=16, lora_alpha=16)),
    ("attn", dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
]


@pytest.fixture(scope="module")
def lora_setup(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.tiny import build_peft_adapter

    root = tmp_path_factory.mktemp("adapter_root")
    paths = {name: str(build_peft_adapter(tiny_base, root / name, seed=10 + i, **kw))
             for i, (name, kw) in enumerate(ADAPTERS)}
    spare = tmp_path_factory.mktemp("spare")
    extra = {n: str(build_peft_adapter(tiny_base, spare / n, seed=s, r=4, lora_alpha=8)) for n, s in (("x", 50), ("y", 60))}
    return {"root": root, "paths": paths, "extra": extra}


def _cfg(tiny_base: Path, loras: dict[str, str]) -> EngineConfig:
    return EngineConfig(model=str(tiny_base), dtype="float32", device="cpu", max_model_len=MAX_LEN, seed=0,
                        max_loras=4, max_lora_rank=16, max_cpu_loras=8, loras=tuple(loras.items()))


@pytest.fixture(scope="module")
def server(tiny_base: Path, lora_setup: dict[str, Any]) -> Iterator[ServerThread]:
    cfg = ServerConfig(engine=_cfg(tiny_base, lora_setup["paths"]), port=0, api_key=KEY, allow_runtime_lora=True,
                       adapter_root=str(lora_setup["root"]))
    srv = ServerThread(cfg).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(tiny_base: Path, lora_setup: dict[str, Any]) -> Any:
    from engine import LLM

    llm = LLM(config=_cfg(tiny_base, lora_setup["paths"]))
    for name, path in lora_setup["extra"].items():
        llm.add_adapter(name, path)
    return llm


def _greedy(offline: Any, prompt: str, adapter: str | None, n: int = 10) -> str:
    return offline.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0), adapters=[adapter])[0].text


def test_models_lists_base_and_adapters(server: ServerThread, lora_setup: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    base = server.engine.model_name
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {base, *lora_setup["paths"]}
    assert cards[base].parent is None  # type: ignore[attr-defined]
    for name, path in lora_setup["paths"].items():
        assert cards[name].parent == base and cards[name].root == path  # type: ignore[attr-defined]


def test_each_adapter_gets_its_own_output(server: ServerThread, offline: Any) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    outs = {}
    for name in [server.engine.model_name, *dict(ADAPTERS)]:
        adapter = None if name == server.engine.model_name else name
        r = client.completions.create(model=name, prompt="the same prompt", max_tokens=10, temperature=0)
        assert r.choices[0].text == _greedy(offline, "the same prompt", adapter)
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "the same prompt"}],
                                              max_tokens=10, temperature=0)
        assert chat.choices[0].message.content == r.choices[0].text
        outs[name] = r.choices[0].text
    assert len(set(outs.values())) == len(outs)  # the adapters really differ


def test_64_concurrent_requests_over_4_adapters_and_base_equal_alone(server: ServerThread, offline: Any) -> None:
    concurrency_check(server, offline, [server.engine.model_name, *dict(ADAPTERS)])
    text = __import__("urllib.request").request.urlopen(f"{server.url}/metrics").read().decode()
    info = [ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="4"' in info[0]
    assert scrape(server.url, "mlora:requests_total", adapter="a16", outcome="length") >= 12


def test_runtime_load_validate_replace_unload(server: ServerThread, offline: Any, lora_setup: dict[str, Any]) -> None:
    root: Path = lora_setup["root"]
    shutil.copytree(lora_setup["extra"]["x"], root / "new_x")
    shutil.copytree(lora_setup["extra"]["y"], root / "new_y")
    corrupt = root / "corrupt"
    shutil.copytree(lora_setup["extra"]["x"], corrupt)
    w = corrupt / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    outside = root.parent / "outside_root"
    shutil.copytree(lora_setup["extra"]["x"], outside, dirs_exist_ok=True)
    (root / "escape").symlink_to(outside, target_is_directory=True)

    async def go() -> None:
        auth = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(headers=auth) as s:
            load, unload = f"{server.url}/v1/load_lora_adapter", f"{server.url}/v1/unload_lora_adapter"

            async def complete(model: str) -> tuple[int, Any]:
                r = await s.post(f"{server.url}/v1/completions",
                                 json={"model": model, "prompt": "the same prompt", "max_tokens": 10, "temperature": 0})
                return r.status, await r.json()

            r = await s.post(load, json={"lora_name": "fresh", "lora_path": "new_x"})
            assert r.status == 200, await r.text()
            status, body = await complete("fresh")  # usable at once
            assert status == 200 and body["choices"][0]["text"] == _greedy(offline, "the same prompt", "x")
            # same name again: replaced
            assert (await s.post(load, json={"lora_name": "fresh", "lora_path": "new_y"})).status == 200
            status, body = await complete("fresh")
            assert body["choices"][0]["text"] == _greedy(offline, "the same prompt", "y")
            # a corrupt adapter: 400 with the validate library's reasons; nothing else changes
            r = await s.post(load, json={"lora_name": "bad", "lora_path": "corrupt"})
            assert r.status == 400
            msg = (await r.json())["error"]["message"]
            assert "failed validation" in msg and "weights_file" in msg
            for path in ("../outside_root", str(outside), "escape", "new_x/../../outside_root"):
                r = await s.post(load, json={"lora_name": "evil", "lora_path": path})
                assert r.status == 403, path
            status, body = await complete("a8")  # the others keep serving
            assert status == 200 and body["choices"][0]["text"] == _greedy(offline, "the same prompt", "a8")
            models = await (await s.get(f"{server.url}/v1/models")).json()
            assert {"bad", "evil"}.isdisjoint(m["id"] for m in models["data"])
            assert (await s.post(unload, json={"lora_name": "fresh"})).status == 200
            status, _ = await complete("fresh")
            assert status == 404

    asyncio.run(go())


def test_replacing_an_adapter_leaves_in_flight_requests_on_the_old_one(
        server: ServerThread, offline: Any, lora_setup: dict[str, Any]) -> None:
    root: Path = lora_setup["root"]
    for n in ("x", "y"):
        if not (root / f"swap_{n}").exists():
            shutil.copytree(lora_setup["extra"][n], root / f"swap_{n}")
    params = SamplingParams(max_tokens=110, temperature=0.0, ignore_eos=True)
    want_x = offline.generate(["swap test"], params, adapters=["x"])[0].text
    want_y = offline.generate(["swap test"], params, adapters=["y"])[0].text
    assert want_x != want_y

    async def go() -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            load = f"{server.url}/v1/load_lora_adapter"
            assert (await s.post(load, json={"lora_name": "swap", "lora_path": "swap_x"})).status == 200
            body = {"model": "swap", "prompt": "swap test", "max_tokens": 110, "ignore_eos": True, "temperature": 0}
            r = await s.post(f"{server.url}/v1/completions", json={**body, "stream": True})
            first = await r.content.readline()  # in flight on swap_x
            assert first.startswith(b"data: ")
            assert (await s.post(load, json={"lora_name": "swap", "lora_path": "swap_y"})).status == 200
            # the first request was still running on swap_x when the replacement was accepted
            assert scrape(server.url, "mlora:num_requests_running_by_adapter", adapter="swap") == 1
            rest = (await r.read()).decode()
            events = [first.decode().strip()] + [b for b in rest.strip().split("\n\n")]
            text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events if e != "data: [DONE]")
            assert text == want_x  # finished on the adapter it started with
            after = await (await s.post(f"{server.url}/v1/completions", json=body)).json()
            assert after["choices"][0]["text"] == want_y  # new requests get the replacement

    asyncio.run(go())
