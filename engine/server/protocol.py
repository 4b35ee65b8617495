"""OpenAI / vLLM wire format: request parsing and validation, response and SSE chunk builders.

Pure Python (no aiohttp, no torch): every function takes plain JSON values and returns plain
JSON values, so the shapes are testable without a server. Shapes follow vLLM's OpenAI server:
`cmpl-...` / `chatcmpl-...` ids, `created` in seconds, `usage` on every non-streamed response;
when streaming, the chunk that carries a choice's `finish_reason` also carries that choice's
`usage`, and `stream_options.include_usage` adds OpenAI's final `choices: []` usage chunk.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.config import ADAPTER_NAME_RULE, valid_adapter_name  # noqa: F401 - the wire format names them
from engine.errors import ConfigError
from engine.numbers import finite_number
from engine.outputs import Logprob, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

MAX_N = 16
GREEDY_EPS = 1e-5
# Client-controlled sizes the engine pays for on every step: bounded so one request cannot slow the others.
MAX_STOP = 32  # stop strings per request (each is searched after every token)
MAX_STOP_CHARS = 256  # characters per stop string (the longest one is held back while streaming)
MAX_STOP_TOKEN_IDS = 256
MAX_INT = 2**31 - 1  # max_tokens, top_k: anything larger is a mistake, not a wish (and no bignums reach torch)
LOGPROB_FLOOR = -9999.0  # vLLM's floor for -inf logprobs (JSON has no infinities)
_ROLES = ("system", "user", "assistant", "tool", "developer")


class APIError(Exception):
    """An error that becomes one OpenAI-shaped JSON response with `status`."""

    def __init__(self, status: int, message: str, *, err_type: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or _DEFAULT_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.headers = headers or {}


_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(err: APIError) -> dict[str, Any]:
    """{"error": {"message", "type", "param", "code"}} as OpenAI and vLLM send it (code = HTTP status)."""
    return {"error": {"message": err.message, "type": err.err_type, "param": err.param, "code": err.status}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


# ----------------------------------------------------------------------------------------------
# field validation helpers


def _opt(body: dict[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise bad(f"'{key}' must be {what}, got {json.dumps(value)}", key)
    if not isinstance(value, kinds):
        raise bad(f"'{key}' must be {what}, got {_brief(value)}", key)
    return value


def _brief(value: Any) -> str:
    """A client's value for an error message, without serializing (or echoing) a large one."""
    if isinstance(value, (dict, list)):
        return f"an {'object' if isinstance(value, dict) else 'array'} of {len(value)} item(s)"
    if isinstance(value, int):
        return _short(value)
    return json.dumps(value[:80] if isinstance(value, str) else value)


def _opt_int(body: dict[str, Any], key: str, lo: int | None = None, hi: int | None = None) -> int | None:
    value = _opt(body, key, (int,), "an integer")
    if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(f"'{key}' must be {rng}, got {_short(value)}", key)
    return value


def _short(value: int) -> str:
    """An integer for an error message: a 400-digit one is not echoed back (str() of it is quadratic)."""
    return str(value) if abs(value) < 10**30 else ("-" if value < 0 else "") + "a number with more than 30 digits"


def _opt_num(body: dict[str, Any], key: str) -> float | None:
    """A finite float: huge integers (OverflowError), 1e999 (inf) and NaN are refused with 400."""
    value = _opt(body, key, (int, float), "a number")
    if value is None:
        return None
    if not finite_number(value):
        raise bad(f"'{key}' must be a finite number", key)
    return float(value)


def _opt_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = _opt(body, key, (bool,), "true or false")
    return default if value is None else value


# vLLM request fields that mlora does not implement: accepted only absent, null or at vLLM's default (the
# value that means "off"), refused otherwise rather than silently ignored (as vllm_compat does for LLM options).
_OFF_ONLY: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),  # beam search only
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structural_tag": (),
    "guided_decoding_backend": (), "guided_whitespace_pattern": (), "structured_outputs": (),
    "logits_processors": ([],),
    "return_tokens_as_token_ids": (False,),
    "cache_salt": (),  # a client that asks for a salted prefix cache must not silently share one
    "kv_transfer_params": (),
    "vllm_xargs": ({},),
}
_OFF_ONLY_COMPLETION: dict[str, tuple[Any, ...]] = {"add_special_tokens": (True,), "prompt_embeds": ()}
_OFF_ONLY_CHAT: dict[str, tuple[Any, ...]] = {"add_special_tokens": (False,), "echo": (False,), "documents": (),
                                              "tool_choice": ("none",)}


def _reject_off_only(body: dict[str, Any], fields: dict[str, tuple[Any, ...]]) -> None:
    for key, off in fields.items():
        value = body.get(key)
        if value is not None and not any(type(value) is type(v) and value == v for v in off):
            default = dumps(off[0]) if off else "null"
            raise bad(f"'{key}' is not supported by mlora (only vLLM's default, {default}, is accepted)", key)


def _reject_unsupported(body: dict[str, Any], *, chat: bool = False) -> None:
    """Parameters we cannot honour are refused loudly rather than silently ignored."""
    _reject_off_only(body, _OFF_ONLY)
    _reject_off_only(body, _OFF_ONLY_CHAT if chat else _OFF_ONLY_COMPLETION)
    if body.get("suffix"):
        raise bad("'suffix' is not supported by mlora", "suffix")
    if body.get("tools"):
        raise bad("tool calling is not supported by mlora", "tools")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        raise bad("only response_format {\"type\": \"text\"} is supported", "response_format")


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise bad(f"'stop' may hold at most {MAX_STOP} strings, got {len(stop)}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad(f"each 'stop' string may be at most {MAX_STOP_CHARS} characters", "stop")
    return [s for s in stop if s]


def _stop_token_ids(body: dict[str, Any]) -> list[int]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return []
    if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT
                                          for t in ids)):
        raise bad("'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise bad(f"'stop_token_ids' may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}", "stop_token_ids")
    return list(ids)


@dataclass
class StreamOptions:
    include_usage: bool = False
    continuous_usage_stats: bool = False


def _stream(body: dict[str, Any]) -> tuple[bool, StreamOptions]:
    stream = _opt_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, StreamOptions()
    if not stream:
        raise bad("'stream_options' can only be given when 'stream' is true", "stream_options")
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return stream, StreamOptions(
        include_usage=_opt_bool(opts, "include_usage"),
        continuous_usage_stats=_opt_bool(opts, "continuous_usage_stats"),
    )


def _num_or(body: dict[str, Any], key: str, default: float) -> float:
    value = _opt_num(body, key)
    return default if value is None else value


def _str_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise bad(f"'{key}' must be a list of strings", key)


def _bad_words(body: dict[str, Any]) -> list[str]:
    """vLLM's bad_words, held to the limits of `stop` (each word is tokenized twice when the request is added)."""
    words = _str_list(body, "bad_words")
    if len(words) > MAX_STOP:
        raise bad(f"'bad_words' may hold at most {MAX_STOP} strings, got {len(words)}", "bad_words")
    if any(len(w) > MAX_STOP_CHARS for w in words):
        raise bad(f"each 'bad_words' string may be at most {MAX_STOP_CHARS} characters", "bad_words")
    return words


def _allowed_token_ids(body: dict[str, Any]) -> list[int] | None:
    """vLLM's allowed_token_ids: integers in [0, MAX_INT] here (no bignums), against the vocabulary in the engine."""
    ids = _opt(body, "allowed_token_ids", (list,), "a list of token ids")
    if ids is not None and not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT for t in ids):
        raise bad("'allowed_token_ids' must be a list of non-negative integers", "allowed_token_ids")
    return ids


def _logit_bias(body: dict[str, Any]) -> dict[int, float] | None:
    """OpenAI's {"token id": bias in [-100, 100]} (ids arrive as JSON object keys, i.e. strings)."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise bad("'logit_bias' must be an object mapping token ids to numbers in [-100, 100]", "logit_bias")
    return bias  # keys and values are checked by SamplingParams, ids against the vocabulary by the engine


def _sampling(body: dict[str, Any], *, max_tokens: int | None, logprobs: int | None,
              prompt_logprobs: int | None = None) -> SamplingParams:
    temperature = _opt_num(body, "temperature")
    if temperature is not None and 0.0 <= temperature < GREEDY_EPS:
        temperature = 0.0  # as vLLM: a vanishing temperature is greedy (dividing by it overflows)
    top_p = _opt_num(body, "top_p")
    top_k = _opt_int(body, "top_k", -1, MAX_INT)
    min_tokens = _opt_int(body, "min_tokens", 0, MAX_INT) or 0
    try:
        return SamplingParams(
            max_tokens=max(16, min_tokens) if max_tokens is None else max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=-1 if top_k in (None, 0) else top_k,
            seed=_opt_int(body, "seed", -(2**63), 2**63 - 1),
            stop=_stop(body),
            stop_token_ids=_stop_token_ids(body),
            ignore_eos=_opt_bool(body, "ignore_eos"),
            logprobs=logprobs,
            include_stop_str_in_output=_opt_bool(body, "include_stop_str_in_output"),
            min_p=_num_or(body, "min_p", 0.0),
            presence_penalty=_num_or(body, "presence_penalty", 0.0),
            frequency_penalty=_num_or(body, "frequency_penalty", 0.0),
            repetition_penalty=_num_or(body, "repetition_penalty", 1.0),
            min_tokens=min_tokens,
            logit_bias=_logit_bias(body),
            bad_words=_bad_words(body),
            allowed_token_ids=_allowed_token_ids(body),
            prompt_logprobs=_opt_int(body, "prompt_logprobs", 0, 20) if prompt_logprobs is None else prompt_logprobs,
        )
    except ConfigError as exc:
        raise bad(exc.message, exc.param) from None


def _model(body: dict[str, Any]) -> str | None:
    return _opt(body, "model", (str,), "a string")


TENANT_HEADER = "X-Tenant-Id"  # names the request's tenant when the body has no "tenant"


def with_tenant_header(body: Any, header: str | None) -> Any:
    """The generation body with the X-Tenant-Id header's value as its "tenant" when it names none
    (checked later like the field). For a gateway that knows the customer but not the body."""
    if header is not None and isinstance(body, dict) and "tenant" not in body:
        return {**body, "tenant": header}
    return body


def _priority(body: dict[str, Any]) -> int:
    """vLLM's `priority` (lower runs first under --scheduling-policy priority; default 0)."""
    return _opt_int(body, "priority", -MAX_INT - 1, MAX_INT) or 0


def _tenant(body: dict[str, Any]) -> str | None:
    """Whose fair share the request uses; None = its adapter's (or the base model's) own."""
    tenant = _opt(body, "tenant", (str,), "a string")
    if tenant is not None and not valid_adapter_name(tenant):
        raise bad(f"'tenant' must be {ADAPTER_NAME_RULE}", "tenant")
    return tenant


def _adapters(body: dict[str, Any]) -> Any:
    """mlora's `adapters`: [{"name": "style", "weight": 0.7}, ...] composes those adapters' deltas with
    weights (`model` stays the base name or names the first entry); its shape is checked here, the names
    and the per-request limit by the engine (404 / 400)."""
    value = body.get("adapters")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise bad("'adapters' must be a list of {\"name\": ..., \"weight\": ...} objects", "adapters")
    from engine.lora.compose import normalize

    try:
        return normalize(value, max_components=None)
    except ConfigError as exc:
        raise bad(exc.message, "adapters") from None


def _n(body: dict[str, Any]) -> int:
    n = _opt_int(body, "n", 1, MAX_N) or 1
    best_of = _opt_int(body, "best_of", 1, MAX_INT)
    if best_of is not None and best_of > n:
        raise bad("'best_of' > n is not supported by mlora", "best_of")
    return n


# ----------------------------------------------------------------------------------------------
# requests


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """The request body as JSON; APIError(400) for anything else (incl. NaN/Infinity, absurd nesting and
    strings that are not Unicode text, such as a lone surrogate "\\ud800", which no tokenizer can encode)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad(f"malformed JSON body: {str(exc)[:200]}") from None
    _check_text(body)
    return body


def _check_text(value: Any) -> None:
    """Raise 400 if any string (key or value) anywhere in `value` holds a lone surrogate (iterative: no recursion)."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            strings: list[Any] = [v]
        elif isinstance(v, dict):
            strings = list(v)
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
            continue
        else:
            continue
        for s in strings:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("the request holds a string that is not valid Unicode (a lone surrogate such as \\ud800)") from None


@dataclass
class CompletionRequest:
    """A parsed POST /v1/completions body. `prompts` holds one entry per prompt of a batch."""

    model: str | None
    prompts: list[str | list[int]]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions = field(default_factory=StreamOptions)
    echo: bool = False
    echo_only: bool = False  # echo with max_tokens 0 (vLLM): one token is computed, only the prompt is returned
    priority: int = 0
    tenant: str | None = None
    adapters: Any = None  # ((adapter, weight), ...) to compose (engine.lora.compose), or None


@dataclass
class ChatRequest:
    """A parsed POST /v1/chat/completions body (messages are rendered later, with the tokenizer)."""

    model: str | None
    messages: list[dict[str, str]]
    params: SamplingParams
    max_tokens_given: bool
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions = field(default_factory=StreamOptions)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # the client's own template (refused unless the operator trusts them)
    priority: int = 0
    tenant: str | None = None
    adapters: Any = None  # ((adapter, weight), ...) to compose (engine.lora.compose), or None


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_completion(body: Any) -> CompletionRequest:
    """Validate a /v1/completions body. Raises APIError(400) with the offending parameter.

    Token-id prompts are checked for shape here; whether their ids are in the model's vocabulary is the
    engine's decision (`InputProcessor.check_prompt_ids`), asked by the route before any prompt starts."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _reject_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_token_list(prompt):
        prompts: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_list(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("'prompt' must be a string, a list of token ids, or a non-empty list of those", "prompt")
    for p in prompts:
        if isinstance(p, str) and not p:
            raise bad("'prompt' must not be empty", "prompt")
    logprobs = _opt_int(body, "logprobs", 0, 20)
    stream, opts = _stream(body)
    echo = _opt_bool(body, "echo")
    max_tokens = _opt_int(body, "max_tokens", 0, MAX_INT)
    if max_tokens == 0 and not echo:
        raise bad("'max_tokens' must be >= 1 (0 only with 'echo': true, which returns the prompt alone)", "max_tokens")
    # as vLLM: echo with logprobs returns the prompt tokens' logprobs first
    prompt_logprobs = logprobs if echo and logprobs is not None and body.get("prompt_logprobs") is None else None
    if stream and body.get("prompt_logprobs") is not None:
        raise bad("'prompt_logprobs' is not available when 'stream' is true (as vLLM)", "prompt_logprobs")
    return CompletionRequest(
        model=_model(body),
        prompts=prompts,
        params=_sampling(body, max_tokens=1 if max_tokens == 0 else max_tokens, logprobs=logprobs,
                         prompt_logprobs=prompt_logprobs),
        n=_n(body),
        stream=stream,
        stream_options=opts,
        echo=echo,
        echo_only=max_tokens == 0,
        priority=_priority(body),
        tenant=_tenant(body),
        adapters=_adapters(body),
    )


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{index}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad(f"messages[{index}].content must be a string or a list of text parts", "messages")


def parse_chat(body: Any) -> ChatRequest:
    """Validate a /v1/chat/completions body. Raises APIError(400) with the offending parameter."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _reject_unsupported(body, chat=True)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages")
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
            raise bad(f"messages[{i}] must be an object with a role in {', '.join(_ROLES)}", "messages")
        messages.append({"role": msg["role"], "content": _message_text(msg.get("content"), i)})
    max_tokens = _opt_int(body, "max_completion_tokens", 1, MAX_INT)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1, MAX_INT)
    top_logprobs = _opt_int(body, "top_logprobs", 0, 20)
    logprobs = (top_logprobs or 0) if _opt_bool(body, "logprobs") else None
    if top_logprobs and logprobs is None:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    kwargs = dict(kwargs)
    if "messages" in kwargs:
        raise bad("'chat_template_kwargs' may not set 'messages' (the request's own messages are rendered)",
                  "chat_template_kwargs")
    # as vLLM: chat_template_kwargs are merged over the request's own template flags
    flags = {}
    for key in ("add_generation_prompt", "continue_final_message"):
        value = kwargs.pop(key, None)
        flags[key] = body.get(key) if value is None else value
    add_generation_prompt = _opt_bool(flags, "add_generation_prompt", True)
    continue_final_message = _opt_bool(flags, "continue_final_message")
    if continue_final_message and flags["add_generation_prompt"]:  # both given true; the default gives way
        raise bad("cannot set both 'continue_final_message' and 'add_generation_prompt' to true (as vLLM)",
                  "continue_final_message")
    template = kwargs.pop("chat_template", None)
    top = body.get("chat_template")
    if top is not None:
        template = top
    if template is not None and not isinstance(template, str):
        raise bad("'chat_template' must be a string", "chat_template")
    stream, opts = _stream(body)
    if stream and body.get("prompt_logprobs") is not None:
        raise bad("'prompt_logprobs' is not available when 'stream' is true (as vLLM)", "prompt_logprobs")
    return ChatRequest(
        model=_model(body),
        messages=messages,
        params=_sampling(body, max_tokens=max_tokens, logprobs=logprobs),
        max_tokens_given=max_tokens is not None,
        n=_n(body),
        stream=stream,
        stream_options=opts,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        chat_template_kwargs=kwargs,
        chat_template=template,
        priority=_priority(body),
        tenant=_tenant(body),
        adapters=_adapters(body),
    )


def check_max_tokens(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """vLLM's 400 for a request whose prompt plus max_tokens exceed the context (not cut at "length")."""
    if prompt_tokens + max_tokens > max_model_len:
        raise bad(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                  f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                  "completion). Please reduce the length of the messages or completion.", "max_tokens")


# ----------------------------------------------------------------------------------------------
# responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_str(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def safe_logprob(value: float) -> float | None:
    """A logprob JSON can carry, as vLLM writes it: -inf -> -9999.0, NaN (and +inf) -> null."""
    if math.isnan(value) or value == math.inf:
        return None
    return max(value, LOGPROB_FLOOR)


def completion_logprobs(tokenizer: Any, lps: list[TokenLogprob], text_offset: int = 0,
                        prompt: tuple[list[int], list[dict[int, Logprob] | None]] | None = None) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset.

    `prompt` (ids, RequestOutput.prompt_logprobs) puts the prompt tokens first, as vLLM with echo: the
    first one has logprob null, the others their logprob and top_logprobs {the token, then the top-k};
    text_offset runs on through the prompt tokens' strings into the generated ones.
    """
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, entry in zip(*prompt) if prompt is not None else ():
        tok = _token_str(tokenizer, tid)
        offsets.append(text_offset)
        text_offset += len(tok)
        tokens.append(tok)
        token_lps.append(None if entry is None else safe_logprob(entry[tid].logprob))
        tops.append(None if entry is None else
                    {_token_str(tokenizer, t): safe_logprob(v.logprob) for t, v in entry.items()})
    for lp in lps:
        tok = _token_str(tokenizer, lp.token_id)
        offsets.append(text_offset)
        text_offset += len(tok)
        tokens.append(tok)
        token_lps.append(safe_logprob(lp.logprob))
        tops.append({_token_str(tokenizer, t): safe_logprob(v) for t, v in lp.top.items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_json(tokenizer: Any, entries: list[dict[int, Logprob] | None] | None) -> list[Any] | None:
    """vLLM's `prompt_logprobs` response field: per prompt token None or {"id": {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": safe_logprob(v.logprob), "rank": v.rank,
                                             "decoded_token": _token_str(tokenizer, t)} for t, v in e.items()}
            for e in entries]


def chat_logprobs(tokenizer: Any, lps: list[TokenLogprob], top_n: int) -> dict[str, Any]:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for lp in lps:
        tok = _token_str(tokenizer, lp.token_id)
        top = sorted(lp.top.items(), key=lambda kv: -kv[1] if not math.isnan(kv[1]) else math.inf)[:top_n]
        content.append({
            "token": tok, "logprob": safe_logprob(lp.logprob), "bytes": list(tok.encode()),
            "top_logprobs": [{"token": (s := _token_str(tokenizer, t)), "logprob": safe_logprob(v),
                              "bytes": list(s.encode())} for t, v in top],
        })
    return {"content": content}


def completion_choice(index: int, text: str, out: RequestOutput, logprobs: dict[str, Any] | None,
                      prompt_logprobs: list[Any] | None = None) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
              "stop_reason": out.stop_reason}
    if prompt_logprobs is not None:  # vLLM's extra field, only when asked for
        choice["prompt_logprobs"] = prompt_logprobs
    return choice


def chat_choice(index: int, out: RequestOutput, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": out.text}, "logprobs": logprobs,
            "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}


def response(kind: str, rid: str, created: int, model: str, choices: list[dict[str, Any]],
             use: dict[str, int]) -> dict[str, Any]:
    """A non-streamed response body; kind is "text_completion" or "chat.completion"."""
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, "usage": use}


def chunk(kind: str, rid: str, created: int, model: str, choices: list[dict[str, Any]],
          use: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed chunk; kind is "text_completion" or "chat.completion.chunk"."""
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, "usage": use}


def dumps(data: Any) -> str:
    """The one JSON writer of every response and SSE event: strict JSON (a NaN or infinity raises, never
    reaches a client as a bare `NaN`)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event line pair: `data: {...}\\n\\n` (or `data: [DONE]\\n\\n`)."""
    payload = data if isinstance(data, str) else dumps(data)
    return f"data: {payload}\n\n".encode()


def model_card(model_id: str, *, root: str, parent: str | None, created: int, max_model_len: int | None) -> dict[str, Any]:
    """One /v1/models entry, vLLM-shaped (adapters carry parent = the base model's id)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "mlora", "root": root,
            "parent": parent, "max_model_len": max_model_len}
