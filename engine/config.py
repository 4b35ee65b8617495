"""EngineConfig: the one frozen configuration object of the engine (checked in __post_init__).

Pure Python (no torch) so the CLI can build and validate it cheaply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from engine.errors import ConfigError, UsageError
from engine.numbers import finite_number

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULING_POLICIES = ("fair", "fcfs", "priority")  # engine.scheduler.POLICIES (which imports no config)
# The one dtype name map (engine, merge, budget): alias -> canonical name.
DTYPE_ALIASES = {
    "fp16": "float16", "f16": "float16", "half": "float16",
    "bf16": "bfloat16",
    "fp32": "float32", "f32": "float32", "float": "float32",
}  # fmt: skip
# Adapter names: no commas or spaces, since vllm:lora_requests_info joins names with commas.
ADAPTER_NAME_RULE = "1-128 characters from letters, digits and . _ / : @ + - (starting with a letter or digit)"
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,127}$")
CPU_LORAS_PER_SLOT = 2  # CPU cache = 2x the device slots: a working set twice the slots swaps without disk reads
CPU_LORA_BYTES = 1 << 30  # ... and more while they fit in 1 GiB: thousands of small adapters, a sliver of a server's RAM


def valid_adapter_name(name: object) -> bool:
    """Whether `name` may name an adapter (--lora, /v1/load_lora_adapter, a tenant): see ADAPTER_NAME_RULE."""
    return isinstance(name, str) and bool(_ADAPTER_NAME.match(name))


def default_max_cpu_loras(max_loras: int) -> int:
    """max_cpu_loras when it is not given: the one default of serve, LLM and `mlora budget`."""
    return CPU_LORAS_PER_SLOT * max_loras


def default_max_cpu_lora_bytes(max_cpu_loras: int | None) -> int:
    """max_cpu_lora_bytes when it is not given: CPU_LORA_BYTES, or 0 (a count only, as vLLM) when
    `max_cpu_loras` was given: an explicit max_cpu_loras stays the cap it is in vLLM."""
    return CPU_LORA_BYTES if max_cpu_loras is None else 0


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start.

    model: a local HF model directory or a hub id; None = the built-in demo model.
    KV capacity comes from `num_kv_blocks`, `kv_cache_memory_bytes` or (CUDA) `gpu_memory_utilization`
    (at most one); with none, the engine sizes the cache for `max_num_seqs` full-length sequences
    within a device-dependent memory cap. `gpu_memory_utilization` is vLLM's: the share of the GPU's
    total memory this process may fill (weights, LoRA slots, KV); ignored with a warning on CPU.
    `max_model_len=None` means the model's own limit (clamped to what the KV cache can hold).
    `max_queue` bounds the waiting queue of the async engine (QueueFullError beyond it; None = unbounded).
    `max_queue_per_tenant` bounds one tenant's unfinished requests in the async engine (queued or
    running: one tenant cannot fill the whole queue and lock the others out with 429s).
    LoRA: `max_loras` device slots of rank `max_lora_rank`, `max_cpu_loras` adapters kept in
    CPU memory, and more while their weights fit in `max_cpu_lora_bytes` (default 1 GiB, or 0 when
    `max_cpu_loras` is given), `loras` = ((name, path), ...) registered at start. A request may compose up to
    `max_adapters_per_request` adapters with weights; `lora_compose` = ((alias, ((adapter, weight), ...)), ...)
    (or {alias: "a:0.7,b:0.5"}) names compositions a request can select like an adapter (engine.lora.compose).
    `served_model_name`: the base model's name in the API (default: `model` as given, as vLLM does;
    the demo model's name without one). `chat_template`: template text that replaces the tokenizer's.
    `cpu_threads`: torch's intra-op CPU threads (None = torch's default).
    Scheduling (engine/scheduler.py): `scheduling_policy` fair (default), fcfs or priority;
    `lora_weights` = ((tenant, weight), ...): a tenant's share weight (default 1; a tenant is an
    adapter's name, the base model's name, or a name a request gives); `fair_prompt_weight` /
    `fair_output_weight` = what one prompt / output token counts in the fair-share counters;
    `max_seqs_per_tenant` caps one tenant's running requests (None = no cap).
    `enable_prefix_caching` (vLLM's name, on by default): reuse the K/V of full blocks of a prompt
    prefix that an earlier request of the same adapter version (or the base model) computed.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    seed: int = 0
    max_queue: int | None = None
    max_queue_per_tenant: int | None = None
    enable_lora: bool = True
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    max_cpu_lora_bytes: int | None = None
    lora_dtype: str = "auto"
    loras: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    trust_remote_code: bool = False
    revision: str | None = None
    served_model_name: str | None = None
    gpu_memory_utilization: float | None = None
    chat_template: str | None = None
    cpu_threads: int | None = None
    scheduling_policy: str = "fair"
    lora_weights: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    fair_prompt_weight: float = 1.0
    fair_output_weight: float = 2.0
    max_seqs_per_tenant: int | None = None
    max_adapters_per_request: int = 4
    lora_compose: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = field(default_factory=tuple)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("dtype", _norm_dtype(self.dtype, "dtype"))
        set_("lora_dtype", _norm_dtype(self.lora_dtype, "lora_dtype"))
        if self.device not in DEVICES:
            raise UsageError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_loras", "max_lora_rank",
                     "max_adapters_per_request"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_memory_bytes", "max_cpu_loras", "cpu_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UsageError(f"{name} must be an integer >= 1 (or unset), got {value!r}")
        if self.max_queue is not None and (not isinstance(self.max_queue, int) or self.max_queue < 0):
            raise UsageError(f"max_queue must be an integer >= 0 (or unset), got {self.max_queue!r}")
        if self.max_queue_per_tenant is not None and (not isinstance(self.max_queue_per_tenant, int)
                                                      or isinstance(self.max_queue_per_tenant, bool) or self.max_queue_per_tenant < 1):
            raise UsageError(f"max_queue_per_tenant must be an integer >= 1 (or unset), got {self.max_queue_per_tenant!r}")
        sizing = [k for k in ("num_kv_blocks", "kv_cache_memory_bytes", "gpu_memory_utilization")
                  if getattr(self, k) is not None]
        if len(sizing) > 1:
            raise UsageError(f"give at most one of num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization; "
                             f"got {' and '.join(sizing)}")
        util = self.gpu_memory_utilization
        if util is not None and (isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1):
            raise UsageError(f"gpu_memory_utilization must be a fraction in (0, 1], got {util!r}")
        if self.served_model_name is not None and (not isinstance(self.served_model_name, str)
                                                   or not self.served_model_name.strip()):
            raise UsageError(f"served_model_name must be a non-empty string, got {self.served_model_name!r}")
        value = self.max_cpu_lora_bytes
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise UsageError(f"max_cpu_lora_bytes must be an integer >= 0 (or unset), got {value!r}")
        if value is None:
            set_("max_cpu_lora_bytes", default_max_cpu_lora_bytes(self.max_cpu_loras))
        if self.max_cpu_loras is None:
            set_("max_cpu_loras", default_max_cpu_loras(self.max_loras))
        elif self.max_cpu_loras < self.max_loras:
            raise UsageError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})",
                hint="every adapter in a device slot is also kept in the CPU cache",
            )
        loras = tuple(tuple(item) for item in (self.loras or ()))
        for item in loras:
            if len(item) != 2 or not all(isinstance(x, str) and x for x in item):
                raise UsageError(f"loras entries must be (name, path) pairs of strings, got {item!r}")
        names = [n for n, _ in loras]
        if len(set(names)) != len(names):
            raise UsageError(f"duplicate adapter names in loras: {names}")
        set_("loras", loras)
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise UsageError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                              f"got {self.scheduling_policy!r}")
        weights = []
        for item in self.lora_weights.items() if isinstance(self.lora_weights, dict) else (self.lora_weights or ()):
            item = tuple(item)
            if len(item) != 2 or not isinstance(item[0], str) or not item[0]:
                raise UsageError(f"lora_weights entries must be (name, weight) pairs, got {item!r}")
            weights.append((item[0], positive_number(item[1], f"the weight of {item[0]!r}", error=UsageError)))
        set_("lora_weights", tuple(weights))
        for name in ("fair_prompt_weight", "fair_output_weight"):
            positive_number(getattr(self, name), name, zero_ok=True, error=UsageError)
        if self.max_seqs_per_tenant is not None and (not isinstance(self.max_seqs_per_tenant, int)
                                                     or self.max_seqs_per_tenant < 1):
            raise UsageError(f"max_seqs_per_tenant must be an integer >= 1 (or unset), got {self.max_seqs_per_tenant!r}")
        set_("lora_compose", _compositions(self.lora_compose, self.max_adapters_per_request))
        if self.enable_prefix_caching is None:  # vLLM's "unset": its default, on
            set_("enable_prefix_caching", True)
        if not isinstance(self.enable_prefix_caching, bool):
            raise UsageError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        if self.model is not None and not isinstance(self.model, str):
            set_("model", str(self.model))

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> "EngineConfig":
        """Build from keyword arguments, with a clear error for unknown names."""
        unknown = set(kwargs) - cls.field_names()
        if unknown:
            raise ConfigError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        return cls(model=model, **kwargs)


def _compositions(value: Any, k: int) -> tuple[tuple[str, tuple[tuple[str, float], ...]], ...]:
    """lora_compose as ((alias, ((adapter, weight), ...)), ...): from that, a {alias: spec} dict or "NAME=a:0.7,b:0.5" strings."""
    from engine.lora.compose import normalize, parse_alias, parse_spec

    items = value.items() if isinstance(value, dict) else (value or ())
    out: dict[str, tuple[tuple[str, float], ...]] = {}
    try:
        for item in items:
            name, comp = parse_alias(item) if isinstance(item, str) else tuple(item)
            comp = parse_spec(comp) if isinstance(comp, str) else normalize(comp, max_components=k)
            if name in out:
                raise UsageError(f"composition {name!r} is defined twice")
            out[name] = normalize(comp, max_components=k)
    except UsageError:
        raise
    except (ConfigError, ValueError, TypeError) as e:
        raise UsageError(f"lora_compose: {getattr(e, 'message', e)}") from None
    return tuple(out.items())


def positive_number(value: object, what: str, *, zero_ok: bool = False,
                    error: type[ConfigError] = ConfigError) -> float:
    """`value` as a float > 0 (>= 0 with `zero_ok`), or an `error` that names `what` (e.g. a weight);
    UsageError where the value is an option's (exit 2 on the command line)."""
    ok = finite_number(value)
    if not ok and isinstance(value, int) and not isinstance(value, bool):  # an int is only too large for a float
        value = "a number with more than 300 digits"
    if not ok or not (value >= 0 if zero_ok else value > 0):  # type: ignore[operator]
        raise error(f"{what} must be a number {'>= 0' if zero_ok else '> 0'}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def dtype_name(value: object) -> str:
    """The canonical name of a dtype given as a name, an alias (bf16, fp32, half...) or a torch.dtype;
    callers check it against the dtypes they support."""
    text = str(value).strip().lower().removeprefix("torch.")
    return DTYPE_ALIASES.get(text, text)


def _norm_dtype(value: str, name: str) -> str:
    value = dtype_name(value)
    if value not in DTYPES:
        raise UsageError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


def check_priority(config: "EngineConfig", priority: int) -> None:
    """A request's `priority` only means something under the `priority` policy: elsewhere a
    non-zero value is refused rather than silently ignored (vLLM: "Got priority X but Priority
    scheduling is not enabled")."""
    if priority and config.scheduling_policy != "priority":
        raise ConfigError(f"got priority {priority}, but the scheduling policy is {config.scheduling_policy!r}; "
                          "priorities need --scheduling-policy priority", param="priority")

