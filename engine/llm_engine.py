"""vLLM's step-by-step offline API: `LLMEngine.from_engine_args(EngineArgs(...))`, `add_request`,
`step`, `has_unfinished_requests`, as vLLM's examples/offline_inference/multilora_inference.py uses it.

A thin layer over `LLM` (same options, same LoRARequest registration rules); mlora's own
step API is `EngineCore`.
"""

from __future__ import annotations

from typing import Any

from engine.llm import LLM
from engine.lora_request import LoRARequest
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.vllm_compat import parse_prompt


class EngineArgs:
    """vLLM's EngineArgs: the model and keyword options `LLM(model, **options)` takes."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.model = model
        self.options = options


class LLMEngine:
    """Requests in, one engine step at a time; outputs carry the LoRARequest they were made with."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._lora_requests: dict[str, LoRARequest | None] = {}

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLMEngine":
        return cls(LLM(engine_args.model, **engine_args.options))

    def get_tokenizer(self) -> Any:
        return self.llm.tokenizer

    def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams | None = None,
        *,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
    ) -> None:
        """Queue one request: text, token ids or a prompt dict; `lora_request` registers its adapter on first use;
        `priority`: lower first under the `priority` scheduling policy (as LLM.generate)."""
        ids_or_text, text = parse_prompt(prompt)
        adapter = self.llm.adapter_for(lora_request)
        self.llm.engine.add_request(str(request_id), ids_or_text, params, adapter, prompt_text=text, priority=priority)
        self._lora_requests[str(request_id)] = lora_request

    def step(self) -> list[RequestOutput]:
        """One engine step: an output for every request that advanced or finished."""
        outs = self.llm.engine.step()
        for out in outs:
            out.lora_request = self._lora_requests.get(out.request_id)
            if out.finished:
                del self._lora_requests[out.request_id]
        return outs

    def has_unfinished_requests(self) -> bool:
        return self.llm.engine.has_unfinished()

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            self.llm.engine.abort(rid)
            self._lora_requests.pop(rid, None)
