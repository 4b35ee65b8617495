"""LoRA serving state: device weight slots (`LoraSlots`, torch) and the adapter tiers
(`AdapterCache`, torch-free: device slots <- CPU cache <- disk).

Names are imported lazily so that `engine.lora.manager` can be imported (and tested)
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AdapterCache", "CacheStats", "LoraSlots", "PreparedAdapter", "apply_dora"]

_LAZY = {
    "AdapterCache": "engine.lora.manager",
    "CacheStats": "engine.lora.manager",
    "LoraSlots": "engine.lora.slots",
    "PreparedAdapter": "engine.lora.slots",
    "apply_dora": "engine.lora.slots",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine.lora' has no attribute {name!r}")
