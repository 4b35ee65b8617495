"""EngineStats: point-in-time engine counters.

A module of its own so that `EngineCore` (engine.core) and the LoRA layer (engine.lora.engine), which both fill
it, can import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """Point-in-time engine counters, read by `/metrics` (engine.server.metrics) and `mlora bench`."""

    num_running: int = 0
    num_waiting: int = 0
    running_by_adapter: dict[str, int] = field(default_factory=dict)
    waiting_by_adapter: dict[str, int] = field(default_factory=dict)
    kv_free_blocks: int = 0
    kv_total_blocks: int = 0
    lora_loads: int = 0
    lora_evictions: int = 0
    lora_load_seconds: list[float] = field(default_factory=list)  # disk -> CPU loads since the last stats()
    lora_slot_load_seconds: list[float] = field(default_factory=list)  # CPU -> device slot writes since then
    resident_adapters: list[str] = field(default_factory=list)
    max_loras: int = 0
    num_preemptions: int = 0
    tenant_service: dict[str, float] = field(default_factory=dict)  # tenant -> fair-share counter (weighted)
    tenant_prompt_tokens: dict[str, int] = field(default_factory=dict)  # tenant -> prompt tokens admitted
    tenant_output_tokens: dict[str, int] = field(default_factory=dict)  # tenant -> tokens generated
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (vLLM's counter, cumulative)
    prefix_cache_hits: int = 0  # of those, tokens served from it
