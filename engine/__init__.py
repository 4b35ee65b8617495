"""mlora engine: one base model, many LoRA adapters, one batched forward pass.

Public names are imported lazily so that torch-free modules (scheduler, block manager,
adapter registry, LRU) can be imported and tested without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "AsyncLLM", "EngineConfig",
    "LoRARequest", "CompletionOutput", "TextPrompt", "TokensPrompt", "LLMEngine", "EngineArgs",
]  # fmt: skip

_LAZY = {
    "LLM": "engine.llm",
    "AsyncLLM": "engine.llm",
    "EngineConfig": "engine.config",
    "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "LoRARequest": "engine.lora_request",
    "LLMEngine": "engine.llm_engine",
    "EngineArgs": "engine.llm_engine",
    "TextPrompt": "engine.vllm_compat",
    "TokensPrompt": "engine.vllm_compat",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
