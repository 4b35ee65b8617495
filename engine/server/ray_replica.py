"""One Ray Serve replica of `mlora serve --ray`: an AsyncLLM whose adapters come and go with Ray's
model multiplexing.

The ingress (engine.server.ray_ingress) calls a replica with `multiplexed_model_id` = the adapter
name ("" for the base model). Ray's router sends the call to a replica that already holds that
adapter when there is one, so each adapter lives on few replicas. On a replica:

- `serve.multiplexed(max_num_models_per_replica=max_cpu_loras)` loads a missing adapter by
  registering it in the engine (CPU tier; a device slot on first use) and keeps an LRU of them;
  when it unloads one (LRU, to make room) the adapter is unregistered from the engine, once no
  request of this replica still uses it (an adapter in use is never pulled from under a request).
- Requests run through the same handlers as the single-process server (engine.server.app's
  `completion_reply` / `chat_reply`), so bodies, SSE events and error bodies are the same.
- Each replica has its own Prometheus registry (the server's series plus adapter registrations);
  the ingress gathers them with `handle.broadcast("metrics_text")` and adds a `replica` label.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from prometheus_client import Counter, Gauge
from ray import serve

from engine.errors import AdapterNotFoundError, MloraError
from engine.server import protocol
from engine.server.app import SSE_HEADERS, Reply, api_error_for, chat_reply, completion_reply, detokenize_reply, \
    new_serving, tokenize_reply
from engine.server.config import ServerConfig

log = logging.getLogger("mlora.server.ray")

ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")  # answered by a replica


def adapter_catalog(config: ServerConfig) -> dict[str, str]:
    """Every adapter the deployment may serve: name -> path (the demo's adapters with no --model, then --lora)."""
    from engine.loader import demo_adapters

    catalog = {n: str(p) for n, p in demo_adapters().items()} if config.engine.model is None else {}
    catalog.update(dict(config.engine.loras))
    return catalog


def error_head(exc: BaseException, replica: str, retry_after_s: int) -> dict[str, Any]:
    """The replica's answer for an error raised before any byte: status, headers and OpenAI error body."""
    err = api_error_for(exc, retry_after_s)
    return {"status": err.status, "headers": dict(err.headers), "body": protocol.error_body(err), "replica": replica}


class _Registration:
    """What Ray's multiplexer caches for one adapter on one replica.

    Ray awaits `model.__del__()` when it unloads a model (LRU). It is set on the instance, not the
    class, so the garbage collector (which looks special methods up on the class) never calls an
    async function without awaiting it.
    """

    def __init__(self, replica: "MloraReplica", name: str) -> None:
        self.name = name
        self._replica = replica
        self.__del__ = self._unload

    async def _unload(self) -> None:
        await self._replica._unregister(self.name)


class MloraReplica:
    """One engine with the base model; adapters registered on demand (see the module docstring)."""

    async def __init__(self, config: ServerConfig) -> None:
        from engine import AsyncLLM

        ctx = serve.get_replica_context()
        self.replica_id: str = ctx.replica_id.unique_id
        self.catalog = adapter_catalog(config)
        config = replace(config, engine=replace(config.engine, loras=(), lora_compose=()))  # compositions: not with Ray yet
        self.engine = AsyncLLM(config.engine)
        await self.engine.start()
        for name in self.engine.list_adapters():  # the demo registers its adapters at start: begin empty
            await self.engine.remove_adapter(name)
        self.serving = new_serving(self.engine, config)  # the route logic's state; no HTTP server here
        self.serving.state.adapter_paths.clear()
        self.retry_after_s = config.retry_after_s
        self._inflight: Tally[str] = Tally()
        self._doomed: set[str] = set()  # unloaded by Ray while requests still use them
        registry = self.serving.state.metrics.registry
        self.m_loads = Counter("mlora:replica_adapter_loads", "Adapters registered on this replica by Ray Serve "
                               "multiplexing (a miss: the request came to a replica without it).", ["adapter"],
                               registry=registry)
        self.m_unloads = Counter("mlora:replica_adapter_unloads", "Adapters unregistered from this replica "
                                 "(Ray Serve's LRU made room for another).", ["adapter"], registry=registry)
        self.m_registered = Gauge("mlora:replica_adapter_registered", "1 for each adapter registered on this replica.",
                                  ["adapter"], registry=registry)

        async def load_adapter(name: str) -> _Registration:
            return await self._register(name)

        # Wired per instance so the cache size follows --max-cpu-loras (Ray detects it at runtime).
        self._load_adapter = serve.multiplexed(max_num_models_per_replica=config.engine.max_cpu_loras)(load_adapter)
        self.__del__ = self._shutdown  # on the instance: see _Registration
        log.info("replica %s ready (%s)", self.replica_id, self.engine.model_name)

    # -- adapters ------------------------------------------------------------------------------
    async def _register(self, name: str) -> _Registration:
        self._doomed.discard(name)
        if name not in self.engine.list_adapters():
            path = self.catalog.get(name)
            if path is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered")
            await self.engine.add_adapter(name, path)
            self.m_loads.labels(name).inc()
            self.m_registered.labels(name).set(1)
            log.info("replica %s registered adapter %r", self.replica_id, name)
        return _Registration(self, name)

    async def _unregister(self, name: str) -> None:
        self._doomed.add(name)
        if not self._inflight[name]:
            await self._drop(name)

    async def _drop(self, name: str) -> None:
        self._doomed.discard(name)
        if name in self.engine.list_adapters():
            await self.engine.remove_adapter(name)
            self.m_unloads.labels(name).inc()
            self.m_registered.remove(name)
            log.info("replica %s unregistered adapter %r", self.replica_id, name)

    async def _acquire(self) -> str:
        """Register the request's adapter here if needed and count it in use; the adapter name or ""."""
        name = serve.get_multiplexed_model_id()
        if name:
            await self._load_adapter(name)
        self._inflight[name] += 1
        return name

    async def _release(self, name: str) -> None:
        self._inflight[name] -= 1
        if not self._inflight[name]:
            del self._inflight[name]
            if name in self._doomed:
                await self._drop(name)

    async def _reply(self, route: str, body: Any, request_id: str | None) -> Reply:
        if route == "/v1/completions":
            return await completion_reply(self.serving, body, request_id)
        if route == "/v1/chat/completions":
            return await chat_reply(self.serving, body, request_id)
        if route == "/tokenize":
            return await tokenize_reply(self.serving, body)
        if route == "/detokenize":
            return await detokenize_reply(self.serving, body)
        raise protocol.APIError(404, "Not Found")

    # -- called by the ingress -----------------------------------------------------------------
    async def complete(self, route: str, body: Any, request_id: str | None = None) -> dict[str, Any]:
        """A non-streamed request: {"status", "headers", "body", "replica"}."""
        name = ""
        try:
            name = await self._acquire()
            reply = await self._reply(route, body, request_id)
            if reply.events is not None:  # the ingress saw "stream": false; cannot happen with one parser
                await reply.aclose()
                raise protocol.APIError(500, "internal server error (a stream was requested on the non-streaming path)")
            return {"status": 200, "headers": {}, "body": reply.body, "replica": self.replica_id}
        except (protocol.APIError, MloraError) as exc:
            return error_head(exc, self.replica_id, self.retry_after_s)
        finally:
            await self._release(name)

    async def stream(self, route: str, body: Any, request_id: str | None = None) -> AsyncIterator[Any]:
        """A streamed request: first a head dict (as `complete` returns, without a body on success), then
        the SSE byte strings. Errors before the first event come as an error head and nothing else."""
        name = ""
        reply: Reply | None = None
        try:
            try:
                name = await self._acquire()
                reply = await self._reply(route, body, request_id)
            except (protocol.APIError, MloraError) as exc:
                yield error_head(exc, self.replica_id, self.retry_after_s)
                return
            if reply.events is None:  # "stream": true always streams; kept for symmetry with `complete`
                yield {"status": 200, "headers": {}, "body": reply.body, "replica": self.replica_id}
                return
            yield {"status": 200, "headers": dict(SSE_HEADERS), "body": None, "replica": self.replica_id}
            async for data in reply.events:
                yield data
        finally:  # also when the ingress cancels (the client went away): abort the engine requests
            if reply is not None:
                await reply.aclose()
            await self._release(name)

    async def check_health(self) -> None:
        """Ray Serve's health probe: a replica whose engine loop died is replaced, never kept serving 503s."""
        if self.engine.error:
            raise RuntimeError(f"the engine died: {self.engine.error}")

    async def info(self) -> dict[str, Any]:
        """What /v1/models needs: the base model's name and context length, and this replica's id."""
        return {"model_name": self.engine.model_name, "max_model_len": self.engine.max_model_len,
                "root": self.serving.config.engine.model or self.engine.model_name, "replica": self.replica_id}

    async def metrics_text(self) -> tuple[str, bytes]:
        """(replica id, this replica's Prometheus exposition), refreshed from the engine now."""
        state = self.serving.state
        try:
            state.metrics.refresh(self.engine.stats())
        except Exception:  # noqa: BLE001 - a scrape must not fail because stats did
            log.exception("engine.stats() failed during a /metrics scrape")
        return self.replica_id, state.metrics.render()

    async def _shutdown(self) -> None:
        """Stop the engine (Ray Serve awaits `__del__` when it stops the replica, after the graceful drain)."""
        await self.engine.stop(grace_s=0.0)

