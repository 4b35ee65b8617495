"""`mlora budget` as one engine call: `plan_budget(BudgetConfig) -> BudgetReport`.

Composes the byte math of `engine.planning.budget` (the single source of truth for sizes), the model
and GPU presets, real adapters read from their safetensors header, and the working-set replay
of `engine.planning.trace`. Torch-free; the CLI only parses flags and renders the report.

GPU arithmetic (the same as vLLM's): budget = total memory * gpu_memory_utilization;
KV bytes = budget - base weights - LoRA slots, rounded down to whole KV blocks. Activations,
CUDA graphs and allocator overhead are not modelled, so the KV figures are an upper bound.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from engine.config import default_max_cpu_lora_bytes, default_max_cpu_loras
from engine.errors import ConfigError
from engine.planning.budget import (
    LORA_MODULES,
    ModelDims,
    adapter_slot_bytes,
    base_weight_breakdown,
    kv_bytes_per_token,
    kv_tokens,
    linear_weight_bytes,
    lm_head_bytes,
    lora_module_shape,
    normalize_dtype,
    normalize_modules,
    slot_stack_shapes,
    dtype_bytes,
)
from engine.planning.presets import DEFAULT_GPU_PRESET, DEFAULT_MODEL_PRESET, find_model_preset, gpu_memory_bytes, resolve_model_config
from engine.planning.trace import ProgressFn, replay_trace

DEFAULT_MAX_MODEL_LEN_CAP = 8192  # default --max-model-len: the model's max_position_embeddings, capped here
GIB = 1 << 30


# --------------------------------------------------------------------------- config and report


@dataclass(frozen=True)
class BudgetConfig:
    """Everything `mlora budget` needs; checked on construction (usage errors exit 2)."""

    model: str | None = None  # None: DEFAULT_MODEL_PRESET (llama-3.1-8b)
    rank: int = 16
    max_loras: int = 4
    target_modules: tuple[str, ...] = LORA_MODULES
    dtype: str | None = None  # None: the model's torch_dtype (bfloat16 when the config has none)
    lora_dtype: str | None = None  # the slots' dtype (serve --lora-dtype); None or "auto": `dtype`
    max_cpu_loras: int | None = None  # None: engine.config.default_max_cpu_loras (as serve)
    max_cpu_lora_bytes: int | None = None  # None: engine.config.default_max_cpu_lora_bytes (as serve)
    adapters: tuple[str, ...] = ()
    gpu: str | None = None  # preset name; None and no gpu_memory_bytes: DEFAULT_GPU_PRESET
    gpu_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    block_size: int = 16
    trace: str | None = None
    target_hit_rate: float = 0.99
    served_model_names: tuple[str, ...] = ()  # extra names the trace uses for the base model

    def __post_init__(self) -> None:
        for name in ("rank", "max_loras", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}", exit_code=2)
        for name in ("max_cpu_loras", "max_cpu_lora_bytes", "max_model_len", "gpu_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (0 if name.startswith("max_cpu") else 1)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}", exit_code=2)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}", exit_code=2)
        if not 0.0 < self.target_hit_rate <= 1.0:
            raise ConfigError(f"--target-hit-rate must be in (0, 1], got {self.target_hit_rate}", exit_code=2)
        if self.gpu is not None and self.gpu_memory_bytes is not None:
            raise ConfigError("give either --gpu or --gpu-memory, not both", exit_code=2)
        object.__setattr__(self, "target_modules", normalize_modules(self.target_modules))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.lora_dtype is not None:
            auto = str(self.lora_dtype).strip().lower() == "auto"
            object.__setattr__(self, "lora_dtype", None if auto else normalize_dtype(self.lora_dtype))


@dataclass(frozen=True)
class ModuleRow:
    """One target module of one layer: linear shape, LoRA elements per unit of rank, slot stack shapes."""

    module: str
    in_features: int
    out_features: int
    elements_per_rank: int
    a_shape: tuple[int, int, int]  # [max_loras, rank, in]
    b_shape: tuple[int, int, int]  # [max_loras, out, rank]
    bytes_per_slot_per_layer: int


@dataclass(frozen=True)
class AdapterRow:
    """A real adapter against the slot: its true size vs the padded slot size."""

    path: str
    rank: int
    modules: tuple[str, ...]
    num_params: int
    file_dtype: str
    file_tensor_bytes: int
    bytes_at_slot_dtype: int
    slot_bytes: int
    padding_waste_bytes: int
    padding_waste_fraction: float
    fits_slot: bool
    problems: tuple[str, ...]


@dataclass(frozen=True)
class TraceRow:
    """One max_loras candidate replayed against the trace."""

    max_loras: int
    hit_rate: float
    loads: int
    loads_per_second: float | None
    slot_bytes: int


@dataclass(frozen=True)
class TraceSummary:
    """Working-set result: hit rates per candidate size and the smallest size meeting the target."""

    path: str
    requests: int
    adapter_requests: int
    base_requests: int
    distinct_adapters: int
    duration_s: float | None
    hit_rate_definition: str
    target_hit_rate: float
    rows: tuple[TraceRow, ...]
    recommended_max_loras: int | None
    recommended_slot_bytes: int | None
    recommended_kv_tokens: int | None
    recommended_max_concurrent_sequences: int | None
    recommended_fits: bool | None  # None without a recommendation
    best_hit_rate: float  # with max_loras >= distinct_adapters: only cold misses
    simulated_up_to: int  # hit rates are exact for max_loras <= this (engine.planning.trace.MAX_SIMULATED_SLOTS cap)
    base_model_names: tuple[str, ...] = ()  # trace names counted as base-model requests, sorted


@dataclass(frozen=True)
class BudgetReport:
    """Every number `mlora budget` prints; `to_dict()` is the stable `--json` schema."""

    model_source: str
    model: ModelDims
    dtype: str
    rank: int
    max_loras: int
    target_modules: tuple[str, ...]
    modules: tuple[ModuleRow, ...]
    bytes_per_adapter: int
    total_slot_bytes: int
    max_cpu_loras: int
    cpu_cache_bytes: int  # cpu_cache_adapters x bytes_per_adapter
    base_weight_bytes: int
    base_weight_breakdown: dict[str, int]
    linear_weight_bytes: int
    lm_head_bytes: int
    kv_bytes_per_token: int
    gpu_name: str | None
    gpu_memory_bytes: int
    gpu_memory_utilization: float
    gpu_budget_bytes: int
    kv_available_bytes: int
    block_size: int
    max_model_len: int
    kv_tokens: int
    kv_blocks: int
    max_concurrent_sequences: int
    fits: bool
    shortfall_bytes: int
    adapters: tuple[AdapterRow, ...] = ()
    trace: TraceSummary | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    max_cpu_lora_bytes: int = 0  # the CPU tier keeps more than max_cpu_loras adapters while they fit in this
    cpu_cache_adapters: int = 0  # adapters of this size the CPU tier holds: max_cpu_loras, or more within the bytes
    lora_dtype: str = ""  # the slots' dtype (bytes_per_adapter, total_slot_bytes, modules, adapters); `dtype` unless given

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with stable keys (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


def plan_budget(config: BudgetConfig, *, progress: ProgressFn | None = None) -> BudgetReport:
    """Compute the full budget report for `config` (reads config/adapter headers/trace; never weights)."""
    raw, source = resolve_model_config(config.model)
    dims = ModelDims.from_hf_config(raw)
    notes: list[str] = []
    dtype = config.dtype or dims.torch_dtype
    if dtype is None:
        dtype = "bfloat16"
        notes.append("the model config names no supported torch_dtype; assumed bfloat16 (set --dtype)")
    lora_dtype = config.lora_dtype or dtype  # the slots are in lora_dtype (serve --lora-dtype)
    nbytes = dtype_bytes(lora_dtype)
    mods = config.target_modules
    stacks = slot_stack_shapes(dims, max_loras=config.max_loras, max_rank=config.rank, modules=mods)
    rows = []
    for m, (a, b) in stacks.items():
        in_f, out_f = lora_module_shape(dims, m)
        rows.append(ModuleRow(m, in_f, out_f, in_f + out_f, a, b, (prod(a) + prod(b)) // config.max_loras * nbytes))
    per_slot = adapter_slot_bytes(dims, rank=config.rank, modules=mods, dtype=lora_dtype)
    total_slots = per_slot * config.max_loras
    cpu_loras = default_max_cpu_loras(config.max_loras) if config.max_cpu_loras is None else config.max_cpu_loras
    cpu_bytes = default_max_cpu_lora_bytes(config.max_cpu_loras) if config.max_cpu_lora_bytes is None else config.max_cpu_lora_bytes
    cpu_adapters = cpu_cache_adapters(cpu_loras, cpu_bytes, per_slot)
    breakdown = base_weight_breakdown(dims, dtype)
    base = sum(breakdown.values())
    kv_tok = kv_bytes_per_token(dims, dtype)

    gpu_name = None if config.gpu_memory_bytes is not None else (config.gpu or DEFAULT_GPU_PRESET)
    gpu_total = config.gpu_memory_bytes if gpu_name is None else gpu_memory_bytes(gpu_name)
    budget = int(gpu_total * config.gpu_memory_utilization)

    max_pos = dims.max_position_embeddings
    if config.max_model_len is not None:
        max_len = config.max_model_len
        if max_pos is not None and max_len > max_pos:
            notes.append(f"--max-model-len {max_len} exceeds the model's max_position_embeddings ({max_pos})")
    else:
        max_len = min(max_pos or DEFAULT_MAX_MODEL_LEN_CAP, DEFAULT_MAX_MODEL_LEN_CAP)

    def kv_at(slots: int) -> tuple[int, int, int]:  # (available bytes, kv tokens, max sequences)
        available = budget - base - per_slot * slots
        tokens = kv_tokens(available, dims, dtype, block_size=config.block_size)
        return available, tokens, tokens // max_len

    available, tokens, seqs = kv_at(config.max_loras)
    seq_blocks = -(-max_len // config.block_size)
    if available < 0:
        shortfall = -available
    elif seqs < 1:
        shortfall = seq_blocks * config.block_size * kv_tok - available
    else:
        shortfall = 0

    adapters = tuple(_adapter_row(p, dims, config, lora_dtype, per_slot) for p in config.adapters)
    trace = _trace_summary(config, per_slot, kv_at, progress, base_model_names(config.model, raw)) if config.trace else None
    return BudgetReport(
        model_source=source, model=dims, dtype=dtype, rank=config.rank, max_loras=config.max_loras,
        target_modules=mods, modules=tuple(rows), bytes_per_adapter=per_slot, total_slot_bytes=total_slots,
        max_cpu_loras=cpu_loras, cpu_cache_bytes=cpu_adapters * per_slot, base_weight_bytes=base,
        base_weight_breakdown=breakdown, linear_weight_bytes=linear_weight_bytes(dims, dtype),
        lm_head_bytes=lm_head_bytes(dims, dtype), kv_bytes_per_token=kv_tok, gpu_name=gpu_name,
        gpu_memory_bytes=gpu_total, gpu_memory_utilization=config.gpu_memory_utilization, gpu_budget_bytes=budget,
        kv_available_bytes=available, block_size=config.block_size, max_model_len=max_len, kv_tokens=tokens,
        kv_blocks=tokens // config.block_size, max_concurrent_sequences=seqs, fits=shortfall == 0,
        shortfall_bytes=shortfall, adapters=adapters, trace=trace, notes=tuple(notes),
        max_cpu_lora_bytes=cpu_bytes, cpu_cache_adapters=cpu_adapters, lora_dtype=lora_dtype,
    )  # fmt: skip


def cpu_cache_adapters(max_cpu_loras: int, max_cpu_lora_bytes: int, adapter_bytes: int) -> int:
    """Adapters of `adapter_bytes` each that the engine's CPU tier holds (engine.lora.manager): `max_cpu_loras`,
    or more while they total at most `max_cpu_lora_bytes`."""
    return max(max_cpu_loras, max_cpu_lora_bytes // adapter_bytes if adapter_bytes > 0 else 0)


def _adapter_row(path: str, dims: ModelDims, config: BudgetConfig, dtype: str, per_slot: int) -> AdapterRow:
    facts = inspect_adapter(path, dims)
    problems = list(facts.problems)
    if facts.rank > config.rank:
        problems.append(f"rank {facts.rank} exceeds the slot rank {config.rank} (raise --rank)")
    extra = [m for m in facts.modules if m not in config.target_modules]
    if extra:
        problems.append(f"targets {', '.join(extra)}, not in --target-modules")
    at_slot = facts.num_params * dtype_bytes(dtype)
    fits = not problems
    waste = per_slot - at_slot if fits else 0
    return AdapterRow(
        path=facts.path, rank=facts.rank, modules=facts.modules, num_params=facts.num_params,
        file_dtype=facts.file_dtype, file_tensor_bytes=facts.file_tensor_bytes, bytes_at_slot_dtype=at_slot,
        slot_bytes=per_slot, padding_waste_bytes=waste, padding_waste_fraction=waste / per_slot if fits else 0.0,
        fits_slot=fits, problems=tuple(problems),
    )  # fmt: skip


def base_model_names(model: str | None, raw: dict[str, Any]) -> frozenset[str]:
    """The names a request log may use for the base model `model` (as `mlora budget --model` takes it):
    the string as given, its resolved path, its preset name, the config's `_name_or_path`, and
    the demo model's served name when it is the demo model."""
    from engine.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME

    given = (model or DEFAULT_MODEL_PRESET).strip()
    names = {given}
    path = Path(given).expanduser()
    if path.exists():
        resolved = path.resolve()
        names.add(str(resolved))
        if resolved in (DEMO_MODEL_DIR.resolve(), (DEMO_MODEL_DIR / "config.json").resolve()):
            names.add(DEMO_MODEL_NAME)
    else:
        preset = find_model_preset(given)
        if preset is not None:
            names.add(preset)
    if isinstance(raw.get("_name_or_path"), str) and raw["_name_or_path"]:
        names.add(raw["_name_or_path"])
    return frozenset(names)


def _trace_summary(
    config: BudgetConfig, per_slot: int, kv_at: Any, progress: ProgressFn | None, base_names: frozenset[str]
) -> TraceSummary:
    names = base_names | set(config.served_model_names)
    replay = replay_trace(config.trace, progress=progress, base_names=names)  # type: ignore[arg-type]
    rows = tuple(
        TraceRow(n, replay.hit_rate(n), replay.loads(n), replay.loads_per_second(n), n * per_slot)
        for n in replay.candidate_slots()
    )
    best = replay.smallest_slots_for(config.target_hit_rate)
    _, rec_tokens, rec_seqs = kv_at(best) if best is not None else (None, None, None)
    rec_fits = None if rec_seqs is None else rec_seqs >= 1
    return TraceSummary(
        path=replay.path, requests=replay.requests, adapter_requests=replay.adapter_requests,
        base_requests=replay.base_requests, distinct_adapters=replay.distinct_adapters, duration_s=replay.duration_s,
        hit_rate_definition="hits / adapter requests over the whole trace, cold first-use misses included; "
        "base-model requests (no adapter) excluded",
        target_hit_rate=config.target_hit_rate, rows=rows, recommended_max_loras=best,
        recommended_slot_bytes=None if best is None else best * per_slot, recommended_kv_tokens=rec_tokens,
        recommended_max_concurrent_sequences=rec_seqs, recommended_fits=rec_fits, best_hit_rate=replay.best_hit_rate,
        simulated_up_to=replay.exact_limit, base_model_names=tuple(sorted(names)),
    )  # fmt: skip


# --------------------------------------------------------------------------- adapters on disk

_LORA_KEY = re.compile(r"layers\.(\d+)\..*?\b(" + "|".join(LORA_MODULES) + r")\.lora_(A|B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterFacts:
    """What a PEFT LoRA adapter holds, read from adapter_config.json and the safetensors header only."""

    path: str
    rank: int  # max rank over modules (the slot rank it needs)
    modules: tuple[str, ...]
    layers: int  # distinct layer indices carrying LoRA
    num_params: int  # elements of all lora_A / lora_B tensors
    file_dtype: str
    file_tensor_bytes: int  # bytes of the LoRA tensors as stored
    problems: tuple[str, ...]  # shape/layer mismatches against the base model


def inspect_adapter(path: str | os.PathLike[str], dims: ModelDims) -> AdapterFacts:
    """Read an adapter dir (adapter_config.json + adapter_model.safetensors) without loading weights."""
    root = Path(path).expanduser()
    file = root / "adapter_model.safetensors" if root.is_dir() else root
    if not file.is_file():
        bin_hint = " (.bin adapters are not read: re-save with safe_serialization=True)" if (root / "adapter_model.bin").exists() else ""
        raise ConfigError(f"no adapter_model.safetensors in {str(root)!r}{bin_hint}")
    # The adapter loader's own header reader: bounds-checked (length, shapes, dtypes, offsets), regular files only.
    from engine.adapters.files import read_safetensors_header
    from engine.errors import AdapterError

    try:
        header = read_safetensors_header(file)
    except AdapterError as exc:
        raise ConfigError(f"adapter {str(root)!r}: {exc.message}") from None
    shapes: dict[tuple[int, str, str], list[int]] = {}
    num_params = file_bytes = 0
    file_dtypes: set[str] = set()
    for key, meta in header.items():
        m = _LORA_KEY.search(key)
        if m is None:
            continue
        shape = list(meta.shape)
        shapes[(int(m.group(1)), m.group(2), m.group(3))] = shape
        num_params += prod(shape)
        file_bytes += meta.nbytes
        file_dtypes.add(meta.dtype)
    if not shapes:
        raise ConfigError(f"{str(file)!r} holds no LoRA tensors (no '*.lora_A.weight' / '*.lora_B.weight' keys)")
    problems: list[str] = []
    ranks: list[int] = []
    for (layer, module, kind), shape in sorted(shapes.items()):
        in_f, out_f = lora_module_shape(dims, module)
        if layer >= dims.layers:
            problems.append(f"layer {layer} does not exist (base has {dims.layers})")
        if len(shape) != 2 or (kind == "A" and shape[1] != in_f) or (kind == "B" and shape[0] != out_f):
            want = f"[r, {in_f}]" if kind == "A" else f"[{out_f}, r]"
            problems.append(f"layer {layer} {module}.lora_{kind} is {shape}, base expects {want}")
        elif kind == "A":
            ranks.append(shape[0])
    return AdapterFacts(
        path=str(root),
        rank=max(ranks, default=0),
        modules=tuple(m for m in LORA_MODULES if any(k[1] == m for k in shapes)),
        layers=len({k[0] for k in shapes}),
        num_params=num_params,
        file_dtype="/".join(sorted(file_dtypes)),
        file_tensor_bytes=file_bytes,
        problems=tuple(dict.fromkeys(problems))[:5],
    )


__all__ = [
    "AdapterFacts",
    "AdapterRow",
    "BudgetConfig",
    "BudgetReport",
    "ModuleRow",
    "TraceRow",
    "TraceSummary",
    "inspect_adapter",
    "plan_budget",
]
