"""Incremental detokenization with stop strings. No torch.

Text grows token by token without re-decoding the whole output: only a short window of ids is
decoded (vLLM's prefix/read offsets), and a token that ends mid-character (the tokenizer yields
U+FFFD) waits for the next one. Stop strings are searched only in the new text's neighbourhood;
the text is cut before the stop string (or after it with include_stop_str_in_output). While a
request runs, the last len(longest stop)-1 characters are held back from streaming, so streamed
deltas never show a stop string that the final text does not contain.
"""

from __future__ import annotations

from typing import Any

from engine.sampling_params import SamplingParams

_CONTEXT_TOKENS = 6  # prompt tokens kept as decoding context (leading-space rules of sentencepiece)


class IncrementalDetokenizer:
    """Generated text of one request, built one token at a time."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stops = [s for s in params.stop if s]
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.min_tokens = params.min_tokens  # as vLLM: stop strings are not searched before min_tokens
        self.num_added = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str | None:
        """Append a token's text; returns the stop string it completed, if any (text already cut)."""
        self.ids.append(token_id)
        self.num_added += 1
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # incomplete character: wait for more bytes
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        before = len(self.text)
        self.text += delta
        if not self.stops or self.num_added <= self.min_tokens:
            return None
        search_from = max(0, before - self.hold)
        best: tuple[int, str] | None = None
        for s in self.stops:
            idx = self.text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
        return s

    def flush(self) -> None:
        """At the end: append the text of tokens still held back (an unfinished character shows as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)

    def visible_text(self, finished: bool) -> str:
        """The text that may be streamed now (all of it once finished)."""
        if finished or self.hold == 0:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold)]
