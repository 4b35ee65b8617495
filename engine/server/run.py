"""Run the server: start the engine, listen, and shut down gracefully on SIGINT/SIGTERM.

Shutdown order: stop accepting connections and answer new requests on open connections with
503; let in-flight requests finish for up to `grace_period` seconds (a second signal cuts the
wait short); then stop the engine, which aborts whatever is left (streams end with an error
event, non-streamed requests get 503); close the connections; return normally (exit 0).

If the engine loop dies (it could not continue: /health already answers 503), the server shuts
down at once and `serve` raises EngineDeadError, so `mlora serve` exits 1 and a supervisor
restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.errors import ConfigError, EngineDeadError
from engine.server.app import STATE, create_app
from engine.server.config import ServerConfig

log = logging.getLogger("mlora.server")

ReadyCallback = Callable[[str, str, list[str]], None]  # (url, base model name, adapter names)


@dataclass
class RunningServer:
    """A listening server over a started engine (from `start_server`)."""

    app: web.Application
    runner: web.AppRunner
    site: web.BaseSite
    url: str


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound before the model loads so a busy port fails in a second."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="check --host") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp: restart over TIME_WAIT
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          hint="pick another --port, or stop what is using it") from None
    sock.setblocking(False)
    return sock


def engine_summary(engine: Any) -> str:
    """One line a user reads at startup: model, dtype, device, KV tokens, max context, LoRA slots."""
    core = getattr(engine, "core", None)
    runner = getattr(core, "runner", None)
    if runner is None:
        return f"model {engine.model_name}, max context {engine.max_model_len} tokens"
    cfg = core.config
    dtype = str(runner.dtype).replace("torch.", "")
    more = f" (more within {cfg.max_cpu_lora_bytes / 2**20:.0f} MiB)" if cfg.max_cpu_lora_bytes else ""
    lora = (f"{cfg.max_loras} LoRA slots of rank <= {cfg.max_lora_rank}, {cfg.max_cpu_loras} in CPU memory{more}"
            if cfg.enable_lora else "LoRA off")
    return (f"model {engine.model_name} ({core.model_path}), {dtype} on {runner.device}, "
            f"KV cache {runner.num_blocks * runner.block_size} tokens ({runner.num_blocks} blocks of {runner.block_size}), "
            f"max context {engine.max_model_len} tokens, {lora}")


async def start_server(engine: Any, config: ServerConfig, sock: socket.socket | None = None) -> RunningServer:
    """Listen on config.host:config.port (0 = a free port), or on `sock` already bound (`bind_socket`),
    with routes over a started `engine`."""
    app = create_app(engine, config)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
    # keepalive_timeout: aiohttp arms it when a connection opens and after each response, and closes the
    # connection if no complete request head arrived by then: the header timeout (slowloris) and idle close.
    # lingering_time: after an early response (401, 408, 413) the unread rest of a body is drained for at
    # most a second (aiohttp's default is 10 s), then the connection closes.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0,
                           keepalive_timeout=config.header_timeout, lingering_time=1.0)
    await runner.setup()
    site: web.BaseSite = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                          hint="pick another --port, or stop what is using it") from None
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    return RunningServer(app=app, runner=runner, site=site, url=f"http://{shown}:{port}")


async def shutdown(server: RunningServer, engine: Any, grace_period: float, force: asyncio.Event | None = None) -> None:
    """Drain and stop: see the module docstring. Never raises."""
    state = server.app[STATE]
    state.draining = True
    await server.site.stop()  # stop accepting new connections
    if state.inflight:
        log.info("waiting up to %.0fs for %d in-flight request(s)", grace_period, state.inflight)
        waits = [asyncio.create_task(state.idle.wait())]
        if force is not None:
            waits.append(asyncio.create_task(force.wait()))
        done, pending = await asyncio.wait(waits, timeout=grace_period, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
    if state.inflight:
        log.warning("aborting %d in-flight request(s) after the grace period", state.inflight)
    try:
        await engine.stop(grace_s=0.0)
    except Exception:  # noqa: BLE001 - shutting down anyway
        log.exception("engine.stop failed")
    try:
        await asyncio.wait_for(state.idle.wait(), timeout=5.0)
    except asyncio.TimeoutError:
        pass
    await server.runner.cleanup()


async def serve_async(config: ServerConfig, on_ready: ReadyCallback | None = None,
                      on_bound: Callable[[], None] | None = None) -> None:
    """Start the engine and the server, run until SIGINT/SIGTERM, then shut down gracefully."""
    from engine import AsyncLLM

    sock = bind_socket(config.host, config.port)  # a busy port is an error before minutes of loading
    if on_bound is not None:
        on_bound()  # e.g. "loading the model..."
    try:
        engine = AsyncLLM(config.engine)
    except BaseException:
        sock.close()
        raise
    log.info("%s", engine_summary(engine))
    await engine.start()
    try:
        server = await start_server(engine, config, sock)
    except BaseException:
        sock.close()
        await engine.stop(grace_s=0.0)
        raise
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (force if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        if on_ready is not None:
            on_ready(server.url, engine.model_name, list(engine.list_adapters()))
        stopped = asyncio.create_task(stop.wait())
        died = asyncio.create_task(engine.wait_dead())
        await asyncio.wait([stopped, died], return_when=asyncio.FIRST_COMPLETED)
        for t in (stopped, died):
            t.cancel()
        if died.done() and not died.cancelled():
            reason = died.result()
            log.critical("the engine died (%s): shutting down with exit status 1", reason)
            await shutdown(server, engine, 0.0, force)
            raise EngineDeadError(f"the engine died: {reason}", hint="restart the server; MLORA_DEBUG=1 shows the traceback")
        log.info("shutting down (grace period %.0fs)", config.grace_period)
        await shutdown(server, engine, config.grace_period, force)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def serve(config: ServerConfig, on_ready: ReadyCallback | None = None,
          on_bound: Callable[[], None] | None = None) -> None:
    """Blocking entry point of `mlora serve`: returns (exit 0) after a graceful shutdown."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_async(config, on_ready, on_bound))
