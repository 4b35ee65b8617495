"""InputProcessor: checks one request's input from the engine's immutable facts (vLLM v1's `Processor`).

It holds only what never changes after the engine is built (the tokenizer, the model's vocabulary size
and context length, the engine config), so any thread may call it: AsyncLLM runs it in a worker thread
(tokenizing grows with the client's input) and hands the engine thread an input that is already valid;
the offline `LLM` calls it through `EngineCore.add_request`. It is the one owner of "is this prompt
valid" (token ids in the vocabulary, not empty, fits the context) and of the sampling parameters'
token ids (logit_bias, allowed_token_ids, the tokenized bad_words, and whether allowed_token_ids leaves any
token that bad_words and min_tokens do not mask from the first step on). Whether an adapter is known is
the engine thread's decision (`EngineCore.resolve_adapters`), since adapters come and go while requests wait.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig, check_priority
from engine.errors import ConfigError, PromptTooLongError, TokenIdError
from engine.sampling_params import SamplingParams

Composition = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class InputProcessor:
    """Validates prompts and sampling parameters; thread-safe (reads immutable facts only)."""

    tokenizer: Any
    vocab_size: int
    max_model_len: int
    model_name: str
    config: EngineConfig
    eos_token_ids: frozenset[int] = frozenset()  # the model's EOS ids (what min_tokens masks, unless ignore_eos)

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids), validated by `check_prompt_ids`."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt).input_ids)
            text: str | None = prompt
        else:
            ids, text = [int(t) for t in prompt], None
        self.check_prompt_ids(ids)
        return text, ids

    def check_prompt_ids(self, ids: Sequence[int]) -> None:
        """The one check of a prompt's token ids: every id indexes the model's embedding, [0, vocab_size)
        (the MODEL's vocabulary, which may be larger than the tokenizer's; vLLM accepts those ids too:
        TokenIdError naming the first id outside), the prompt is not empty, and it leaves room for one
        generated token (PromptTooLongError). All are HTTP 400 with param "prompt". `tokenize` calls it;
        the server also calls it for every prompt of a batch completion before submitting any, so one bad
        prompt starts nothing."""
        self._check_ids("prompt", ids)
        if not ids:
            raise ConfigError("the prompt is empty", param="prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens "
                "(including at least one generated token)", param="prompt"
            )

    def check_params(self, params: SamplingParams, priority: int = 0) -> None:
        """The request's sampling token ids are in the vocabulary, allowed_token_ids leaves a token to
        generate; `priority` means something here."""
        check_priority(self.config, priority)
        self._check_ids("logit_bias", params.logit_bias or {})
        self._check_ids("allowed_token_ids", params.allowed_token_ids or [])
        self._check_something_allowed(params)

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad_words: each word as is, and with a leading space when that gives
        a different first token and as many tokens (a word in the middle of a text)."""
        out: list[list[int]] = []
        for word in words:
            plain = list(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = list(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            out.append(plain)
            if spaced[0] != plain[0] and len(spaced) == len(plain):
                out.append(spaced)
        return out

    def _check_something_allowed(self, params: SamplingParams) -> None:
        """allowed_token_ids entirely inside what the sampler masks at the first step (single-token
        bad_words always; EOS and stop_token_ids while min_tokens are not generated yet) leaves no token
        to sample: known before any step, so a 400 here rather than a request that fails at its first
        token. (A multi-token bad word masks only after its other tokens: the engine's own check.)"""
        if not params.allowed_token_ids or not (params.bad_words or params.min_tokens):
            return
        masked: dict[int, str] = {}
        if params.min_tokens:
            stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            masked.update((t, f"min_tokens={params.min_tokens} masks EOS and stop_token_ids until "
                              f"{params.min_tokens} tokens are generated") for t in stops)
        for word in self.bad_words_token_ids(params.bad_words):
            if len(word) == 1:
                masked[word[0]] = "bad_words mask them"
        if all(t in masked for t in params.allowed_token_ids):
            why = sorted({masked[t] for t in params.allowed_token_ids})
            ids = params.allowed_token_ids
            shown = f"{ids[:8]}"[:-1] + (", ...]" if len(ids) > 8 else "]")
            raise ConfigError(f"allowed_token_ids {shown} leave no token to generate: {' and '.join(why)}",
                              param="allowed_token_ids")

    def process(self, prompt: str | list[int], params: SamplingParams, priority: int = 0) -> tuple[str | None, list[int]]:
        """check_params, then tokenize: everything about a request that needs no engine state."""
        self.check_params(params, priority)
        return self.tokenize(prompt)

    def tenant_of(self, adapter: str | None, tenant: str | None = None) -> str:
        """Whose fair share and queue quota a request uses: its explicit tenant, else its adapter,
        else the base model's name."""
        return tenant or adapter or self.model_name

    def _check_ids(self, what: str, ids: Any) -> None:
        outside = [t for t in ids if not 0 <= t < self.vocab_size]
        if outside:
            raise TokenIdError(f"{what} token id {outside[0]} is out of range [0, {self.vocab_size}) "
                               "(the model's vocabulary)", param=what)


def resolve_components(adapter: str | None, adapters: Any, compositions: Mapping[str, Composition],
                       max_components: int | None) -> tuple[str | None, Composition]:
    """What a request names, before asking whether those adapters are registered: (first adapter or None,
    components). `adapter` may name a composition alias; `adapters` an explicit composition, whose first
    entry `adapter` must then be. ConfigError (400) for a contradiction."""
    from engine.lora.compose import normalize

    if adapters is not None:
        try:
            comp = normalize(adapters, max_components=max_components)
        except ConfigError as exc:
            raise ConfigError(exc.message, param="adapters", hint=exc.hint) from None
        if adapter is not None and adapter in compositions:
            raise ConfigError(f"{adapter!r} is a composition; give either it or adapters, not both", param="adapters")
        if adapter is not None and (not comp or adapter != comp[0][0]):
            raise ConfigError(f"model {adapter!r} must be the base model or the first entry of adapters "
                              f"({comp[0][0]!r})" if comp else f"model {adapter!r} names an adapter but every "
                              "entry of adapters has weight 0", param="model")  # fmt: skip
    elif adapter is not None and adapter in compositions:
        comp = compositions[adapter]
    else:
        comp = ((adapter, 1.0),) if adapter is not None else ()
    return (comp[0][0] if comp else None), comp
