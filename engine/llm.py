"""Offline API: `LLM(...).generate(prompts, params, adapters)` -> final RequestOutputs in submission order.

The async engine the server uses lives in engine/async_llm.py and is re-exported here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from engine.async_llm import AsyncLLM
from engine.config import EngineConfig, positive_number
from engine.core import EngineCore, EngineStats
from engine.errors import ConfigError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "EngineConfig", "EngineStats"]


class LLM:
    """One base model (+ LoRA adapters) for offline batch generation.

    `LLM(model=None, **EngineConfig fields)` or `LLM(config=EngineConfig(...))`.
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = EngineConfig.from_kwargs(model=model, **kwargs)
        elif model is not None or kwargs:
            raise ConfigError("pass either config= or model/keyword options, not both")
        self.config = config
        self.engine = EngineCore(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def add_adapter(self, name: str, path: str, weight: float | None = None) -> None:
        """Register (validate + load) a LoRA adapter under `name`; same name again replaces it.
        `weight`: its fair-share weight (None = keep the configured one, default 1)."""
        if weight is not None:
            weight = positive_number(weight, f"the weight of {name!r}")
        self._lora().add_adapter(name, str(path))
        if weight is not None:
            self.engine.scheduler.set_weight(name, weight)

    def remove_adapter(self, name: str) -> None:
        self._lora().remove_adapter(name)

    def list_adapters(self) -> list[str]:
        return [] if self.engine.lora is None else self.engine.lora.names()

    def _lora(self) -> Any:
        if self.engine.lora is None:
            raise ConfigError("LoRA is disabled for this engine", hint="create it with enable_lora=True")
        return self.engine.lora

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: str | None | Seq[str | None] = None,
        priority: Seq[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs keep the prompts' order.

        `params`: one SamplingParams for all, or one per prompt (default: SamplingParams()).
        `adapters`: one adapter name (or None = base model) for all, or one per prompt.
        `priority`: one value per prompt (lower first) for the `priority` scheduling policy, as vLLM.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        n = len(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * n
        alist = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * n
        if len(plist) != n or len(alist) != n:
            raise ConfigError(f"got {n} prompts but {len(plist)} sampling params and {len(alist)} adapters")
        prio = [0] * n if priority is None else list(priority)
        if len(prio) != n:
            raise ConfigError(f"got {n} prompts but {len(prio)} priorities")
        ids = [f"gen-{next(self._ids)}" for _ in range(n)]
        added: list[str] = []
        try:
            for rid, prompt, p, a, pr in zip(ids, prompts, plist, alist, prio):
                self.engine.add_request(rid, prompt, p, a, priority=pr)
                added.append(rid)
            final: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for rid in added:
                self.engine.abort(rid)
            raise
        return [final[rid] for rid in ids]

    def stats(self) -> EngineStats:
        return self.engine.stats()
