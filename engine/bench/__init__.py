"""`mlora bench`: mixed-adapter batches vs homogeneous ones, vs the base model, vs the alternatives.

presets    built-in seeded models (`tiny`, `small`) and seeded PEFT adapters, cached on disk
workloads  base / homogeneous / mixed-N / churn request lists (pure Python)
runner     runs them on the engine (offline or Poisson arrivals) and the alternatives
stats      per-workload numbers from request timestamps (pure Python)
report     ratios, traffic bounds, efficiency, JSON, rich table, plot
"""

from __future__ import annotations

from engine.bench.config import BenchConfig

__all__ = ["BenchConfig"]
