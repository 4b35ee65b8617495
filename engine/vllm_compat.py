"""vLLM's offline-API spellings that `engine.LLM` accepts, each decided here once. No torch.

- `engine_kwargs`: vLLM `LLM(...)`/`EngineArgs` keyword options -> EngineConfig keyword options.
  A vLLM option either maps to an EngineConfig field, has no effect on what mlora computes
  (accepted), is accepted only at the value that means "off" (anything else would change
  results or resources and is refused), or is refused. Nothing is ignored silently.
- `parse_prompt`: a string, a list of token ids, `{"prompt": str}` (vLLM's TextPrompt) or
  `{"prompt_token_ids": [...]}` (vLLM's TokensPrompt) -> what EngineCore.add_request takes.
"""

from __future__ import annotations

import warnings
from typing import Any, TypedDict

from engine.errors import ConfigError

# vLLM options that change speed only in vLLM (CUDA graphs, compilation, caching, logging); mlora's
# outputs do not depend on them, so they are accepted and have no effect.
NOOP_OPTIONS = frozenset({
    "enforce_eager", "max_seq_len_to_capture", "compilation_config", "disable_custom_all_reduce",
    "disable_async_output_proc", "enable_chunked_prefill", "disable_log_stats",
    "disable_log_requests", "fully_sharded_loras", "use_tqdm_on_load",
})  # fmt: skip

# vLLM options mlora does not implement: accepted only at the value meaning "off".
OFF_ONLY: dict[str, Any] = {
    "tensor_parallel_size": 1,
    "pipeline_parallel_size": 1,
    "data_parallel_size": 1,
    "quantization": None,
    "kv_cache_dtype": "auto",
    "cpu_offload_gb": 0,
    "tokenizer_mode": "auto",
    "skip_tokenizer_init": False,
    "tokenizer_revision": None,
    "hf_overrides": None,
    "speculative_config": None,
    "long_lora_scaling_factors": None,
}

# vLLM memory knobs with no mlora counterpart: results are the same, memory use may differ, so
# they are accepted with a warning naming mlora's own knob.
# (gpu_memory_utilization is an EngineConfig field: vLLM's meaning on CUDA, ignored with a warning on CPU.)
RESOURCE_ONLY = {
    "swap_space": "mlora recomputes preempted requests instead of swapping them to CPU memory",
}


def engine_kwargs(model: str | None, kwargs: dict[str, Any], config_fields: set[str]) -> dict[str, Any]:
    """EngineConfig keyword options for `LLM(model, **kwargs)` written with mlora or vLLM names."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in config_fields:
            if key in ("seed", "max_cpu_loras") and value is None:  # vLLM's "unset"
                continue
            out[key] = value
        elif key in NOOP_OPTIONS:
            continue
        elif key == "tokenizer":
            if value is not None and str(value) != str(model):
                raise ConfigError(f"tokenizer={value!r}: mlora always uses the model's own tokenizer",
                                  hint="remove the tokenizer= option (or pass the model path)")  # fmt: skip
        elif key in OFF_ONLY:
            if value != OFF_ONLY[key]:
                raise ConfigError(f"{key}={value!r} is not supported by mlora (only {OFF_ONLY[key]!r})",
                                  hint=f"remove the {key}= option")  # fmt: skip
        elif key in RESOURCE_ONLY:
            warnings.warn(f"mlora ignores {key}={value!r}: {RESOURCE_ONLY[key]}", stacklevel=3)
        else:
            raise ConfigError(f"unknown engine option(s): {key}",
                              hint=f"mlora's options: {', '.join(sorted(config_fields - {'model'}))}")  # fmt: skip
    return out


class TextPrompt(TypedDict):
    """vLLM's TextPrompt: `{"prompt": "..."}`."""

    prompt: str


class TokensPrompt(TypedDict, total=False):
    """vLLM's TokensPrompt: `{"prompt_token_ids": [...]}` (an optional "prompt" names its text)."""

    prompt_token_ids: list[int]
    prompt: str


_PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids"})


def parse_prompt(prompt: Any) -> tuple[str | list[int], str | None]:
    """(what to tokenize or the token ids, the prompt text to report or None) for one prompt."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        extra = set(prompt) - _PROMPT_KEYS
        if extra:
            raise ConfigError(f"prompt keys not supported by mlora: {', '.join(sorted(extra))}",
                              hint='give {"prompt": text} or {"prompt_token_ids": [ids]}')  # fmt: skip
        if "prompt_token_ids" in prompt:
            text = prompt.get("prompt")
            return _token_ids(prompt["prompt_token_ids"]), (str(text) if text is not None else None)
        if isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], None
        raise ConfigError('a prompt dict needs "prompt" (a string) or "prompt_token_ids" (a list of ints)')
    if isinstance(prompt, (list, tuple)):
        return _token_ids(prompt), None
    raise ConfigError(f"a prompt must be a string, a list of token ids or a prompt dict, got {type(prompt).__name__}")


def _token_ids(ids: Any) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ConfigError("prompt_token_ids must be a list of integers")
    return list(ids)


def is_single_prompt(prompts: Any) -> bool:
    """True when `prompts` is one prompt (text, prompt dict or token ids), not a batch of them."""
    if isinstance(prompts, (str, dict)):
        return True
    return isinstance(prompts, (list, tuple)) and bool(prompts) and isinstance(prompts[0], int)
