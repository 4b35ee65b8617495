"""One request's state inside the engine. Pure Python: no torch."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.outputs import Logprob, RequestMetrics, TokenLogprob
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch  # annotations only: this module imports no torch


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    """Tokens (prompt + generated), KV blocks and progress of one request.

    `num_computed_tokens` counts tokens whose K/V are in the cache; the next step feeds
    `token_ids[num_computed_tokens:]` (a prompt chunk, or the one token sampled last step).
    Preemption resets it to 0 and frees the blocks: the request is recomputed later,
    prompt and generated tokens alike, and continues where it stopped.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    adapter: str | None = None
    adapter_version: int | None = None  # set at first admission; preemption re-acquires this version, not the name
    # a composed request: ((adapter, weight), ...), 2+ components or one with weight != 1 (`adapter` is the
    # first one's name); each component is bound to its own version at first admission, like `adapter_version`
    components: tuple[tuple[str, float], ...] = ()
    component_versions: list[int] | None = None
    component_digests: list[str | None] | None = None  # their content hashes: part of the prefix-cache key
    adapter_digest: str | None = None  # content hash of that version (set with it): part of the prefix-cache key
    tenant: str = ""  # whose fair share this request draws on (scheduler); "" = the adapter's name
    priority: int = 0  # lower runs first under the `priority` scheduling policy (vLLM's convention)
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of its full blocks (block_manager)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # why the engine ended it (non-finite logits, a failed step); None otherwise
    # set with `error` when the request's own parameters caused it: the field to name (a client error, HTTP 400)
    error_param: str | None = None
    # the sampler found this request's own constraints left no token (sampler.sample sets it; the core ends it)
    constraints_exhausted: bool = False
    logprobs: list[TokenLogprob] | None = None
    # vLLM's prompt_logprobs: one entry per prompt token (the first None), filled by the runner as
    # prefill chunks run; {token id: Logprob} holds the prompt token and the top-k
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # params.bad_words, tokenized (engine)
    num_preemptions: int = 0
    # engine state that lives as long as the request (set and cleared by its one owner, released once):
    enqueued_step: int = 0  # scheduler step at which it (re)entered the waiting queue (aging)
    lora_pins: list[tuple[str, int]] = field(default_factory=list)  # (adapter, lora_slot) pinned for it (lora.engine)
    generator: torch.Generator | None = None  # its sampling generator, seeded once (runner)
    seq_no: int = field(default_factory=lambda: next(_counter))  # admission order for tie-breaks
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.monotonic()))

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.tenant = self.tenant or self.adapter or ""
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Every adapter this request needs in a slot (its components when composed)."""
        if self.components:
            return tuple(n for n, _ in self.components)
        return () if self.adapter is None else (self.adapter,)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not yet in the KV cache (what the next steps must feed)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def check_token_stop(self) -> bool:
        """After a token was appended: set finish_reason for EOS, stop ids, max_tokens or context end."""
        last = self.token_ids[-1]
        if not self.params.ignore_eos and last in self.eos_token_ids:
            self.finish_reason, self.stop_reason = "stop", None
        elif last in self.params.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", last
        elif self.num_output_tokens >= self.params.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish_reason = "length"
        return self.finish_reason is not None
