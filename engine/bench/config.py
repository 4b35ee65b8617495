"""BenchConfig: the one frozen configuration of a `mlora bench` run (checked in __post_init__)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from engine.errors import UsageError

QUICK_DEFAULTS = dict(num_requests=16, max_tokens=12, max_loras=4, repeat=3)
FULL_DEFAULTS = dict(num_requests=32, max_tokens=32, max_loras=16, repeat=1)


def check_positive_ints(cfg: Any, names: tuple[str, ...]) -> None:
    """Each named field of a bench config is an integer >= 1 (UsageError naming its flag otherwise)."""
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how.

    The model is `model` (a directory or hub id) or the built-in `preset` (exactly one).
    Offline runs submit every request at once; with `rate` (requests/s) requests arrive as a
    seeded Poisson process and output lengths vary (identically across workloads).
    `alternatives`: also run the `separate` (one engine per adapter; `separate=False` skips it) and
    `peft` systems.
    `peft_dtype`: the transformers + PEFT alternative's dtype (None = `dtype`), so each system can run
    in its fastest dtype on the machine (e.g. transformers is slower in bf16 than fp32 on CPU).
    `repeat`: run the engine workloads that many rounds (interleaved) and keep each one's best
    round, so one noisy-neighbour stall does not decide a ratio. `threads`: torch CPU threads for
    every system (None = torch's default, one per core).
    """

    preset: str | None = "small"
    model: str | None = None
    rank: int = 16
    max_loras: int = 16
    num_requests: int = 32
    max_tokens: int = 32
    prompt_chars: int = 32
    zipf: float | None = None
    rate: float | None = None
    device: str = "auto"
    dtype: str = "auto"
    peft_dtype: str | None = None
    alternatives: bool = True
    separate: bool = True
    churn: bool = True
    composed: bool = False  # add the composed-2 workload (each request composes 2 adapters) and its ratio to mixed-2
    quick: bool = False
    repeat: int = 1
    threads: int | None = None
    seed: int = 0
    adapters: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()
    churn_adapters: int | None = None  # adapters the churn workload cycles through (None: 2 x max_loras)

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.model is None):
            raise UsageError("give exactly one of --preset and --model")
        if self.preset is not None:
            from engine.bench.presets import preset_names

            if self.preset not in preset_names():
                raise UsageError(f"unknown preset {self.preset!r}; choose from {', '.join(preset_names())}")
        check_positive_ints(self, ("rank", "max_loras", "num_requests", "max_tokens", "prompt_chars", "repeat")
                            + (("churn_adapters",) if self.churn_adapters is not None else ()))
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UsageError(f"--threads must be an integer >= 1, got {self.threads!r}")
        for name, values in (("adapters", self.adapters), ("rank", self.ranks)):
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise UsageError(f"--{name} must be integers >= 1, got {','.join(map(str, values))}")
        if self.ranks and max(self.ranks) > self.rank:
            raise UsageError(f"adapter ranks {','.join(map(str, self.ranks))} exceed the slot rank {self.rank}")
        if self.adapters and max(self.adapters) > self.max_loras:
            raise UsageError(f"--adapters {max(self.adapters)} needs as many slots, got --max-loras {self.max_loras}")
        if self.churn_adapters is not None and self.churn_adapters <= self.max_loras:
            raise UsageError(f"--churn-adapters {self.churn_adapters} must exceed --max-loras {self.max_loras} "
                             "(churn is more adapters than device slots)")
        if self.adapters and max(self.adapters) > self.num_requests:
            raise UsageError(f"--adapters {max(self.adapters)} needs at least as many requests, "
                             f"got --num-requests {self.num_requests}")
        if self.zipf is not None and not self.zipf > 0:
            raise UsageError(f"--zipf must be > 0, got {self.zipf}")
        if self.rate is not None and not self.rate > 0:
            raise UsageError(f"--rate must be > 0 requests/s, got {self.rate}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.peft_dtype not in (None, "auto", "float32", "bfloat16", "float16"):
            raise UsageError(f"--peft-dtype must be auto, float32, bfloat16 or float16, got {self.peft_dtype!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
