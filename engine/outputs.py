"""What the engine returns per request (vLLM-shaped). Pure Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Logprob of one generated token plus the top-k alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic()) for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The state of one request.

    From `LLM.generate` this is final. From the async interface each yielded output is
    cumulative (`text`, `token_ids` so far) and also carries the increment since the last
    yield (`delta_text`, `delta_token_ids`) so a streaming server can forward it directly.
    `finish_reason` is None while running, then "stop" (EOS, stop token or stop string),
    "length" (max_tokens or context limit) or "abort". `error` is set (and finish_reason is
    "abort") when the engine ended the request because of a failure of its own (non-finite
    logits, a failed step): the message says why; other requests are not affected.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    adapter: str | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    metrics: RequestMetrics | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)
