"""`mlora merge`: bake LoRA adapters into the base weights exactly as PEFT's merge_and_unload would,
streaming shard by shard, and optionally prove the result (`--verify`).

    from engine.merge import AdapterSpec, MergeConfig, merge_adapter
    report = merge_adapter(MergeConfig(base="model-dir", adapters=(AdapterSpec("a", 0.7), AdapterSpec("b", 0.3)), out=Path("merged")))
"""

from __future__ import annotations

from engine.merge.config import AdapterSpec, MergeConfig, MergeReport, VerifyResult, peak_rss_bytes
from engine.merge.run import MergeProgress, merge_adapter

__all__ = ["AdapterSpec", "MergeConfig", "MergeProgress", "MergeReport", "VerifyResult", "merge_adapter", "peak_rss_bytes"]
