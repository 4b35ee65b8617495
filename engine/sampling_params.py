"""Per-request sampling parameters (vLLM-shaped). Pure Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import ConfigError
from engine.numbers import finite_number


# The sampler applies repetition_penalty to fp32 logits: vLLM's rule (> 0, finite) must hold in fp32 too,
# or a 1e-300 becomes 0 there (x / 0) and a 1e300 becomes inf (0 * inf = NaN).
FP32_MAX = 3.4028234663852886e38
FP32_MIN_PENALTY = 2.0**-149  # the smallest positive float32; anything at or below 2**-150 rounds to 0


@dataclass
class SamplingParams:
    """How to sample one request.

    temperature 0 means greedy. `seed` makes a sampled request reproducible, alone or in a batch.
    `stop` strings are matched on the detokenized text and are not included in the output;
    `stop_token_ids` end the request (the token is not included in the text).
    `logprobs=k` returns, per generated token, the chosen token's logprob and the top-k.

    As vLLM: `min_p` drops tokens less likely than min_p x the top token's probability (after
    temperature); `repetition_penalty` (> 0 and a finite float32, 1 = off) divides the positive logits and multiplies
    the negative ones of every token seen in the prompt or the output; `presence_penalty` and
    `frequency_penalty` (in [-2, 2]) subtract, per token seen in the output, a constant and the
    count times the penalty; `min_tokens` masks EOS and `stop_token_ids` until that many tokens
    were generated; `logit_bias` adds {token id: bias} to the logits (clamped to [-100, 100]);
    `prompt_logprobs=k` returns each prompt token's logprob and the top-k (the first: None);
    `bad_words` are never generated (the last token of each word's tokenization, with and without
    a leading space, is masked where the output ends with the word's other tokens);
    `allowed_token_ids` restricts every step to those tokens.
    Penalties and bias change what is sampled (greedy too); logprobs stay the model's raw ones.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    prompt_logprobs: int | None = None
    bad_words: list[str] = field(default_factory=list)
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if isinstance(self.bad_words, str) or not all(isinstance(w, str) for w in self.bad_words or []):
            raise ConfigError(f"bad_words must be a list of strings, got {self.bad_words!r}", param="bad_words")
        self.bad_words = [w for w in self.bad_words or [] if w.strip()]
        if self.allowed_token_ids is not None:
            if isinstance(self.allowed_token_ids, (str, bytes)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in self.allowed_token_ids):
                raise ConfigError(f"allowed_token_ids must be a list of token ids, got {self.allowed_token_ids!r}",
                                  param="allowed_token_ids")
            if not self.allowed_token_ids:
                raise ConfigError("allowed_token_ids must not be empty", param="allowed_token_ids")
            self.allowed_token_ids = list(self.allowed_token_ids)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", param="max_tokens")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{name} must be a number, got {v!r}", param=name)
            if not finite_number(v):
                raise ConfigError(f"{name} must be a finite number", param=name)
        for name in ("top_k", "max_tokens", "min_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} must be an integer, got {v!r}", param=name)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{name} must be an integer, got {v!r}", param=name)
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}", param="top_k")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 20:
                raise ConfigError(f"{name} must be between 0 and 20, got {v}", param=name)
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}", param=name)
        if self.repetition_penalty <= 0.0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}", param="repetition_penalty")
        if not FP32_MIN_PENALTY <= self.repetition_penalty <= FP32_MAX:  # vLLM: > 0 and finite, in the sampler's fp32
            raise ConfigError(f"repetition_penalty must be between {FP32_MIN_PENALTY:.3g} and {FP32_MAX:.3g} "
                              f"(a positive finite float32: the sampler divides logits by it), got "
                              f"{self.repetition_penalty:.3g}", param="repetition_penalty")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ConfigError(f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}",
                              param="min_tokens")
        if self.logit_bias:
            bias: dict[int, float] = {}
            for k, v in dict(self.logit_bias).items():
                try:
                    tok = int(k)  # JSON object keys arrive as strings
                except (TypeError, ValueError):
                    raise ConfigError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
                if not finite_number(v):
                    raise ConfigError(f"logit_bias values must be finite numbers (token {tok})", param="logit_bias")
                bias[tok] = min(100.0, max(-100.0, float(v)))  # as vLLM: clamped to OpenAI's [-100, 100]
            self.logit_bias = bias
        self.logit_bias = self.logit_bias or None

    @property
    def penalized(self) -> bool:
        """True when the logits must be changed before sampling (this row leaves the fast path)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.logit_bias or self.bad_words or self.allowed_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
