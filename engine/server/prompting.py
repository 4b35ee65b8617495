"""Prompt text work with bounded cost: size checks, chat template rendering, off the event loop.

Rendering a chat template and tokenizing scale with what a client sends, so the handlers run
them in a small worker pool (`run_text_work`): the event loop keeps answering every other
client meanwhile. Before any of that work starts it is bounded:

- a text prompt longer than `max_prompt_chars` characters cannot fit the context (every token
  covers at most `max_token_chars` characters), so it is refused before it is tokenized;
- a rendered chat prompt is held to the same bound;
- a client's own chat template (`chat_template`, top level or inside `chat_template_kwargs`) is
  refused unless the operator opts in (`--trust-request-chat-template`, vLLM's flag name); a
  trusted one renders in jinja2's immutable sandbox with its size, its output, string/list
  repetition and its run time bounded (`render_client_template`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.server.protocol import APIError, ChatRequest, bad

T = TypeVar("T")

# Two workers: a slow render or a long tokenization delays other template work, never the event loop.
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mlora-prompt")
CHARS_MARGIN = 2  # normalizers (NFKC) may merge characters: refuse only prompts twice as long as can fit
MAX_TEMPLATE_CHARS = 128 * 1024  # real chat templates are under 20 KB
RENDER_TIMEOUT_S = 2.0
MAX_INT_BITS = 65536  # integers a client template may compute (10 ** 10 ** 10 is refused, not computed)  # a client template that runs longer is refused (checked on every call and output)
_token_chars: dict[int, int] = {}


async def run_text_work(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the prompt worker pool (chat rendering, tokenization, large JSON bodies)."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, fn, *args)


def max_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry in characters (>= 1): no token covers more text than that."""
    key = id(tokenizer)
    if key not in _token_chars:
        try:
            longest = max((len(t) for t in tokenizer.get_vocab()), default=16)
        except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: a generous guess
            longest = 64
        _token_chars[key] = max(1, longest)
    return _token_chars[key]


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int:
    """Characters beyond which a text prompt cannot fit the context, whatever it tokenizes to."""
    return max_model_len * max_token_chars(tokenizer) * CHARS_MARGIN


def check_prompt_chars(text: str, limit: int, what: str = "the prompt") -> None:
    if len(text) > limit:
        raise APIError(400, f"{what} has {len(text)} characters, more than this model's context can hold "
                            f"(at most {limit} characters); shorten it", param="prompt")


def render_chat(tokenizer: Any, req: ChatRequest, max_chars: int) -> str | list[int]:
    """The engine prompt for a chat request (run it with `run_text_work`).

    With a chat template (the client's, already allowed by the caller, or the tokenizer's): the
    rendered text, tokenized without adding special tokens again (the template holds them).
    Without one (e.g. the byte-level demo tokenizer): the messages' contents joined by newlines,
    as a plain string, so a one-message chat equals a completion of that message.
    """
    gen_prompt = req.add_generation_prompt and not req.continue_final_message
    if req.chat_template is not None:
        text = render_client_template(req.chat_template, req.messages, tokenizer, req.chat_template_kwargs,
                                      max_chars=max_chars, add_generation_prompt=gen_prompt,
                                      continue_final_message=req.continue_final_message)
    elif getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                req.messages, tokenize=False, add_generation_prompt=gen_prompt,
                continue_final_message=req.continue_final_message, **req.chat_template_kwargs,
            )
        except Exception as exc:  # jinja raises for e.g. non-alternating roles
            raise bad(f"chat template error: {exc}".splitlines()[0], "messages") from None
    else:
        text = "\n".join(m["content"] for m in req.messages)
        check_prompt_chars(text, max_chars, "the chat prompt")
        return text
    if not isinstance(text, str):
        raise bad("the chat template did not render to text", "messages")
    check_prompt_chars(text, max_chars, "the rendered chat prompt")
    return list(tokenizer.encode(text, add_special_tokens=False))


class _Budget(Exception):
    pass


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, plus: `*` and `**` may not build huge values, and every call,
    attribute or item access checks the deadline (a render that runs too long stops)."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, deadline: float, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.deadline = deadline
        self.max_chars = max_chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Budget(f"the chat template ran longer than {RENDER_TIMEOUT_S:g}s")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > self.max_chars:
                    raise _Budget("the chat template builds a value larger than the prompt limit")
        if isinstance(left, int) and isinstance(right, int):  # big-integer arithmetic that could run for hours
            bits = left.bit_length() * abs(right) if operator == "**" else left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS:
                raise _Budget("the chat template computes a number that is too large")
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.tick()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.tick()
        return super().getitem(obj, argument)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def render_client_template(template: str, messages: list[dict[str, str]], tokenizer: Any, kwargs: dict[str, Any], *,
                           max_chars: int, add_generation_prompt: bool, continue_final_message: bool) -> str:
    """Render a client-supplied chat template as transformers would, within bounds; 400 when it breaks one.
    `kwargs` (the request's chat_template_kwargs) are template variables only: a dict, so no client key can
    collide with this function's own parameters."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise bad(f"'chat_template' may be at most {MAX_TEMPLATE_CHARS} characters", "chat_template")
    env = _BoundedSandbox(time.monotonic() + RENDER_TIMEOUT_S, max_chars)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    variables = {"bos_token": getattr(tokenizer, "bos_token", None) or "",
                 "eos_token": getattr(tokenizer, "eos_token", None) or "", **kwargs,
                 "messages": messages, "add_generation_prompt": add_generation_prompt}
    pieces, total = [], 0
    try:
        for piece in env.from_string(template).generate(**variables):
            total += len(piece)
            if total > max_chars:
                raise _Budget(f"the chat template rendered more than {max_chars} characters")
            env.tick()
            pieces.append(piece)
    except _Budget as exc:
        raise bad(f"chat template refused: {exc}", "chat_template") from None
    except (TemplateError, SecurityError, ArithmeticError, TypeError, ValueError, LookupError, RecursionError,
            MemoryError) as exc:
        raise bad(f"chat template error: {exc}".splitlines()[0][:300], "chat_template") from None
    text = "".join(pieces)
    if continue_final_message and messages:  # as transformers: end the prompt with the final message's text
        final = messages[-1]["content"]
        cut = text.rfind(final) if final else -1
        if final and cut == -1:
            raise bad("continue_final_message: the final message's content is not in the rendered prompt", "messages")
        if final:
            text = text[: cut + len(final)]
    return text
