"""A real mlora server (real AsyncLLM, real aiohttp on a loopback port) in a background thread,
so tests can drive it with the synchronous `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.request
from typing import Any

import openai

from engine.sampling_params import SamplingParams
from engine.server.config import ServerConfig

KEY = "test-key"


class ServerThread:
    """Start with `ServerThread(config).start()`; `.url`, `.base_url` (for openai), `.stop()`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.url = ""
        self.engine: Any = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mlora-test-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait(timeout=300)
        if self._error is not None:
            raise self._error
        assert self.url, "server did not start"
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)

    def call(self, coro: Any, timeout: float = 120) -> Any:
        """Run a coroutine on the server's loop (e.g. engine.add_adapter) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        from engine import AsyncLLM
        from engine.server.run import shutdown, start_server

        self._stop = asyncio.Event()
        self.engine = AsyncLLM(self.config.engine)
        await self.engine.start()
        server = await start_server(self.engine, self.config)
        self.url = server.url
        self._ready.set()
        await self._stop.wait()
        await shutdown(server, self.engine, 1.0)


def scrape(url: str, name: str, **labels: str) -> float:
    """One sample from /metrics: the series `name` whose labels include `labels`."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    for m in re.finditer(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"{name}{labels} not in /metrics")


async def _one(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, stream: bool) -> str:
    if not stream:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return r.choices[0].text
    text = ""
    async for c in await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                   stream=True):
        text += c.choices[0].text
    return text


def concurrency_check(server: ServerThread, offline: Any, models: list[str]) -> None:
    """64 concurrent greedy requests (streamed and not) over `models`: each equals itself sent alone,
    and the offline engine's output for the same prompt and adapter."""
    base = server.engine.model_name
    jobs = [(models[i % len(models)], f"request {i}: {'xyz' * (i % 5)}", 4 + i % 9, i % 2 == 0) for i in range(64)]

    async def go() -> tuple[list[str], list[str]]:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)
        alone = [await _one(client, *job) for job in jobs]
        together = await asyncio.gather(*(_one(client, *job) for job in jobs))
        await client.close()
        return alone, list(together)

    alone, together = asyncio.run(go())
    assert together == alone
    params = [SamplingParams(max_tokens=m, temperature=0.0) for _, _, m, _ in jobs]
    adapters = [None if model == base else model for model, _, _, _ in jobs]
    ref = offline.generate([p for _, p, _, _ in jobs], params, adapters=adapters)
    assert [o.text for o in ref] == alone
