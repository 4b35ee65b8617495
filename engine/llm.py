"""Offline API: `LLM(...).generate(prompts, params, adapters)` -> final RequestOutputs in submission order.

vLLM's spelling works too: `LLM(model, enable_lora=True, max_loras=...)` and
`llm.generate(prompts, sampling_params, lora_request=LoRARequest(name, int_id, path))`
(engine/vllm_compat.py decides which vLLM options and prompt shapes are accepted).
The async engine the server uses lives in engine/async_llm.py and is re-exported here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from engine.async_llm import AsyncLLM
from engine.config import EngineConfig, positive_number
from engine.core import EngineCore, EngineStats
from engine.errors import ConfigError
from engine.lora_request import LoRARequest
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.vllm_compat import engine_kwargs, is_single_prompt, parse_prompt

__all__ = ["LLM", "AsyncLLM", "EngineConfig", "EngineStats"]


class LLM:
    """One base model (+ LoRA adapters) for offline batch generation.

    `LLM(model=None, **EngineConfig fields)` or `LLM(config=EngineConfig(...))`; vLLM's option
    names are accepted where mlora has the concept (engine/vllm_compat.py), refused otherwise.
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            model = None if model is None else str(model)
            config = EngineConfig.from_kwargs(model=model, **engine_kwargs(model, kwargs, EngineConfig.field_names()))
        elif model is not None or kwargs:
            raise ConfigError("pass either config= or model/keyword options, not both")
        self.config = config
        self.engine = EngineCore(config)
        self._ids = itertools.count()
        self._lora_ids: dict[int, str] = {}  # LoRARequest.lora_int_id -> adapter name

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        """vLLM's accessor for `tokenizer`."""
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
        """Unregister `name` (and forget its default tenant's fair-share accounting)."""
        self._lora().remove_adapter(name)
        self.engine.scheduler.forget_tenant(name)
        self._lora_ids = {i: n for i, n in self._lora_ids.items() if n != name}

    def add_composition(self, name: str, components: Any) -> None:
        """Name a composition ("style:0.7,domain:0.5" or [("style", 0.7), ("domain", 0.5)]) so that
        `adapters="name"` composes those adapters; their deltas add with the weights, as `mlora merge --weight`."""
        self.engine.add_composition(name, components)

    def list_adapters(self) -> list[str]:
        return [] if self.engine.lora is None else self.engine.lora.names()

    def _lora(self) -> Any:
        if self.engine.lora is None:
            raise ConfigError("LoRA is disabled for this engine", hint="create it with enable_lora=True")
        return self.engine.lora

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: Any = None,
        *,
        lora_request: LoRARequest | None | Seq[LoRARequest | None] = None,
        use_tqdm: Any = True,
        priority: Seq[int] | None = None,
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs keep the prompts' order.

        `prompts`: one or a list of: text, token ids, `{"prompt": text}`, `{"prompt_token_ids": ids}`.
        `sampling_params` (or `params=`): one SamplingParams for all, or one per prompt.
        `adapters`: one adapter name (or None = base model) for all, or one per prompt, where an entry
        may also compose adapters: [("style", 0.7), ("domain", 0.5)] (see engine.lora.compose); or
        `lora_request`: one LoRARequest (or None) for all, or one per prompt, as in vLLM. A
        LoRARequest's adapter is registered under its name on first use.
        `priority`: one value per prompt (lower first) for the `priority` scheduling policy, as vLLM.
        `use_tqdm` has no effect (no progress bar).
        """
        if params is not None:
            if sampling_params is not None:
                raise ConfigError("pass sampling_params or params=, not both")
            sampling_params = params
        if is_single_prompt(prompts):
            prompts = [prompts]
        parsed = [parse_prompt(p) for p in prompts]
        n = len(parsed)
        plist = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params or SamplingParams()] * n
        rlist: list[Any] = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * n
        if lora_request is not None:
            if adapters is not None:
                raise ConfigError("pass adapters= or lora_request=, not both")
            if len(rlist) != n:
                raise ConfigError(f"got {n} prompts but {len(rlist)} lora requests")
            alist = [self.adapter_for(r) for r in rlist]  # registers new adapters before any request runs
        else:
            alist = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * n
        if len(plist) != n or len(alist) != n:
            raise ConfigError(f"got {n} prompts but {len(plist)} sampling params and {len(alist)} adapters")
        prio = [0] * n if priority is None else list(priority)
        if len(prio) != n:
            raise ConfigError(f"got {n} prompts but {len(prio)} priorities")
        ids = [f"gen-{next(self._ids)}" for _ in range(n)]
        added: list[str] = []
        try:
            for rid, (prompt, text), p, a, pr in zip(ids, parsed, plist, alist, prio):
                name, comp = _adapter_entry(a)
                self.engine.add_request(rid, prompt, p, name, prompt_text=text, priority=pr, adapters=comp)
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
        outs = [final[rid] for rid in ids]
        if lora_request is not None:
            for out, req in zip(outs, rlist):
                out.lora_request = req
        return outs

    def adapter_for(self, req: LoRARequest | None) -> str | None:
        """The adapter name serving `req`, registering its path on first use (vLLM keys by id and name)."""
        if req is None:
            return None
        if not isinstance(req, LoRARequest):
            raise ConfigError(f"lora_request must be a LoRARequest or None, got {type(req).__name__}")
        lora = self._lora()
        name, path = req.lora_name, req.lora_path
        owner = self._lora_ids.get(req.lora_int_id)
        if owner is not None and owner != name:
            raise ConfigError(f"lora_int_id {req.lora_int_id} is already used by adapter {owner!r}, not {name!r}",
                              hint="give each adapter its own lora_int_id")  # fmt: skip
        if name in lora.names():
            known = lora.cache.path_of(name)
            if _path_key(known) != _path_key(path):
                raise ConfigError(f"adapter {name!r} is already registered from {known}, not {path}",
                                  hint="give a different adapter a new lora_name and lora_int_id")  # fmt: skip
            other_id = next((i for i, n in self._lora_ids.items() if n == name), None)
            if other_id is not None and other_id != req.lora_int_id:
                raise ConfigError(f"adapter {name!r} was requested with lora_int_id {other_id}, now {req.lora_int_id}",
                                  hint="use one lora_int_id per adapter")  # fmt: skip
        else:
            lora.add_adapter(name, path)
        self._lora_ids[req.lora_int_id] = name
        return name

    def stats(self) -> EngineStats:
        return self.engine.stats()


def _adapter_entry(entry: Any) -> tuple[str | None, Any]:
    """One prompt's `adapters` entry -> (adapter name, composition or None)."""
    if entry is None or isinstance(entry, str):
        return entry, None
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and not isinstance(entry[1], str):
        return None, [entry]  # one ("name", weight) pair
    return None, entry


def _path_key(path: str) -> str:
    """One spelling per adapter location: a resolved local directory, else the Hub id as given."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)
