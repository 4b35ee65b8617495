"""Driving engine requests from a handler: start, collect, merge streams, always abort on exit.

A handler's request becomes one engine request per (prompt, n) choice. `open_choices` submits
them all and waits for each one's first output, so engine errors (unknown adapter, prompt too
long, queue full, engine stopped: raised before the first yield) surface before any response
byte is sent and become proper HTTP statuses. `Choices.close()` closes every engine iterator,
which aborts whatever is still running and frees its KV blocks; handlers call it in `finally`,
so a client that disconnects (the handler is cancelled or its write fails) never leaks a request.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.server.metrics import RequestTracker, ServerMetrics


@dataclass
class Choice:
    """One engine request: its iterator, its latest output and its metrics tracker."""

    index: int
    prompt: str | list[int]
    stream: AsyncIterator[RequestOutput]
    tracker: RequestTracker
    last: RequestOutput | None = None
    pending: RequestOutput | None = None  # the first output, not yet consumed by the handler
    finished: bool = False

    async def next(self) -> RequestOutput | None:
        """The next output, or None once finished."""
        if self.pending is not None:
            out, self.pending = self.pending, None
        elif self.finished:
            return None
        else:
            try:
                out = await self.stream.__anext__()
            except StopAsyncIteration:
                self.finished = True
                return None
            self.tracker.on_output(out)
        self.last = out
        if out.finished:
            self.finished = True
        return out


@dataclass
class Choices:
    """All engine requests of one HTTP request."""

    items: list[Choice] = field(default_factory=list)

    async def close(self) -> None:
        """Close every engine iterator (aborting unfinished requests); never raises."""
        for ch in self.items:
            if not ch.finished:
                ch.tracker.finish("abort", len(ch.last.prompt_token_ids) if ch.last else 0)
            aclose = getattr(ch.stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001 - closing must not mask the handler's outcome
                    pass

    async def collect(self) -> list[RequestOutput]:
        """Run every choice to the end; the final outputs in choice order."""

        async def drain(ch: Choice) -> RequestOutput:
            while await ch.next() is not None:
                pass
            assert ch.last is not None
            return ch.last

        return list(await asyncio.gather(*(drain(ch) for ch in self.items)))

    async def merged(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Outputs of all choices as they come; one choice is iterated directly (no queue hop)."""
        if len(self.items) == 1:
            ch = self.items[0]
            while (out := await ch.next()) is not None:
                yield ch, out
            return
        queue: asyncio.Queue[tuple[Choice, RequestOutput | None | BaseException]] = asyncio.Queue()

        async def pump(ch: Choice) -> None:
            try:
                while (out := await ch.next()) is not None:
                    await queue.put((ch, out))
                await queue.put((ch, None))
            except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
                await queue.put((ch, exc))

        tasks = [asyncio.create_task(pump(ch)) for ch in self.items]
        try:
            live = len(tasks)
            while live:
                ch, item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield ch, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def open_choices(
    engine: Any,
    prompts: list[str | list[int]],
    params: SamplingParams,
    *,
    n: int,
    request_id: str,
    adapter: str | None,
    metrics: ServerMetrics,
    label: str,
    priority: int = 0,
    tenant: str | None = None,
    adapters: Any = None,
) -> Choices:
    """Submit len(prompts) * n engine requests and wait for each one's first output.

    Raises the engine's error (MloraError subclass) if any request is refused; the others are
    then aborted. Choice index = prompt index * n + sample index (vLLM's numbering). As vLLM, sample j
    of a seeded request runs with seed + j: the choices differ, and each is reproducible.
    """
    choices = Choices()
    total = len(prompts) * n
    for i, prompt in enumerate(prompts):
        for j in range(n):
            idx = i * n + j
            rid = request_id if total == 1 else f"{request_id}-{idx}"
            tracker = metrics.tracker(label, tenant=tenant or label)
            try:
                child = copy.copy(params)
                if params.seed is not None:
                    child.seed = params.seed + j
                kw = {"adapters": adapters} if adapters is not None else {}  # a composition (engine.lora.compose)
                stream = engine.generate(prompt, child, request_id=rid, adapter=adapter, priority=priority, tenant=tenant, **kw)
            except BaseException:
                await choices.close()
                raise
            choices.items.append(Choice(index=idx, prompt=prompt, stream=stream, tracker=tracker))

    async def first(ch: Choice) -> None:
        out = await ch.stream.__anext__()
        ch.tracker.on_output(out)
        ch.pending = out

    try:
        results = await asyncio.gather(*(first(ch) for ch in choices.items), return_exceptions=True)
    except BaseException:  # the client went away while we waited (handler cancelled)
        await choices.close()
        raise
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for ch, r in zip(choices.items, results):
            if isinstance(r, BaseException):
                ch.finished = True  # refused before it started: nothing to abort or count
        await choices.close()
        raise errors[0]
    return choices
