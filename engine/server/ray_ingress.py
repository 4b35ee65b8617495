"""`mlora serve --ray`: the same OpenAI-compatible routes, served by N engine replicas on Ray Serve.

    client --HTTP--> Serve proxy --> MloraIngress (1) --handle, multiplexed_model_id=adapter--> MloraReplica (N)

The ingress parses the JSON body (400 for malformed JSON, like the single-process server), reads
`model`, and calls a replica with `multiplexed_model_id` = that adapter's name ("" for the base
model, or for a name that is not an adapter: the replica then answers 404 after the body is
validated, as the single-process server does). Ray Serve's router prefers replicas that already
hold the adapter (adapter affinity); engine.server.ray_replica does the rest. Every response
carries `x-mlora-replica: <replica id>`.

A replica that dies (crash, node loss, `ray.kill`) is restarted by Serve. Requests that had not
sent a byte yet (all non-streamed ones, streams before their first event) are retried on another
replica up to `retries` times; a stream cut mid-way ends with one OpenAI error event (503) and
`data: [DONE]`, as a late error does on the single-process server. /metrics gathers every
replica's registry (`handle.broadcast`) with a `replica` label, plus the ingress's
`mlora:ray_replica_failures_total{outcome}`.

    from engine.server.ray_ingress import RayConfig, serve_ray
    serve_ray(RayConfig(server=ServerConfig(port=8000), replicas=2))
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ConfigError, MloraError
from engine.server import protocol
from engine.server.app import api_error_for, client_request_id
from engine.server.config import ServerConfig
from engine.server.metrics import CONTENT_TYPE, merge_expositions
from engine.server.ray_replica import ROUTES, MloraReplica, adapter_catalog
from engine.server.security import OPEN_PATHS, check_api_key

log = logging.getLogger("mlora.server.ray")

REPLICA_HEADER = "x-mlora-replica"
_METHODS = {"/v1/completions": "POST", "/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET",
            "/metrics": "GET", "/v1/load_lora_adapter": "POST", "/v1/unload_lora_adapter": "POST", "/ping": "GET",
            "/version": "GET", "/tokenize": "POST", "/detokenize": "POST"}


@dataclass(frozen=True)
class RayConfig:
    """`mlora serve --ray`: the server's config plus how to deploy it on Ray Serve.

    `address`: a Ray cluster to join ("auto", "ray://host:10001", "host:6379"); None starts a
    local one. Each replica reserves `replica_cpus` CPUs and `replica_gpus` GPUs (None: 1 when
    the engine's device is cuda, else 0). `max_ongoing_requests` per replica (None = the
    engine's max_num_seqs) is also where Ray stops preferring the replica that holds an adapter
    and spills to others. `retries`: re-sends of a request whose replica died before answering.
    """

    server: ServerConfig = field(default_factory=ServerConfig)
    replicas: int = 2
    address: str | None = None
    app_name: str = "mlora"
    replica_cpus: float = 1.0
    replica_gpus: float | None = None
    max_ongoing_requests: int | None = None
    retries: int = 2
    health_check_period_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ConfigError(f"--replicas must be an integer >= 1, got {self.replicas!r}")
        if self.server.port == 0:
            raise ConfigError("--port 0 is not supported with --ray (Ray Serve's proxy needs a fixed port)")
        if self.server.allow_runtime_lora:
            raise ConfigError("--allow-runtime-lora is not supported with --ray",
                              hint="list the adapters at start with --lora NAME=PATH")
        if self.replica_cpus < 0 or (self.replica_gpus is not None and self.replica_gpus < 0):
            raise ConfigError("replica_cpus and replica_gpus must be >= 0")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response

    return Response(protocol.dumps(body).encode(), status_code=status, headers=headers,
                    media_type="application/json; charset=utf-8")


def _error(err: protocol.APIError, extra: dict[str, str] | None = None) -> Any:
    return _json(err.status, protocol.error_body(err), {**err.headers, **(extra or {})})


def _retryable() -> tuple[type[BaseException], ...]:
    """Errors that mean "the replica went away", not "the request is bad"."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return (RayActorError, ReplicaUnavailableError)


def replica_failed(exc: BaseException, retry_after_s: int) -> protocol.APIError:
    """The 503 a client gets when its replica died (after the retries) or Serve has none available."""
    return protocol.APIError(503, f"the replica serving this request failed ({type(exc).__name__}); retry the request",
                      headers={"Retry-After": str(retry_after_s)})


class MloraIngress:
    """The HTTP ingress deployment (a plain Starlette-request callable; Serve's proxy does the HTTP)."""

    def __init__(self, replica: Any, config: ServerConfig, retries: int = 2) -> None:
        self.replica = replica
        self.config = config
        self.retries = retries
        self.catalog = adapter_catalog(config)
        self.created = protocol.now_s()
        self._info: dict[str, Any] | None = None
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry(auto_describe=True)
        self.m_failures = Counter("mlora:ray_replica_failures", "Requests whose replica died: retried (on another "
                                  "replica), failed (503 after the retries) or stream_cut (error event mid-stream).",
                                  ["outcome"], registry=self.registry)

    async def __call__(self, request: Any) -> Any:
        rid = client_request_id(request.headers.get("x-request-id"))
        response = await self._answer(request, rid)
        if rid is not None:  # echoed, as the single-process server does
            response.headers["X-Request-Id"] = rid
        return response

    async def _answer(self, request: Any, rid: str | None) -> Any:
        try:
            return await self._route(request, rid)
        except protocol.APIError as exc:
            return _error(exc)
        except MloraError as exc:
            return _error(api_error_for(exc, self.config.retry_after_s))
        except Exception:  # noqa: BLE001 - never a traceback to the client
            log.exception("unhandled error in %s %s (X-Request-Id %s)", request.method, request.url.path, rid or "-")
            return _error(protocol.APIError(500, "internal server error (see the server log)"))

    async def _route(self, request: Any, rid: str | None) -> Any:
        path, method = request.url.path, request.method
        if path not in OPEN_PATHS:
            check_api_key(path, request.headers.get("authorization"), self.config.api_key)
        if path.startswith("/v1/models/") and method in ("GET", "HEAD"):  # one model, as the single-process server
            model_id = path[len("/v1/models/"):]
            card = next((c for c in (await self._models())["data"] if c["id"] == model_id), None)
            if card is None:
                raise protocol.APIError(404, f"The model '{model_id[:200]}' does not exist. GET /v1/models lists the base "
                                 "model and its adapters.", err_type="not_found_error", param="model")
            return _json(200, card)
        want = _METHODS.get(path)
        if want is None:
            raise protocol.APIError(404, "Not Found")
        if method != want and not (want == "GET" and method == "HEAD") and not (path == "/ping" and method == "POST"):
            raise protocol.APIError(405, "Method Not Allowed")
        if path in ROUTES:
            raw = await request.body()
            if len(raw) > self.config.max_body_bytes:  # as the single-process server's client_max_size
                raise protocol.APIError(413, "Request Entity Too Large")
            body = protocol.with_tenant_header(protocol.parse_json(raw), request.headers.get(protocol.TENANT_HEADER))
            return await self._generate(path, body, rid)
        if path == "/v1/models":
            return _json(200, await self._models())
        if path == "/metrics":
            return await self._metrics()
        if path in ("/health", "/ping"):
            from starlette.responses import Response

            return Response(status_code=200)
        if path == "/version":
            from engine.version import __version__

            return _json(200, {"version": __version__})
        raise protocol.APIError(403, "runtime adapter loading is not supported with --ray; list adapters at start with --lora")

    # -- generation ------------------------------------------------------------------------------
    async def _generate(self, route: str, body: Any, rid: str | None = None) -> Any:
        model = body.get("model") if isinstance(body, dict) else None
        adapter = model if isinstance(model, str) and model in self.catalog else ""
        stream = isinstance(body, dict) and body.get("stream") is True
        handle = self.replica.options(multiplexed_model_id=adapter, stream=stream)
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                log.warning("retrying a request after its replica failed (%s), attempt %d", last, attempt + 1)
                await asyncio.sleep(0.2 * attempt)
            try:
                if not stream:
                    head = await handle.complete.remote(route, body, rid)
                    return self._head_response(head)
                gen = handle.stream.remote(route, body, rid)
                head = await gen.__anext__()
            except _retryable() as exc:
                last = exc
                self.m_failures.labels("retried" if attempt < self.retries else "failed").inc()
                continue
            if head["status"] != 200 or head["body"] is not None:
                gen.cancel()
                return self._head_response(head)
            from starlette.responses import StreamingResponse

            return StreamingResponse(self._relay(gen), status_code=200,
                                     headers={**head["headers"], REPLICA_HEADER: head["replica"]})
        assert last is not None
        raise replica_failed(last, self.config.retry_after_s)

    @staticmethod
    def _head_response(head: dict[str, Any]) -> Any:
        return _json(head["status"], head["body"], {**head["headers"], REPLICA_HEADER: head["replica"]})

    async def _relay(self, gen: Any) -> AsyncIterator[bytes]:
        """The replica's SSE events; a replica lost mid-stream ends the stream with an error event and [DONE]."""
        try:
            async for data in gen:
                yield data
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
            if isinstance(exc, _retryable()):
                err = replica_failed(exc, self.config.retry_after_s)
                self.m_failures.labels("stream_cut").inc()
            else:
                log.exception("error while relaying a stream")
                err = protocol.APIError(500, "internal server error (see the server log)")
            yield protocol.sse(protocol.error_body(err))
            yield protocol.sse("[DONE]")
        finally:  # the client went away (or we are done): stop the replica's generator
            gen.cancel()

    # -- models and metrics ----------------------------------------------------------------------
    async def _models(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.replica.info.remote()
        base, max_len = self._info["model_name"], self._info["max_model_len"]
        cards = [protocol.model_card(base, root=self._info["root"], parent=None, created=self.created, max_model_len=max_len)]
        paths = dict(self.config.engine.loras)  # as the single-process server: --lora path, else the name
        cards += [protocol.model_card(name, root=paths.get(name, name), parent=base, created=self.created,
                               max_model_len=max_len) for name in self.catalog]
        return {"object": "list", "data": cards}

    async def _metrics(self) -> Any:
        from starlette.responses import Response

        results = await self.replica.broadcast("metrics_text").results_async(timeout_s=30, return_exceptions=True)
        parts = [r for r in results if not isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, BaseException):
                log.warning("a replica did not answer the metrics scrape: %s", r)
        from prometheus_client import generate_latest

        body = merge_expositions(parts, label="replica") + generate_latest(self.registry)  # + the ingress's own
        return Response(body, headers={"Content-Type": CONTENT_TYPE})


# -- deploying ------------------------------------------------------------------------------------
def replica_gpus(config: RayConfig, cluster_gpus: float) -> float:
    """GPUs each replica reserves: as configured, else one with --device cuda, or with auto on a cluster that has GPUs.

    (A replica that reserves none sees no GPU, so device "auto" would quietly mean CPU.)
    """
    if config.replica_gpus is not None:
        return config.replica_gpus
    device = config.server.engine.device
    return 1.0 if device == "cuda" or (device == "auto" and cluster_gpus > 0) else 0.0


def build_app(config: RayConfig, cluster_gpus: float = 0.0) -> Any:
    """The Serve application: MloraIngress over `config.replicas` MloraReplica deployments."""
    from ray import serve

    ecfg = config.server.engine
    gpus = replica_gpus(config, cluster_gpus)
    if gpus and gpus * config.replicas > cluster_gpus:
        log.warning("%d replica(s) x %g GPU > the %g GPU(s) in the Ray cluster: the rest wait for GPUs to join",
                    config.replicas, gpus, cluster_gpus)
    replica = serve.deployment(
        name="MloraReplica",
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": gpus},
        max_ongoing_requests=config.max_ongoing_requests or ecfg.max_num_seqs,
        health_check_period_s=config.health_check_period_s,
        graceful_shutdown_timeout_s=config.server.grace_period,
    )(MloraReplica)
    ingress = serve.deployment(name="MloraIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=4096)(MloraIngress)
    return ingress.bind(replica.bind(config.server), config.server, config.retries)


_RAY_KEYS = ("replicas", "replica_cpus", "replica_gpus", "max_ongoing_requests", "retries", "health_check_period_s")
_SERVER_KEYS = ("api_key", "grace_period", "retry_after_s")


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve application builder, for `serve run` or a KubeRay RayService's serveConfigV2:

        import_path: engine.server.ray_ingress:app_builder
        args: {replicas: 2, model: Qwen/Qwen2.5-0.5B, lora_dir: /adapters, loras: {sql: /x/sql}, max_cpu_loras: 8}

    Keys: RayConfig's (replicas, replica_cpus, replica_gpus, max_ongoing_requests, retries,
    health_check_period_s), ServerConfig's api_key, grace_period, retry_after_s, `loras` (name ->
    path), `lora_dir`, and any EngineConfig field; JSON in strings is decoded (`serve run` passes
    strings). The HTTP host/port are Serve's own settings there.
    """
    from engine.config import EngineConfig
    from engine.server.config import adapters_in_dir

    args = {k: _coerce(v) for k, v in args.items()}
    ray_opts = {k: args.pop(k) for k in _RAY_KEYS if k in args}
    server_opts = {k: args.pop(k) for k in _SERVER_KEYS if k in args}
    lora_dir = args.pop("lora_dir", None)
    loras = (adapters_in_dir(lora_dir) if lora_dir else ()) + tuple(dict(args.pop("loras", None) or {}).items())
    engine = EngineConfig.from_kwargs(loras=loras, **args)
    config = RayConfig(server=ServerConfig(engine=engine, **server_opts), **ray_opts)
    import ray

    return build_app(config, cluster_gpus=float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0)


def _coerce(value: Any) -> Any:
    """`serve run ... key=value` passes strings: "2" -> 2, "0.5" -> 0.5, "true" -> True, '{"a": "/x"}' -> dict."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def start(config: RayConfig) -> str:
    """Join or start Ray, start Serve's HTTP proxy on host:port, deploy and wait until ready; the URL."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=config.address)
    srv = config.server
    serve.start(http_options={"host": srv.host, "port": srv.port})
    # mlora's own INFO lines (adapter registrations, errors) reach the terminal; per-request access lines do not
    app = build_app(config, cluster_gpus=float(ray.cluster_resources().get("GPU", 0)))
    serve.run(app, name=config.app_name, route_prefix="/", blocking=False,
              logging_config={"enable_access_log": False})
    shown = f"[{srv.host}]" if ":" in srv.host else srv.host
    return f"http://{shown}:{srv.port}"


def stop(config: RayConfig, *, started_ray: bool) -> None:
    """Delete the application; shut Serve and Ray down too when this process started them."""
    import ray
    from ray import serve

    try:
        serve.delete(config.app_name)
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()


ReadyCallback = Callable[[str, str, list[str]], None]  # (url, base model name, adapter names)


def serve_ray(config: RayConfig, on_ready: ReadyCallback | None = None) -> None:
    """Blocking entry point of `mlora serve --ray`: deploy, run until SIGINT/SIGTERM, tear down."""
    import ray

    started_ray = not ray.is_initialized() and config.address is None
    try:
        url = start(config)
    except Exception as exc:
        if started_ray and ray.is_initialized():
            ray.shutdown()
        if isinstance(exc, MloraError):
            raise
        raise ConfigError(f"cannot deploy on Ray Serve: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    stopped = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopped.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if on_ready is not None:
            on_ready(url, config.server.engine.model or _demo_name(), list(adapter_catalog(config.server)))
        while not stopped.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop(config, started_ray=started_ray)


def _demo_name() -> str:
    from engine.demo import DEMO_MODEL_NAME

    return DEMO_MODEL_NAME
