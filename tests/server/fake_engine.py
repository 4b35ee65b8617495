"""A small in-test engine implementing the AsyncLLM contract, for the server's HTTP behaviour.

Its "model" transforms the prompt text (base: copy, `upper`, `reverse`), one byte token per
step with a short sleep, so routes, SSE, errors, disconnects and shutdown can be exercised in
milliseconds. It keeps an exact account of live requests and "KV blocks" (one per live
request) so tests can assert that every request was released. Acceptance tests against the
real engine live in test_real_engine.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Callable

from engine.byte_tokenizer import BYTE_OFFSET, EOS_ID
from engine.config import EngineConfig
from engine.core import EngineStats
from engine.errors import AdapterError, AdapterNotFoundError, EngineStoppedError, QueueFullError
from engine.input_processor import InputProcessor
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

TRANSFORMS: dict[str | None, Callable[[str], str]] = {
    None: lambda s: s,
    "upper": str.upper,
    "reverse": lambda s: s[::-1],
}


class FakeEngine:
    """AsyncLLM look-alike. `delay` is the time per generated token."""

    KV_BLOCKS = 100

    def __init__(self, tokenizer: Any, *, delay: float = 0.002, max_model_len: int = 64, max_queue: int | None = None,
                 config: EngineConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.model_name = "fake-base"
        self.max_model_len = max_model_len
        self.config = config or EngineConfig(max_loras=2)
        # AsyncLLM's immutable facts; its "model" has the tokenizer's vocabulary
        self.processor = InputProcessor(tokenizer, len(tokenizer), max_model_len, self.model_name, self.config)
        self.delay = delay
        self.max_queue = max_queue
        self.adapters: dict[str, Callable[[str], str]] = {"upper": TRANSFORMS["upper"], "reverse": TRANSFORMS["reverse"]}
        self.live: dict[str, str | None] = {}  # request id -> adapter
        self.aborted: list[str] = []
        self.prompts: list[str | list[int]] = []
        self.scheduling: list[tuple[int, str | None]] = []  # (priority, tenant) of each request
        self.weights: dict[str, float] = {}  # adapter -> weight given at runtime load
        self.loads = 0
        self.load_seconds: list[float] = []
        self.stopping = False
        self.abort_all = False
        self.load_gate: threading.Event | None = None  # set by a test to hold add_adapter until it is set
        self.loading = threading.Event()
        self.gate: asyncio.Event | None = None  # an unset Event holds every request after its first token
        self.logprob = -0.5  # every token's logprob (a test sets NaN or -inf to check the JSON written)

    async def start(self) -> None:
        self.stopping = False

    async def stop(self, grace_s: float = 10.0) -> None:
        """Like AsyncLLM.stop: refuse new work, wait up to grace_s, then abort the rest."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.live and loop.time() < deadline:
            await asyncio.sleep(0.005)
        self.abort_all = True
        if self.gate is not None:
            self.gate.set()
        while self.live and loop.time() < deadline + 2:
            await asyncio.sleep(0.005)

    def list_adapters(self) -> list[str]:
        return list(self.adapters)

    def knows(self, name: str) -> bool:
        return name in self.adapters

    async def add_adapter(self, name: str, path: str, weight: float | None = None, *, root: str | None = None) -> None:
        marker = Path(path) / "transform.txt"
        if not marker.is_file():
            raise AdapterError(f"{path}: no adapter here (transform.txt missing)")
        kind = marker.read_text().strip()
        if kind not in ("upper", "reverse"):
            raise AdapterError(f"{path}: unknown transform {kind!r}")
        if self.load_gate is not None:  # a slow load, in a worker thread as AsyncLLM does it
            self.loading.set()
            await asyncio.to_thread(self.load_gate.wait, 30)
        self.adapters[name] = TRANSFORMS[kind]
        if weight is not None:
            self.weights[name] = weight
        self.loads += 1
        self.load_seconds.append(0.01)

    async def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered")
        del self.adapters[name]

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        by: dict[str, int] = {}
        for a in self.live.values():
            if a is not None:
                by[a] = by.get(a, 0) + 1
        seconds, self.load_seconds = self.load_seconds, []
        return EngineStats(num_running=len(self.live), running_by_adapter=by, kv_free_blocks=self.KV_BLOCKS - len(self.live),
                         kv_total_blocks=self.KV_BLOCKS, lora_loads=self.loads, lora_load_seconds=seconds,
                         resident_adapters=sorted(set(by)), max_loras=self.config.max_loras)

    async def generate(self, prompt: str | list[int], params: SamplingParams, *, request_id: str,
                       adapter: str | None = None, priority: int = 0,
                       tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        if self.stopping:
            raise EngineStoppedError("the engine is shutting down")
        if self.max_queue is not None and len(self.live) >= self.max_queue:
            raise QueueFullError(f"the waiting queue is full ({self.max_queue} requests)")
        ids = prompt if isinstance(prompt, list) else [1] + list(self.tokenizer.encode(prompt, add_special_tokens=False))
        self.processor.check_prompt_ids(ids)  # as AsyncLLM: its InputProcessor's one prompt check
        if adapter is not None and adapter not in self.adapters:
            raise AdapterNotFoundError(f"adapter {adapter!r} is not registered")
        self.prompts.append(prompt)
        self.scheduling.append((priority, tenant))
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=True)
        target = self.adapters[adapter](text) if adapter else text
        if params.ignore_eos:
            target = (target * (params.max_tokens // max(len(target), 1) + 1)) or "x"
        self.live[request_id] = adapter
        out = RequestOutput(request_id=request_id, prompt=prompt if isinstance(prompt, str) else None,
                            prompt_token_ids=list(ids), adapter=adapter)
        finished = False
        try:
            for i in range(params.max_tokens):
                if self.gate is not None and i > 0:  # the first token always comes
                    await self.gate.wait()
                await asyncio.sleep(self.delay)
                if self.abort_all:
                    out = _step(out, [], "", "abort")
                    finished = True
                    yield out
                    return
                if adapter is not None and adapter not in self.adapters:  # as the engine: unloaded while waiting
                    out = dataclasses.replace(_step(out, [], "", "abort"),
                                              stop_reason=f"adapter {adapter!r} could not be loaded: not registered")
                    finished = True
                    yield out
                    return
                if i < len(target):
                    ch = target[i]
                    tid = ord(ch) + BYTE_OFFSET if ord(ch) < 128 else BYTE_OFFSET
                    done = i + 1 == params.max_tokens
                    out = _step(out, [tid], ch, "length" if done else None, params.logprobs, self.logprob)
                else:
                    out = _step(out, [EOS_ID], "", "stop", params.logprobs, self.logprob)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self.live.pop(request_id, None)
            if not finished:
                self.aborted.append(request_id)


def _step(prev: RequestOutput, tokens: list[int], text: str, reason: str | None,
          logprobs: int | None = None, value: float = -0.5) -> RequestOutput:
    lps = None
    if logprobs is not None:
        lps = list(prev.logprobs or []) + [TokenLogprob(t, value, {t: value, 3 + 65: -1.5}) for t in tokens]
    return RequestOutput(
        request_id=prev.request_id, prompt=prev.prompt, prompt_token_ids=prev.prompt_token_ids, adapter=prev.adapter,
        text=prev.text + text, token_ids=prev.token_ids + tokens, delta_text=text, delta_token_ids=tokens,
        finished=reason is not None, finish_reason=reason, logprobs=lps,
    )
