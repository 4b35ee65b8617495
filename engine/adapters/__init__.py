"""PEFT LoRA adapters: parse, validate, normalise to per-(layer, module) A/B + scaling.

    from engine.adapters import load_adapter, validate_adapter, check_servable
    adapter = load_adapter("path/or/org-name")      # AdapterError if unreadable
    check_servable(adapter)                         # AdapterError if a slot cannot serve it
    adapter.modules[(3, "q_proj")].delta_weight()   # scaling * B @ A, [out, in]
"""

from __future__ import annotations

from engine.adapters.config import SERVABLE_MODULES, AdapterConfig, parse_adapter_config
from engine.adapters.loader import LoraAdapter, LoraModuleWeights, check_servable, load_adapter
from engine.adapters.validate import Check, ValidationReport, validate_adapter

__all__ = [
    "AdapterConfig",
    "Check",
    "LoraAdapter",
    "LoraModuleWeights",
    "SERVABLE_MODULES",
    "ValidationReport",
    "check_servable",
    "load_adapter",
    "parse_adapter_config",
    "validate_adapter",
]
