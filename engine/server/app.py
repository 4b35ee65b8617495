"""The aiohttp application: OpenAI/vLLM routes over one AsyncLLM.

Handlers validate, enqueue and await; they never compute (the engine's own task owns the
step loop and runs it off the event loop; chat rendering, tokenization and large JSON bodies run
in engine.server.prompting's worker pool, each bounded before it starts). The generation routes build a transport-neutral
`Reply` (`completion_reply`, `chat_reply`) that aiohttp sends here and the Ray Serve replicas
of `mlora serve --ray` send through their ingress, so both speak the same bytes. Every error
is one OpenAI-shaped JSON object with the right status, never a traceback:

    AdapterNotFoundError / unknown model -> 404     PromptTooLongError, bad JSON/params -> 400
    QueueFullError -> 429 + Retry-After             EngineStoppedError, draining -> 503 + Retry-After
    body over max_body_bytes -> 413                 body slower than body_timeout -> 408 (connection closed)

Every response body and SSE event is strict JSON (`protocol.dumps`: a NaN never reaches a client).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from engine.config import positive_number
from engine.errors import (AdapterError, AdapterNotFoundError, ConfigError, EngineStoppedError, MloraError,
                           PromptTooLongError, QueueFullError)
from engine.server import protocol
from engine.server.config import ServerConfig
from engine.server.generation import Choices, open_choices
from engine.server.metrics import CONTENT_TYPE, ServerMetrics
from engine.server.prompting import check_prompt_chars, max_prompt_chars, render_chat, run_text_work
from engine.server.security import OPEN_PATHS, check_api_key, confine_adapter_path

log = logging.getLogger("mlora.server")


@dataclass
class ServerState:
    """Mutable per-app state: metrics, in-flight count (for graceful drain), adapter paths."""

    metrics: ServerMetrics
    created: int = field(default_factory=protocol.now_s)
    inflight: int = 0
    draining: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    adapter_paths: dict[str, str] = field(default_factory=dict)
    resolving: dict[str, asyncio.Task[Any]] = field(default_factory=dict)  # on-demand loads under way, by name

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass
class Serving:
    """What the route logic needs, without an HTTP server: the engine, the server config and the mutable
    state. The aiohttp app holds one (SERVING); a Ray Serve replica builds its own (`new_serving`)."""

    engine: Any
    config: ServerConfig
    state: ServerState


def new_serving(engine: Any, config: ServerConfig) -> Serving:
    """A fresh Serving for `engine`: metrics labelled with its model, the adapters given at start."""
    ecfg = config.engine
    state = ServerState(metrics=ServerMetrics(engine.model_name, max_loras=ecfg.max_loras, lora_enabled=ecfg.enable_lora))
    state.adapter_paths.update(dict(ecfg.loras))
    return Serving(engine, config, state)


SERVING = web.AppKey("serving", Serving)
ENGINE = web.AppKey("engine", object)
REQUEST_ID = web.RequestKey("request_id", str)  # the client's X-Request-Id, if it sent a usable one
_MAX_REQUEST_ID = 256
CONFIG = web.AppKey("config", ServerConfig)
STATE = web.AppKey("state", ServerState)


def api_error_for(exc: BaseException, retry_after: int = 1) -> protocol.APIError:
    """Map an engine error to its HTTP error."""
    if isinstance(exc, protocol.APIError):
        return exc
    retry = {"Retry-After": str(retry_after)}
    if isinstance(exc, AdapterNotFoundError):
        return protocol.APIError(404, exc.message, param="model")
    if isinstance(exc, QueueFullError):
        return protocol.APIError(429, exc.message, headers=retry)
    if isinstance(exc, EngineStoppedError):
        return protocol.APIError(503, exc.message, headers=retry)
    if isinstance(exc, (ConfigError, PromptTooLongError)):  # param: the request field at fault, where known
        return protocol.APIError(400, exc.message, param=exc.param)
    if isinstance(exc, (AdapterError, MloraError)):
        return protocol.APIError(400, exc.message)
    return protocol.APIError(500, "internal server error (see the server log)")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=protocol.dumps)


def json_error(err: protocol.APIError) -> web.Response:
    resp = json_response(protocol.error_body(err), status=err.status, headers=err.headers)
    if err.status == 408:  # the rest of a slow body is not worth waiting for
        resp.force_close()
    return resp


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Outermost: every failure becomes one JSON error; tracebacks go to the log only."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(protocol.APIError(exc.status, exc.reason or "error"))
    except (protocol.APIError, MloraError) as exc:
        return json_error(api_error_for(exc, request.app[CONFIG].retry_after_s))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s (X-Request-Id %s)", request.method, request.path,
                      request.get(REQUEST_ID, "-"))
        return json_error(protocol.APIError(500, "internal server error (see the server log)"))


def client_request_id(header: str | None) -> str | None:
    """A client's X-Request-Id if usable (printable, at most 256 characters), else None."""
    given = (header or "").strip()
    return given if given and len(given) <= _MAX_REQUEST_ID and given.isprintable() else None


@web.middleware
async def request_id_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """vLLM's X-Request-Id: a client's header names the request (response `id`, logs) and is echoed back.

    The echo is added in `on_response_prepare`, so streams and errors carry it too."""
    given = client_request_id(request.headers.get("X-Request-Id"))
    if given is not None:
        request[REQUEST_ID] = given
    return await handler(request)


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-Id"] = rid


def _request_ids(given: str | None, prefix: str, body: dict[str, Any]) -> tuple[str, str]:
    """(response id, engine request id). With X-Request-Id, or else the body's `request_id` (vLLM's field),
    the response id is `prefix-<id>` as in vLLM; the engine id gets a short suffix so two clients reusing one
    id never collide. A `request_id` that could not name a response (not a printable string of at most 256
    characters) is a 400, not ignored."""
    if given is None and body.get("request_id") is not None:
        given = client_request_id(body["request_id"]) if isinstance(body["request_id"], str) else None
        if given is None:
            raise protocol.bad(f"'request_id' must be a printable string of 1-{_MAX_REQUEST_ID} characters",
                               "request_id")
    if given is None:
        rid = protocol.new_id(prefix)
        return rid, rid
    rid = f"{prefix}-{given}"
    return rid, f"{rid}-{protocol.new_id('r')[2:10]}"


@web.middleware
async def guard_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """API key (all but OPEN_PATHS: /health, /ping, /version, /metrics) and 503 while draining."""
    config, state = request.app[CONFIG], request.app[STATE]
    if request.path in OPEN_PATHS:
        return await handler(request)
    check_api_key(request.path, request.headers.get("Authorization"), config.api_key)
    if state.draining:
        raise _draining(config)
    return await handler(request)


def _draining(config: ServerConfig) -> protocol.APIError:
    return protocol.APIError(503, "the server is shutting down", headers={"Retry-After": str(config.retry_after_s)})


@asynccontextmanager
async def _inflight(request: web.Request) -> AsyncIterator[None]:
    """The in-flight count the drain waits on. Entered once the body has arrived, so a client that
    never finishes sending one does not hold up shutdown."""
    config, state = request.app[CONFIG], request.app[STATE]
    if state.draining:
        raise _draining(config)
    state.inflight += 1
    state.idle.clear()
    try:
        yield
    finally:
        state.inflight -= 1
        if state.inflight == 0:
            state.idle.set()


_BIG_BODY = 256 * 1024  # bytes: JSON bodies above this are parsed in the worker pool


async def _body(request: web.Request) -> Any:
    """The JSON body, read within body_timeout (408) and max_body_bytes (413, aiohttp's client_max_size)."""
    config = request.app[CONFIG]
    try:
        async with asyncio.timeout(config.body_timeout):
            raw = await request.read()
    except TimeoutError:
        raise protocol.APIError(408, f"the request body did not arrive within {config.body_timeout:g}s") from None
    if len(raw) > _BIG_BODY:
        return await run_text_work(protocol.parse_json, raw)
    return protocol.parse_json(raw)


def _resolve(engine: Any, model: str | None) -> tuple[str, str | None]:
    """(served name, adapter) for a request's `model` field; None/base name = the base model."""
    if model is None or model == engine.model_name:
        return engine.model_name, None
    if engine.knows(model):  # an adapter or a composition alias
        return model, model
    raise protocol.APIError(404, f"The model '{model[:200]}' does not exist. GET /v1/models lists the base model and its adapters.",
                     err_type="not_found_error", param="model")


def resolvable_name(name: str) -> bool:
    """A name the filesystem resolver may look up as `--lora-dir/NAME`: one path component, no dot start."""
    return protocol.valid_adapter_name(name) and "/" not in name and ":" not in name and not name.startswith(".")


async def _resolve_or_fetch(srv: Serving, model: str | None) -> tuple[str, str | None]:
    """`_resolve`, plus vLLM's filesystem LoRA resolver: with --allow-runtime-lora and --lora-dir, an
    unregistered adapter NAME that exists as DIR/NAME is validated, registered (once, however many
    requests ask for it at the same time) and served. Anything else stays the 404 of `_resolve`."""
    engine, config, state = srv.engine, srv.config, srv.state
    try:
        return _resolve(engine, model)
    except protocol.APIError:
        if not (config.allow_runtime_lora and config.lora_dir and isinstance(model, str) and resolvable_name(model)):
            raise
        path = os.path.join(config.lora_dir, model)
        if not await asyncio.to_thread(os.path.isfile, os.path.join(path, "adapter_config.json")):
            raise
    task = state.resolving.get(model)
    if task is None:
        task = asyncio.create_task(_load_lora(engine, config, state, {"lora_name": model, "lora_path": path}))

        def done(t: asyncio.Task[Any], name: str = model) -> None:
            state.resolving.pop(name, None)
            if not t.cancelled() and t.exception() is not None:  # retrieved even if every waiter went away
                log.warning("could not load adapter %r from --lora-dir: %s", name, t.exception())

        task.add_done_callback(done)
        state.resolving[model] = task
    try:
        await asyncio.shield(task)  # a client that goes away does not cancel the load the others wait on
    except protocol.APIError as exc:
        raise protocol.APIError(exc.status, f"adapter '{model}' from --lora-dir could not be loaded: {exc.message}",
                         param="model") from None
    return _resolve(engine, model)


def _start_checks(config: ServerConfig, prompts: int, n: int) -> None:
    """400 for a request that would queue more than max_seqs_per_request sequences (prompts x n)."""
    if prompts * n > config.max_seqs_per_request:
        raise protocol.bad(f"this request asks for {prompts} prompt(s) x n={n} = {prompts * n} sequences; "
                    f"the server allows at most {config.max_seqs_per_request} per request (--max-seqs-per-request)",
                    "n" if n > 1 else "prompt")


async def _start(srv: Serving, prompts: list[str | list[int]], params: Any, n: int, rid: str,
                 model: str | None, *, priority: int = 0, tenant: str | None = None,
                 adapters: Any = None) -> tuple[str, Choices]:
    engine, state, config = srv.engine, srv.state, srv.config
    name, adapter = await _resolve_or_fetch(srv, model)
    _start_checks(config, len(prompts), n)
    log.debug("request %s: model %s, %d sequence(s)", rid, name, len(prompts) * n)
    try:
        choices = await open_choices(engine, prompts, params, n=n, request_id=rid, adapter=adapter,
                                     metrics=state.metrics, label=name, priority=priority, tenant=tenant,
                                     adapters=adapters)
    except MloraError as exc:
        err = api_error_for(exc, config.retry_after_s)
        state.metrics.count_error(name, err.status)
        raise err from None
    for ch in choices.items:  # aborted before its first token: an error status, headers not sent yet
        if ch.pending is not None and ch.pending.finish_reason == "abort":
            await choices.close()
            _check_abort(ch.pending, engine)
    return name, choices


def _check_context(srv: Serving, model: str | None, prompt_lens: list[int], max_tokens: int) -> None:
    """vLLM's 400 when prompt + max_tokens exceed the context, counted like the engine's errors.

    A prompt that alone fills the context is left to the engine (its own message)."""
    engine = srv.engine
    try:
        for n in prompt_lens:
            if n < engine.max_model_len:
                protocol.check_max_tokens(n, max_tokens, engine.max_model_len)
    except protocol.APIError as err:
        srv.state.metrics.count_error(_resolve(engine, model)[0], err.status)
        raise


@dataclass
class Reply:
    """A generation route's outcome before any byte is sent, independent of the HTTP server.

    Either `body` (one JSON response, status 200) or `events`: the SSE byte strings of a stream,
    in order, ending with `data: [DONE]`. A late error (headers already sent) becomes one
    `data: {"error":...}` event before [DONE], as vLLM does. Closing `events` early (the client
    went away) aborts the engine requests. The aiohttp handlers and the Ray Serve replicas
    (engine.server.ray_replica) both send Replies, so their bodies are the same by construction.
    """

    body: dict[str, Any] | None = None
    events: AsyncIterator[bytes] | None = None
    choices: Choices | None = None

    async def aclose(self) -> None:
        """Abort whatever is unfinished; safe twice, and also before the first event was read."""
        if self.events is not None:
            await self.events.aclose()  # type: ignore[attr-defined]
        if self.choices is not None:
            await self.choices.close()


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def _events(srv: Serving, choices: Choices, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`chunks` then `data: [DONE]`, reporting a late error in-band; always closes the engine requests."""
    try:
        try:
            async for data in chunks:
                yield data
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
            err = api_error_for(exc, srv.config.retry_after_s)
            if err.status >= 500 and not isinstance(exc, (protocol.APIError, MloraError)):
                log.exception("error while streaming")
            yield protocol.sse(protocol.error_body(err))
        yield protocol.sse("[DONE]")
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        await choices.close()


async def _send(request: web.Request, reply: Reply) -> web.StreamResponse:
    """Send a Reply over aiohttp. A client that went away just ends the handler (events closed)."""
    if reply.events is None:
        return json_response(reply.body)
    resp = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await resp.prepare(request)
        async for data in reply.events:
            await resp.write(data)
        await resp.write_eof()
    except ConnectionResetError:
        pass
    finally:
        await reply.aclose()
    return resp


def _tail(lps: list[Any] | None, n: int) -> list[Any]:
    """The logprobs of the last n tokens (outputs may carry them cumulatively or per delta)."""
    return list(lps[-n:]) if lps and n else []


def _aborted() -> protocol.APIError:
    return protocol.APIError(503, "the request was aborted (the server is shutting down)", headers={"Retry-After": "1"})


def _check_abort(o: Any, engine: Any) -> None:
    """An output the engine ended becomes its error. `error` set: the engine ended this request
    alone; with `error_param`, because of the request's own parameters (its sampling constraints left
    no token) -> 400 naming that field; else a fault of the engine (non-finite logits, a failed step)
    -> 500 with the reason. Aborted with a reason in stop_reason: its adapter was unloaded or changed
    on disk -> 404 naming it; could not be loaded -> 503 with the reason. Aborted without a reason:
    the server is shutting down. (Streamed, after the headers: the same error as the stream's error event.)"""
    if getattr(o, "error", None):
        if getattr(o, "error_param", None):
            raise protocol.APIError(400, o.error, param=o.error_param)
        raise protocol.APIError(500, f"the request failed: {o.error}")
    if o.finish_reason != "abort":
        return
    if not (isinstance(o.stop_reason, str) and o.stop_reason):
        raise _aborted()
    if o.adapter is not None:
        mine = o.stop_reason.startswith(f"adapter {o.adapter!r}")
        if mine and ("was unloaded" in o.stop_reason or "changed on disk" in o.stop_reason):
            raise protocol.APIError(404, o.stop_reason, err_type="not_found_error", param="model")  # gone, or broken until loaded again
        if o.adapter not in engine.list_adapters():
            raise protocol.APIError(404, f"the adapter '{o.adapter}' was unloaded before this request finished",
                             err_type="not_found_error", param="model")
    raise protocol.APIError(503, o.stop_reason, headers={"Retry-After": "1"})


def _usage_chunk(choices: Choices, n: int, kind: str, rid: str, created: int, name: str) -> bytes:
    """OpenAI's final `choices: []` chunk with the whole request's usage (stream_options.include_usage)."""
    outs = [ch.last for ch in choices.items if ch.last is not None]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs[::n])
    return protocol.sse(protocol.chunk(kind, rid, created, name, [], protocol.usage(prompt_tokens, sum(len(o.token_ids) for o in outs))))


def _parse_completion(engine: Any, body: Any) -> protocol.CompletionRequest:
    """The body's fields, then every token-id prompt by the engine's one owner of that decision
    (`InputProcessor.check_prompt_ids`: ids in the vocabulary, fits the context), all before any prompt is submitted: one bad prompt of a batch
    refuses the whole request (400, param "prompt") and starts nothing."""
    req = protocol.parse_completion(body)
    for p in req.prompts:
        if isinstance(p, list):
            engine.processor.check_prompt_ids(p)
    return req


async def completion_reply(srv: Serving, body: Any, request_id: str | None = None) -> Reply:
    """POST /v1/completions (vLLM/OpenAI legacy completions; prompt may be a batch) for a parsed JSON body."""
    engine, config = srv.engine, srv.config
    if isinstance(body, dict) and isinstance(body.get("prompt"), list):  # token ids: checking them scales
        req = await run_text_work(_parse_completion, engine, body)
    else:
        req = _parse_completion(engine, body)
    _start_checks(config, len(req.prompts), req.n)  # before any per-prompt work
    limit = max_prompt_chars(engine.tokenizer, engine.max_model_len)
    for p in req.prompts:
        if isinstance(p, str):
            check_prompt_chars(p, limit)  # longer than any tokenization of it could fit: refused untokenized
    texts = [p for p in req.prompts if isinstance(p, str)]  # counted off the event loop, as the engine tokenizes
    counts = iter(await run_text_work(lambda: [len(engine.tokenizer(p).input_ids) for p in texts]) if texts else [])
    _check_context(srv, req.model, [len(p) if isinstance(p, list) else next(counts) for p in req.prompts],
                   req.params.max_tokens)
    (rid, engine_rid), created = _request_ids(request_id, "cmpl", body), protocol.now_s()
    name, choices = await _start(srv, req.prompts, req.params, req.n, engine_rid, req.model, priority=req.priority,
                                 tenant=req.tenant, adapters=req.adapters)
    tok, want_lp = engine.tokenizer, req.params.logprobs is not None

    def echo_text(prompt: str | list[int]) -> str:
        return (prompt if isinstance(prompt, str) else tok.decode(prompt)) if req.echo else ""

    # usage only when asked: in OpenAI's one final `choices: []` chunk (include_usage), and also
    # on every chunk with vLLM's continuous_usage_stats; a choice's last chunk carries none of its own
    every_chunk = req.stream_options.include_usage and req.stream_options.continuous_usage_stats

    def echoed(o: Any) -> tuple[list[int], Any] | None:  # the prompt part of the logprobs (echo)
        return (o.prompt_token_ids, o.prompt_logprobs) if req.echo and o.prompt_logprobs is not None else None

    async def chunks() -> AsyncIterator[bytes]:
        offsets: dict[int, int] = {}
        lp_next: dict[int, int] = {}
        async for ch, o in choices.merged():
            _check_abort(o, engine)
            first = ch.index not in offsets
            text = "" if req.echo_only else o.delta_text
            new = [] if req.echo_only else _tail(o.logprobs, len(o.delta_token_ids))
            if first:
                text = echo_text(ch.prompt) + text
            elif not text and not o.finished and not new:
                continue
            offsets[ch.index] = offsets.get(ch.index, 0) + len(text)
            lp = None
            if want_lp:  # text_offset runs on over the tokens' strings, as in the non-streamed body
                lp = protocol.completion_logprobs(tok, new, lp_next.get(ch.index, 0), echoed(o) if first else None)
                if lp["tokens"]:
                    lp_next[ch.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            use = protocol.usage(len(o.prompt_token_ids), len(o.token_ids)) if every_chunk else None
            yield protocol.sse(protocol.chunk("text_completion", rid, created, name,
                                [protocol.completion_choice(ch.index, text, o, lp)], use))
        if req.stream_options.include_usage:
            yield _usage_chunk(choices, req.n, "text_completion", rid, created, name)

    if req.stream:
        return Reply(events=_events(srv, choices, chunks()), choices=choices)
    try:
        outs = await choices.collect()
        for o in outs:
            _check_abort(o, engine)
        want_plp = body.get("prompt_logprobs") is not None
        body_choices = [protocol.completion_choice(ch.index, echo_text(ch.prompt) + ("" if req.echo_only else o.text), o,
                                            protocol.completion_logprobs(tok, [] if req.echo_only else o.logprobs or [], 0,
                                                                  echoed(o)) if want_lp else None,
                                            protocol.prompt_logprobs_json(tok, o.prompt_logprobs) if want_plp else None)
                        for ch, o in zip(choices.items, outs)]
        generated = 0 if req.echo_only else sum(len(o.token_ids) for o in outs)
        use = protocol.usage(sum(len(o.prompt_token_ids) for o in outs[::req.n]), generated)
        return Reply(body=protocol.response("text_completion", rid, created, name, body_choices, use))
    finally:
        await choices.close()


async def chat_reply(srv: Serving, body: Any, request_id: str | None = None) -> Reply:
    """POST /v1/chat/completions (prompt from the tokenizer's chat template, or the plain fallback)."""
    engine, config = srv.engine, srv.config
    req = protocol.parse_chat(body)
    if req.chat_template is not None and not config.trust_request_chat_template:
        raise protocol.bad("this server does not accept a chat template from the request "
                    "(the operator can allow it with --trust-request-chat-template)", "chat_template")
    _start_checks(config, 1, req.n)
    tok, limit = engine.tokenizer, max_prompt_chars(engine.tokenizer, engine.max_model_len)
    prompt = await run_text_work(render_chat, tok, req, limit)
    n_prompt = len(prompt) if isinstance(prompt, list) else len(await run_text_work(tok.encode, prompt))
    if not req.max_tokens_given:  # OpenAI's default: as many as the context leaves
        req.params.max_tokens = max(1, engine.max_model_len - n_prompt)
    else:
        _check_context(srv, req.model, [n_prompt], req.params.max_tokens)
    (rid, engine_rid), created = _request_ids(request_id, "chatcmpl", body), protocol.now_s()
    name, choices = await _start(srv, [prompt], req.params, req.n, engine_rid, req.model, priority=req.priority,
                                 tenant=req.tenant, adapters=req.adapters)
    tok, top_n, want_lp = engine.tokenizer, req.params.logprobs or 0, req.params.logprobs is not None
    kind = "chat.completion.chunk"

    every_chunk = req.stream_options.include_usage and req.stream_options.continuous_usage_stats

    async def chunks() -> AsyncIterator[bytes]:
        for ch in choices.items:  # OpenAI/vLLM open each choice with the role
            first = {"index": ch.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            yield protocol.sse(protocol.chunk(kind, rid, created, name, [first]))
        async for ch, o in choices.merged():
            _check_abort(o, engine)
            if not o.delta_text and not o.finished:
                continue
            lp = protocol.chat_logprobs(tok, _tail(o.logprobs, len(o.delta_token_ids)), top_n) if want_lp else None
            use = protocol.usage(len(o.prompt_token_ids), len(o.token_ids)) if every_chunk else None
            c = {"index": ch.index, "delta": {"content": o.delta_text} if o.delta_text else {}, "logprobs": lp,
                 "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
            yield protocol.sse(protocol.chunk(kind, rid, created, name, [c], use))
        if req.stream_options.include_usage:
            yield _usage_chunk(choices, req.n, kind, rid, created, name)

    if req.stream:
        return Reply(events=_events(srv, choices, chunks()), choices=choices)
    try:
        outs = await choices.collect()
        for o in outs:
            _check_abort(o, engine)
        body_choices = [protocol.chat_choice(ch.index, o, protocol.chat_logprobs(tok, o.logprobs or [], top_n) if want_lp else None)
                        for ch, o in zip(choices.items, outs)]
        use = protocol.usage(len(outs[0].prompt_token_ids), sum(len(o.token_ids) for o in outs))
        reply = protocol.response("chat.completion", rid, created, name, body_choices, use)
        if req.params.prompt_logprobs is not None:  # vLLM's extra top-level field
            reply["prompt_logprobs"] = protocol.prompt_logprobs_json(tok, outs[0].prompt_logprobs)
        return Reply(body=reply)
    finally:
        await choices.close()


async def _generation_body(request: web.Request) -> Any:
    return protocol.with_tenant_header(await _body(request), request.headers.get(protocol.TENANT_HEADER))


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _generation_body(request)
    async with _inflight(request):
        return await _send(request, await completion_reply(request.app[SERVING], body, request.get(REQUEST_ID)))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _generation_body(request)
    async with _inflight(request):
        return await _send(request, await chat_reply(request.app[SERVING], body, request.get(REQUEST_ID)))


async def models(request: web.Request) -> web.Response:
    engine, state, config = request.app[ENGINE], request.app[STATE], request.app[CONFIG]
    base = engine.model_name
    cards = [protocol.model_card(base, root=config.engine.model or base, parent=None, created=state.created,
                          max_model_len=engine.max_model_len)]
    for name in engine.list_adapters():
        cards.append(protocol.model_card(name, root=state.adapter_paths.get(name, name), parent=base, created=state.created,
                                  max_model_len=engine.max_model_len))
    for name, comp in getattr(engine, "compositions", {}).items():  # --lora-compose aliases: root = their recipe
        cards.append(protocol.model_card(name, root=",".join(f"{a}:{w:g}" for a, w in comp), parent=base, created=state.created,
                                  max_model_len=engine.max_model_len))
    return json_response({"object": "list", "data": cards})


async def model_by_id(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one model object, as OpenAI's retrieve-model; 404 for an unknown id."""
    engine, state, config = request.app[ENGINE], request.app[STATE], request.app[CONFIG]
    model_id = request.match_info["model_id"]
    name, adapter = _resolve(engine, model_id)
    if adapter is None:
        card = protocol.model_card(name, root=config.engine.model or name, parent=None, created=state.created,
                            max_model_len=engine.max_model_len)
    else:
        card = protocol.model_card(name, root=state.adapter_paths.get(name, name), parent=engine.model_name,
                            created=state.created, max_model_len=engine.max_model_len)
    return json_response(card)


def _model_field(body: Any) -> str | None:
    """The optional `model` of a utility request body (/tokenize, /detokenize)."""
    if not isinstance(body, dict):
        raise protocol.bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise protocol.bad("'model' must be a string", "model")
    return model


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


async def tokenize_reply(srv: Serving, body: Any) -> Reply:
    """POST /tokenize (vLLM): `{"model", "prompt"}` or `{"model", "messages", "add_generation_prompt"}`
    -> `{"count", "max_model_len", "tokens"}` (+ `token_strs` with `return_token_strs`). The chat form
    renders exactly as /v1/chat/completions does. Rendering and tokenizing run in the worker pool,
    bounded like a generation request's prompt."""
    engine, config = srv.engine, srv.config
    await _resolve_or_fetch(srv, _model_field(body))
    tok, limit = engine.tokenizer, max_prompt_chars(engine.tokenizer, engine.max_model_len)
    if "messages" in body:
        chat = {k: v for k, v in body.items() if k in ("model", "messages", "add_generation_prompt",
                                                      "continue_final_message", "chat_template",
                                                      "chat_template_kwargs")}
        req = protocol.parse_chat(chat)
        if req.chat_template is not None and not config.trust_request_chat_template:
            raise protocol.bad("this server does not accept a chat template from the request "
                        "(the operator can allow it with --trust-request-chat-template)", "chat_template")
        prompt = await run_text_work(render_chat, tok, req, limit)
        if isinstance(prompt, str):  # no chat template: the joined text, tokenized as the engine will
            prompt = await run_text_work(_encode, tok, prompt, protocol._opt_bool(body, "add_special_tokens", True))
    else:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise protocol.bad("'prompt' must be a string (or send 'messages')", "prompt")
        check_prompt_chars(text, limit)
        prompt = await run_text_work(_encode, tok, text, protocol._opt_bool(body, "add_special_tokens", True))
    out: dict[str, Any] = {"count": len(prompt), "max_model_len": engine.max_model_len, "tokens": prompt}
    if protocol._opt_bool(body, "return_token_strs", False):
        out["token_strs"] = tok.convert_ids_to_tokens(prompt)
    return Reply(body=out)


async def detokenize_reply(srv: Serving, body: Any) -> Reply:
    """POST /detokenize (vLLM): `{"model", "tokens"}` -> `{"prompt"}`; ids outside the vocabulary are a 400."""
    engine = srv.engine
    await _resolve_or_fetch(srv, _model_field(body))
    tokens, vocab = body.get("tokens"), len(engine.tokenizer)
    if (not isinstance(tokens, list) or len(tokens) > engine.max_model_len
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens)):
        raise protocol.bad(f"'tokens' must be a list of at most {engine.max_model_len} token ids in 0..{vocab - 1}", "tokens")
    return Reply(body={"prompt": await run_text_work(engine.tokenizer.decode, tokens)})


async def tokenize(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    async with _inflight(request):
        return await _send(request, await tokenize_reply(request.app[SERVING], body))


async def detokenize(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    async with _inflight(request):
        return await _send(request, await detokenize_reply(request.app[SERVING], body))


async def version(request: web.Request) -> web.Response:
    from engine.version import __version__

    return json_response({"version": __version__})


def _validation_failures(path: str, config: ServerConfig) -> list[str]:
    """Reasons the validate library gives for refusing the adapter at `path` (empty = servable)."""
    from engine.adapters.validate import validation_failures

    return validation_failures(path, base=config.engine.model, max_lora_rank=config.engine.max_lora_rank)


def _lora_name(body: Any, engine: Any, *, new: bool) -> str:
    if not isinstance(body, dict):
        raise protocol.bad("the request body must be a JSON object")
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise protocol.bad("'lora_name' must be a non-empty string", "lora_name")
    if new and not protocol.valid_adapter_name(name):
        raise protocol.bad(f"'lora_name' must be {protocol.ADAPTER_NAME_RULE}", "lora_name")
    if name == engine.model_name:
        raise protocol.bad(f"'lora_name' {name!r} is the base model's name", "lora_name")
    return name


async def load_lora_adapter(request: web.Request) -> web.Response:
    engine, config, state = request.app[ENGINE], request.app[CONFIG], request.app[STATE]
    if not config.allow_runtime_lora:
        raise protocol.APIError(403, "runtime adapter loading is disabled; start the server with --allow-runtime-lora")
    body = await _body(request)
    async with _inflight(request):
        return await _load_lora(engine, config, state, body)


async def _load_lora(engine: Any, config: ServerConfig, state: ServerState, body: Any) -> web.Response:
    name = _lora_name(body, engine, new=True)
    if "compose" in body:  # a composition alias at runtime, as --lora-compose at start
        return await _load_composition(engine, name, body)
    path = body.get("lora_path")
    if not isinstance(path, str) or not path.strip():
        raise protocol.bad("'lora_path' must be a non-empty string", "lora_path")
    weight = body.get("weight")
    if weight is not None:
        try:
            weight = positive_number(weight, "'weight' (the adapter's fair-share weight)")
        except ConfigError as exc:
            raise protocol.bad(exc.message, "weight") from None
    path = await asyncio.to_thread(confine_adapter_path, path, config.adapter_root)  # walks the directory
    if os.path.exists(path):
        failures = await asyncio.to_thread(_validation_failures, path, config)
        if failures:
            raise protocol.bad(f"adapter '{name}' failed validation: " + "; ".join(failures), "lora_path")
    try:
        # confinement re-checked on the files read
        await engine.add_adapter(name, path, root=config.adapter_root, weight=weight)
    except AdapterNotFoundError as exc:  # a path or hub id that is not there is the caller's mistake
        raise protocol.bad(exc.message, "lora_path") from None
    state.adapter_paths[name] = path
    log.info("loaded LoRA adapter %r from %s", name, path)
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def _load_composition(engine: Any, name: str, body: dict[str, Any]) -> web.Response:
    """`{"lora_name": "mix", "compose": "style:0.7,domain:0.5"}` (or `[{"name", "weight"}, ...]`):
    `mix` then names that composition, like any adapter; components must be loaded already."""
    if body.get("lora_path") is not None:
        raise protocol.bad("give either 'lora_path' (an adapter) or 'compose' (a composition alias), not both", "compose")
    spec = body["compose"]
    if not isinstance(spec, (str, list)) or not spec:
        raise protocol.bad("'compose' must be \"a:0.7,b:0.5\" or a non-empty list of {\"name\", \"weight\"}", "compose")
    try:
        await engine.add_composition(name, spec)
    except AdapterNotFoundError as exc:
        raise protocol.APIError(404, exc.message, err_type="not_found_error", param="compose") from None
    except ConfigError as exc:
        raise protocol.bad(exc.message, "compose") from None
    log.info("registered composition %r = %s", name, engine.compositions[name])
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    engine, config, state = request.app[ENGINE], request.app[CONFIG], request.app[STATE]
    if not config.allow_runtime_lora:
        raise protocol.APIError(403, "runtime adapter unloading is disabled; start the server with --allow-runtime-lora")
    body = await _body(request)
    async with _inflight(request):
        name = _lora_name(body, engine, new=False)
        return await _unload_lora(engine, state, name)


async def _unload_lora(engine: Any, state: ServerState, name: str) -> web.Response:
    if name in getattr(engine, "compositions", {}):  # a composition alias: its adapters stay loaded
        await engine.remove_composition(name)
        log.info("removed composition %r", name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")
    if name not in engine.list_adapters():
        raise protocol.APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
    await engine.remove_adapter(name)
    state.adapter_paths.pop(name, None)
    state.metrics.forget_adapter(name)  # no stale series per unloaded adapter
    log.info("unloaded LoRA adapter %r", name)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def health(request: web.Request) -> web.Response:
    dead = getattr(request.app[ENGINE], "error", None)  # the engine loop died: restart this process
    if dead:
        return web.Response(status=503, text=f"engine dead: {dead}")
    if request.app[STATE].draining:
        return web.Response(status=503, text="draining")
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    engine, state = request.app[ENGINE], request.app[STATE]
    try:
        state.metrics.refresh(engine.stats())
    except Exception:  # noqa: BLE001 - a scrape must not fail because stats did
        log.exception("engine.stats() failed during a /metrics scrape")
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def create_app(engine: Any, config: ServerConfig) -> web.Application:
    """The application for one started (or about to start) AsyncLLM. Routes are vLLM's."""
    app = web.Application(middlewares=[error_middleware, request_id_middleware, guard_middleware],
                          client_max_size=config.max_body_bytes)
    app.on_response_prepare.append(_echo_request_id)
    serving = new_serving(engine, config)
    app[SERVING] = serving
    app[ENGINE] = engine
    app[CONFIG] = config
    app[STATE] = serving.state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id:.+}", model_by_id)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/version", version)
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)  # vLLM's (SageMaker's) liveness route: same answer as /health
    app.router.add_post("/ping", health)
    app.router.add_get("/metrics", metrics)
    return app
