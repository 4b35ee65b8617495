"""What the engine returns per request (vLLM-shaped). Pure Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
class Logprob:
    """vLLM's per-token logprob entry (`CompletionOutput.logprobs[i][token_id]`); rank 1 = most likely."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """vLLM's `RequestOutput.outputs[i]`: one generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    lora_request: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request.

    From `LLM.generate` this is final. From the async interface each yielded output is
    cumulative (`text`, `token_ids` so far) and also carries the increment since the last
    yield (`delta_text`, `delta_token_ids`) so a streaming server can forward it directly.
    `finish_reason` is None while running, then "stop" (EOS, stop token or stop string),
    "length" (max_tokens or context limit) or "abort". `error` is set (and finish_reason is
    "abort") when the engine ended the request because of a failure of its own (non-finite
    logits, a failed step): the message says why; other requests are not affected. `error_param`
    is set with it when the request's own parameters were the cause (its sampling constraints left
    no token to sample): the client's mistake (HTTP 400 naming that field), not the engine's (500).
    vLLM's shape is there too: `outputs[0].text/token_ids/finish_reason`, and `lora_request`
    (the LoRARequest the request was made with, from `LLM.generate(..., lora_request=)`), and
    `prompt_logprobs` (with SamplingParams.prompt_logprobs: {token id: Logprob} per prompt token,
    the prompt token and the top-k, ranked; None for the first token, as vLLM).
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
    error_param: str | None = None  # set with `error` when the request's own parameters caused it
    logprobs: list[TokenLogprob] | None = None
    metrics: RequestMetrics | None = None
    lora_request: Any = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # vLLM's: per prompt token, the first None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def outputs(self) -> list[CompletionOutput]:
        """vLLM's view: one CompletionOutput holding this request's text, ids and logprobs."""
        logprobs = None if self.logprobs is None else [_vllm_logprobs(lp) for lp in self.logprobs]
        cumulative = None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)
        return [CompletionOutput(0, self.text, list(self.token_ids), cumulative, logprobs,
                                 self.finish_reason, self.stop_reason, self.lora_request)]  # fmt: skip


def _vllm_logprobs(lp: TokenLogprob) -> dict[int, Logprob]:
    """{token id: Logprob} for the chosen token and the top-k, ranks counted from the top-k."""
    ranked = sorted(lp.top.items(), key=lambda kv: -kv[1])
    out = {tid: Logprob(v, rank=i + 1) for i, (tid, v) in enumerate(ranked)}
    if lp.token_id not in out:
        out = {lp.token_id: Logprob(lp.logprob), **out}
    return out
