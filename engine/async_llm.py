"""AsyncLLM: the engine behind the server. One asyncio task drives the step loop on one engine thread.

- The engine thread (a one-worker executor, `mlora-engine`) is the only thread that calls into
  `EngineCore`, its scheduler and its LoRA engine: each loop turn it applies the inbox (adds and aborts)
  and runs one `EngineCore.step()`, so the event loop keeps serving HTTP while the model computes.
  Rarer calls (fair-share weights, forgetting an unloaded tenant, compositions, closing) are queued on
  the same thread and awaited, so they have taken effect when the HTTP reply goes out.
- The event loop talks to the core only through that inbox. What a request's validation needs from
  the core is immutable (the tokenizer, vocabulary size, context length): `core.processor`, an
  `InputProcessor` (thread-safe), runs in a worker thread for text prompts (tokenizing grows with the
  client's input) and inline for token-id prompts (a range check bounded by the context length); either
  way the engine thread gets an input that is already valid.
  What needs engine state (a duplicate id, an adapter unknown or removed meanwhile) is decided on the
  engine thread at add time and reaches the client as the request's first item, the same exception
  `generate()` raised before, so the server answers the same 4xx.
- Two documented exceptions read across threads: `stats()` (EngineCore.stats takes atomic snapshots
  for a /metrics scrape, which must answer while a step runs) and the adapter registry
  (`AdapterCache`, lock-protected: registering reads and validates files in a worker thread so steps go on).
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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.config import EngineConfig, positive_number
from engine.core import EngineCore, EngineStats
from engine.errors import ConfigError, EngineStoppedError, QueueFullError
from engine.input_processor import Composition, resolve_components
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger("mlora.engine")

ENGINE_THREAD_NAME = "mlora-engine"
T = TypeVar("T")


@dataclass
class _Turn:
    """What one engine-thread turn hands back to the event loop."""

    deliveries: list[tuple[str, RequestOutput | BaseException]] = field(default_factory=list)  # (request id, item)
    adds_taken: int = 0  # "add" messages this turn took from the inbox
    num_waiting: int = 0  # the scheduler's waiting queue after the turn
    busy: bool = False  # unfinished requests remain


class AsyncLLM:
    """Async front of EngineCore (threading and failure rules: see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        self.processor = self.core.processor  # immutable facts: safe on any thread
        self._registry = self.core.lora.cache if self.core.lora is not None else None  # lock-protected
        self._compositions: dict[str, Composition] = dict(self.core.compositions)  # event-loop copy
        self._executor: ThreadPoolExecutor | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._by_tenant: dict[str, int] = {}  # tenant -> its unfinished requests (event-loop side only)
        self._num_waiting = 0  # the scheduler's waiting queue as the last engine turn left it
        self._adds_in_flight = 0  # adds put in the inbox that no finished turn has reported yet
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._dead: asyncio.Event | None = None

    # -- facts the server reads --------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def model_name(self) -> str:
        return self.processor.model_name

    @property
    def max_model_len(self) -> int:
        return self.processor.max_model_len

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
            await self._close_engine_thread()
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
            await self._on_engine_thread(self.core.lora.close)  # after the turn in flight, if any
        await self._close_engine_thread()

    async def _close_engine_thread(self) -> None:
        """Let the turn in flight end, then release the thread (a later start() makes a new one)."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown)

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
        text, ids = await asyncio.to_thread(self.processor.process, prompt, params, priority) \
            if isinstance(prompt, str) else self.processor.process(prompt, params, priority)
        if self._stopping or self._task is None:
            raise EngineStoppedError("the engine is not running" if self._task is None else "the engine is shutting down")
        if self._error is not None:
            raise EngineStoppedError(f"the engine loop failed: {self._error}")
        if request_id in self._queues:
            raise ConfigError(f"duplicate request id {request_id!r}")
        first, _ = resolve_components(adapter, adapters, self._compositions, self.config.max_adapters_per_request)
        limit = self.config.max_queue
        if limit is not None and self._num_waiting + self._adds_in_flight >= limit:
            raise QueueFullError(f"the waiting queue is full ({limit} requests)", hint="retry later")
        who = self.processor.tenant_of(first, tenant)
        cap = self.config.max_queue_per_tenant
        if cap is not None and self._by_tenant.get(who, 0) >= cap:
            raise QueueFullError(f"tenant {who!r} already has {cap} unfinished requests (--max-queue-per-tenant)",
                                 hint="retry later")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = q
        # unknown adapters, DoRA in a composition, a duplicate id: decided by the engine thread, which
        # puts the error first in `q` (raised below, before any output)
        self._inbox.put(("add", (request_id, ids, text, params, adapter, priority, tenant, adapters)))
        self._adds_in_flight += 1
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
        registry = self._adapter_registry()
        if weight is not None:
            weight = positive_number(weight, f"the weight of {name!r}")
        await asyncio.to_thread(registry.register, name, str(path), root=root)
        if weight is not None:  # applied on the engine thread before this returns
            await self._on_engine_thread(self.core.scheduler.set_weight, name, weight)

    async def remove_adapter(self, name: str) -> None:
        """Unregister `name`; its default tenant's fair-share accounting goes too, on the engine thread
        before this returns (so /metrics never shows the unloaded tenant afterwards)."""
        self._adapter_registry().remove(name)
        await self._on_engine_thread(self.core.scheduler.forget_tenant, name)

    def list_adapters(self) -> list[str]:
        return [] if self._registry is None else self._registry.names()

    def knows(self, name: str) -> bool:
        """Whether a request's `model` may name `name` as an adapter or a composition alias right now
        (the early 404; the engine thread decides again at add time, as adapters come and go)."""
        return name in self.list_adapters() or name in self._compositions

    @property
    def compositions(self) -> dict[str, Composition]:
        """Composition aliases (name -> ((adapter, weight), ...)) a request's `model` may name."""
        return self._compositions

    async def add_composition(self, name: str, components: Any) -> None:
        """See EngineCore.add_composition (applied on the engine thread between steps)."""
        self._compositions = await self._on_engine_thread(self._composition_call, self.core.add_composition,
                                                          name, components)

    async def remove_composition(self, name: str) -> None:
        """See EngineCore.remove_composition."""
        self._compositions = await self._on_engine_thread(self._composition_call, self.core.remove_composition, name)

    def _composition_call(self, fn: Callable[..., None], *args: Any) -> dict[str, Composition]:
        fn(*args)
        return dict(self.core.compositions)

    def _adapter_registry(self) -> Any:
        if self._registry is None:
            raise ConfigError("LoRA is disabled for this engine")
        return self._registry

    def stats(self) -> EngineStats:
        return self.core.stats()  # atomic snapshots, safe while a step runs (see the module docstring)

    # -- the loop --------------------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _on_engine_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine thread (after the turn in flight) and return its result."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=ENGINE_THREAD_NAME)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _turn(self) -> _Turn:
        """One turn on the engine thread: apply the inbox, then one step if there is work."""
        turn = _Turn()
        self._apply_inbox(turn)
        if self.core.has_unfinished():
            turn.deliveries += [(out.request_id, out) for out in self.core.step()]
        turn.num_waiting, turn.busy = len(self.core.scheduler.waiting), self.core.has_unfinished()
        return turn

    def _apply_inbox(self, turn: _Turn) -> None:
        """Apply queued adds/aborts (engine thread, between steps)."""
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                turn.adds_taken += 1
                rid, ids, text, params, adapter, priority, tenant, adapters = arg
                if rid not in self._queues:
                    continue  # the client went away before the request started
                try:
                    self.core.add_processed(rid, ids, params, adapter, prompt_text=text, priority=priority,
                                            tenant=tenant, adapters=adapters)
                except Exception as e:  # e.g. the adapter was removed meanwhile: the client's 4xx
                    turn.deliveries.append((rid, e))
            else:
                out = self.core.abort(arg)
                if out is not None:
                    turn.deliveries.append((arg, out))

    def _deliver(self, turn: _Turn) -> None:
        """Hand a turn's outputs and errors to their requests (event loop)."""
        self._num_waiting = turn.num_waiting
        self._adds_in_flight -= turn.adds_taken
        for rid, item in turn.deliveries:
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(item)

    async def _loop(self) -> None:
        assert self._wake is not None
        try:
            while True:
                self._wake.clear()
                turn = await self._on_engine_thread(self._turn)
                self._deliver(turn)
                if not turn.busy and self._inbox.empty():
                    await self._wake.wait()
                else:
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
