"""AsyncLLM: the engine behind the server. One asyncio task owns the step loop.

- Each `EngineCore.step()` runs in a worker thread (`asyncio.to_thread`), so the event loop keeps
  serving HTTP while the model computes.
- Adds and aborts are queued (thread-safe) and applied by the loop task between steps, so the
  core is only ever touched by one thread at a time.
- Each request has its own asyncio.Queue of outputs; `generate()` is an async iterator over it.
  Closing or cancelling the iterator before the end aborts the request (its KV blocks are freed).
- A failure inside one step ends only that step's requests (EngineCore). If the loop itself cannot
  go on, the engine is dead: the error is logged, every waiter gets EngineStoppedError, new
  requests are refused, `error` says why and `wait_dead()` returns, so the server answers /health
  with 503 and exits non-zero for a supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import AsyncIterator
from typing import Any

from engine.config import EngineConfig, check_priority, positive_number
from engine.core import EngineCore, EngineStats
from engine.errors import ConfigError, EngineStoppedError, QueueFullError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger("mlora.engine")


class AsyncLLM:
    """Async front of EngineCore (threading and failure rules: see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._by_tenant: dict[str, int] = {}  # tenant -> its unfinished requests (event-loop side only)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._dead: asyncio.Event | None = None

    # -- facts the server reads --------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def model_name(self) -> str:
        return self.core.model_name

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def error(self) -> str | None:
        """Why the engine loop died (None while it is healthy): /health answers 503 with it."""
        return None if self._error is None else f"{type(self._error).__name__}: {self._error}"

    async def wait_dead(self) -> str:
        """Return (the reason) once the engine loop has died; never returns while it is healthy."""
        if self._dead is None:
            self._dead = asyncio.Event()
        if self._error is None:
            await self._dead.wait()
        return self.error or "the engine loop stopped"

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the loop task (idempotent)."""
        if self._task is None:
            if self._dead is None:
                self._dead = asyncio.Event()
            self._wake = asyncio.Event()
            self._stopping = False
            self._task = asyncio.create_task(self._loop(), name="mlora-engine-loop")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Refuse new requests, let running ones finish for up to `grace_s`, abort the rest."""
        self._stopping = True
        if self._task is None:
            return
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._queues and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for rid in list(self._queues):
            self._inbox.put(("abort", rid))
        self._poke()
        while self._queues and not self._task.done():
            await asyncio.sleep(0.01)
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass
        self._task = None
        if self.core.lora is not None:
            self.core.lora.close()

    # -- requests --------------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        request_id: str,
        adapter: str | None = None,
        priority: int = 0,
        tenant: str | None = None,
        adapters: Any = None,
    ) -> AsyncIterator[RequestOutput]:
        """Incremental outputs of one request; the last has finished=True. `priority`, `tenant` and
        `adapters` (a composition): see EngineCore.add_request.

        Raises AdapterNotFoundError / PromptTooLongError / QueueFullError / EngineStoppedError
        before the first output. Closing the iterator early aborts the request.
        """
        # PromptTooLongError / bad ids now, not inside the loop; text in a worker thread, as its cost
        # grows with the client's input and the event loop serves every other client meanwhile.
        text, ids = await asyncio.to_thread(self.core.tokenize, prompt) if isinstance(prompt, str) else \
            self.core.tokenize(prompt)
        if self._stopping or self._task is None:
            raise EngineStoppedError("the engine is not running" if self._task is None else "the engine is shutting down")
        if self._error is not None:
            raise EngineStoppedError(f"the engine loop failed: {self._error}")
        if request_id in self._queues:
            raise ConfigError(f"duplicate request id {request_id!r}")
        check_priority(self.config, priority)
        first, _ = self.core.resolve_adapters(adapter, adapters)  # unknown names, DoRA, too many: now, not in the loop
        limit = self.config.max_queue
        if limit is not None and len(self.core.scheduler.waiting) + self._pending_adds() >= limit:
            raise QueueFullError(f"the waiting queue is full ({limit} requests)", hint="retry later")
        who = self.core.tenant_of(first, tenant)
        cap = self.config.max_queue_per_tenant
        if cap is not None and self._by_tenant.get(who, 0) >= cap:
            raise QueueFullError(f"tenant {who!r} already has {cap} unfinished requests (--max-queue-per-tenant)",
                                 hint="retry later")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = q
        self._inbox.put(("add", (request_id, ids, text, params, adapter, priority, tenant, adapters)))
        self._poke()
        self._by_tenant[who] = self._by_tenant.get(who, 0) + 1
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            left = self._by_tenant.pop(who) - 1
            if left:
                self._by_tenant[who] = left
            if not finished:
                self._inbox.put(("abort", request_id))
                self._poke()

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._poke()

    # -- adapters ------------------------------------------------------------------------------
    async def add_adapter(self, name: str, path: str, weight: float | None = None, *, root: str | None = None) -> None:
        """Validate and register an adapter (loads in a worker thread; the loop keeps stepping).
        `weight`: its fair-share weight from now on (None = unchanged), applied between steps.
        `root`: the files actually read must resolve inside it (see AdapterCache.register)."""
        lora = self._lora()
        if weight is not None:
            weight = positive_number(weight, f"the weight of {name!r}")
        await asyncio.to_thread(lora.add_adapter, name, str(path), root=root)
        if weight is not None:
            self._inbox.put(("weight", (name, weight)))
            self._poke()

    async def remove_adapter(self, name: str) -> None:
        """Unregister `name`; its default tenant's fair-share accounting goes too (between steps)."""
        self._lora().remove_adapter(name)
        self._inbox.put(("forget", name))
        self._poke()

    def list_adapters(self) -> list[str]:
        return [] if self.core.lora is None else self.core.lora.names()

    @property
    def compositions(self) -> dict[str, tuple[tuple[str, float], ...]]:
        """Composition aliases (name -> ((adapter, weight), ...)) a request's `model` may name."""
        return self.core.compositions

    def add_composition(self, name: str, components: Any) -> None:
        """See EngineCore.add_composition (a dict write between steps' reads: no step is affected mid-way)."""
        self.core.add_composition(name, components)

    def remove_composition(self, name: str) -> None:
        """See EngineCore.remove_composition."""
        self.core.remove_composition(name)

    def _lora(self) -> Any:
        if self.core.lora is None:
            raise ConfigError("LoRA is disabled for this engine")
        return self.core.lora

    def stats(self) -> EngineStats:
        return self.core.stats()

    # -- the loop --------------------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _pending_adds(self) -> int:
        return self._inbox.qsize()  # counts the few weight/forget messages too: a bound, not an exact count

    def _apply_inbox(self) -> None:
        """Apply queued adds/aborts (between steps: the core is not running)."""
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                rid, ids, text, params, adapter, priority, tenant, adapters = arg
                if rid not in self._queues:
                    continue  # the client went away before the request started
                try:
                    self.core.add_request(rid, ids, params, adapter, prompt_text=text, priority=priority, tenant=tenant,
                                          adapters=adapters)
                except Exception as e:  # e.g. the adapter was removed meanwhile
                    self._queues[rid].put_nowait(e)
            elif kind == "weight":
                self.core.scheduler.set_weight(*arg)
            elif kind == "forget":
                self.core.scheduler.forget_tenant(arg)
            else:
                out = self.core.abort(arg)
                q = self._queues.get(arg)
                if out is not None and q is not None:
                    q.put_nowait(out)

    async def _loop(self) -> None:
        assert self._wake is not None
        try:
            while True:
                self._apply_inbox()
                if not self.core.has_unfinished():
                    self._wake.clear()
                    if self._inbox.empty():
                        await self._wake.wait()
                    continue
                outputs = await asyncio.to_thread(self.core.step)
                for out in outputs:
                    q = self._queues.get(out.request_id)
                    if q is not None:
                        q.put_nowait(out)
                await asyncio.sleep(0)  # let handlers run between steps
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug or device error: fail every waiter, refuse new work
            self._error = e
            log.critical("the engine loop died (%s: %s); failing request(s) %s", type(e).__name__, e,
                         ", ".join(self._queues) or "(none)", exc_info=e)
            for q in self._queues.values():
                q.put_nowait(EngineStoppedError(f"the engine loop failed: {type(e).__name__}: {e}"))
            if self._dead is not None:
                self._dead.set()
            raise
