"""The one map from a dtype name to a torch dtype (names as engine.config.dtype_name normalises them)."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """`torch_dtype("bfloat16")` -> torch.bfloat16; KeyError for a name outside TORCH_DTYPES."""
    return TORCH_DTYPES[name]
