"""What `mlora merge` is asked to do (MergeConfig) and what it did (MergeReport)."""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.config import dtype_name
from engine.errors import ConfigError, UsageError

DTYPES = ("auto", "float32", "float16", "bfloat16")

# Default --verify tolerance on the max abs logit difference, by output dtype: merging rounds each
# merged weight to the output dtype once, which moves logits by about that dtype's epsilon times
# their magnitude (measured on the tiny test models: fp32 ~1e-6, bf16 ~1e-2).
DEFAULT_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2.5e-1}


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to merge and the weight of its delta: W' = W + sum_i weight_i * delta_i."""

    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not str(self.path):
            raise ConfigError("an adapter path is empty")
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not math.isfinite(self.weight):
            raise UsageError(f"--weight must be a finite number, got {self.weight!r}")


@dataclass(frozen=True)
class MergeConfig:
    """base model + weighted adapters -> a new model directory at `out`.

    `dtype` "auto" keeps each tensor's base dtype; otherwise every floating tensor is written in
    `dtype` (the merge itself is always computed in float32). `verify` compares logits of the
    merged model with base+adapter before the output is published; `tolerance` None = by dtype.
    """

    base: str
    adapters: tuple[AdapterSpec, ...]
    out: Path
    dtype: str = "auto"
    force: bool = False
    verify: bool = False
    tolerance: float | None = None

    def __post_init__(self) -> None:
        adapters = self.adapters
        if isinstance(adapters, (str, Path, AdapterSpec)):
            adapters = (adapters,)
        specs = tuple(a if isinstance(a, AdapterSpec) else AdapterSpec(str(a)) for a in adapters)
        if not str(self.base):
            raise ConfigError("a base model is required (--base)")
        if not specs:
            raise ConfigError("at least one adapter is required (--adapter)")
        dtype = dtype_name(self.dtype)
        if dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.tolerance is not None and not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise UsageError(f"--tolerance must be a number >= 0, got {self.tolerance!r}")
        object.__setattr__(self, "adapters", specs)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "out", Path(self.out))


@dataclass
class VerifyResult:
    """Max abs logit difference between the merged model and base+adapter(s) on a few prompts."""

    method: str  # "mlora-engine" or "transformers+peft"
    max_abs_diff: float
    tolerance: float
    prompts: int
    passed: bool


@dataclass
class MergeReport:
    """What a merge wrote; `to_json()` is the `--json` summary."""

    out: Path
    base: Path
    adapters: list[dict[str, Any]]
    dtype: str
    shards: int = 0
    tensors: int = 0  # tensors written
    tensors_merged: int = 0  # of those, changed by an adapter (LoRA delta, bias, or a replaced module)
    lora_modules: int = 0
    dora_modules: int = 0
    embedding_modules: int = 0
    bias_modules: int = 0
    replaced_tensors: int = 0  # modules_to_save / saved base layers
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0  # ru_maxrss of this process when the merge (not --verify) finished
    untied: bool = False
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    verify: VerifyResult | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"], d["base"] = str(self.out), str(self.base)
        return d


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Linux: VmHWM from /proc/self/status, the high-water mark of this process image. Not
    ru_maxrss there: getrusage keeps the maximum across execve(2), so a merge started from a
    large parent (e.g. a test runner holding a model) would report the parent's RSS as its own.
    Elsewhere: resource.getrusage's ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
