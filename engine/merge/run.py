"""`merge_adapter`: plan, stream shard by shard into a staging directory, verify, publish.

Peak memory is about one base tensor (plus its float32 working copies) plus the adapters:
each base shard is memory-mapped, each tensor is read, merged in float32, cast and appended to
the output shard before the next one is read.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Protocol

import torch

from engine.errors import AdapterError, ConfigError
from engine.merge.config import MergeConfig, MergeReport, peak_rss_bytes
from engine.merge.ops import merge_tensor
from engine.merge.plan import INDEX_NAME, MergePlan, ShardPlan, TensorPlan, build_plan
from engine.merge.writer import LOCK_NAME, Staging, StreamingSafetensorsWriter, check_output, clean_stale_staging

# Weight files of any format are never copied: the merged safetensors replace them all.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json")


class MergeProgress(Protocol):
    """Progress callbacks (the CLI draws a rich bar per shard)."""

    def start_shard(self, name: str, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def end_shard(self) -> None: ...


def merge_adapter(config: MergeConfig, progress: MergeProgress | None = None) -> MergeReport:
    """Merge `config.adapters` into `config.base` and publish the result at `config.out`.

    All input errors (missing files, wrong architecture, existing --out) are raised as MloraError
    before anything is written; a failure or interrupt later removes the staging directory, so
    `--out` either appears complete or not at all. The base directory is only ever read.
    """
    t0 = time.perf_counter()
    plan = build_plan(config)
    check_output(config.out, config.force, [plan.base_dir, *(a.path for a in plan.adapters)])
    if config.verify:
        from engine.merge.verify import check_verifiable

        check_verifiable(plan)
    report = MergeReport(
        out=config.out, base=plan.base_dir, dtype=config.dtype, notes=list(plan.notes), untied=plan.untie,
        adapters=[{"path": str(a.path), "weight": a.weight} for a in plan.adapters],
    )
    stale = clean_stale_staging(config.out.expanduser().absolute().parent)
    if stale:
        report.notes.append(f"removed {len(stale)} staging director{'y' if len(stale) == 1 else 'ies'} left by "
                            "earlier interrupted merges")
    try:
        staging = Staging(config.out)
    except OSError as e:
        raise ConfigError(f"cannot create the output directory next to {config.out}: {e.strerror or e}") from None
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for shard in plan.shards:
            written = _write_shard(plan, shard, staging.dir / shard.name, report, progress)
            total += written
            weight_map.update({t.name: shard.name for t in shard.tensors})
        if plan.sharded:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        _copy_other_files(plan.base_dir, staging.dir)
        _write_config(plan, config, staging.dir)
        outputs = [f for f in staging.dir.iterdir() if f.name != LOCK_NAME]
        report.bytes_written = sum(f.stat().st_size for f in outputs if f.is_file())
        report.files = sorted(f.name for f in outputs)
        report.peak_rss_bytes = peak_rss_bytes()
        if config.verify:
            from engine.merge.verify import verify_merge

            report.verify = verify_merge(plan, staging.dir, config.tolerance, config.dtype)
            if not report.verify.passed:
                v = report.verify
                raise ConfigError(
                    f"verify failed: max abs logit difference {v.max_abs_diff:.3g} > tolerance {v.tolerance:.3g} "
                    f"({v.method}, {v.prompts} prompts); nothing was written to {config.out}"
                )
        staging.publish()
    except OSError as e:  # disk full, permissions, a vanished file: one line, and no half-written --out
        staging.discard()
        raise ConfigError(f"writing the merged model failed: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from None
    except BaseException:
        staging.discard()
        raise
    report.seconds = time.perf_counter() - t0
    return report


def _write_shard(plan: MergePlan, shard: ShardPlan, target: Path, report: MergeReport, progress: MergeProgress | None) -> int:
    from safetensors import SafetensorError, safe_open

    entries = [(t.name, t.dtype, t.src_meta.shape) for t in shard.tensors]
    with safe_open(str(shard.path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
    writer = StreamingSafetensorsWriter(target, entries, {"format": "pt", **metadata})
    if progress:
        progress.start_shard(shard.name, writer.data_bytes)
    try:
        for t in shard.tensors:
            # A fresh memory map per tensor: pages of a mapping stay resident (and count in RSS)
            # while it is open, so holding one map per shard would cost a whole shard of memory.
            try:
                with safe_open(str(shard.path), framework="pt", device="cpu") as f:
                    base = f.get_tensor(t.source)
            except SafetensorError as e:
                raise ConfigError(f"cannot read {t.source} from the base shard {shard.path}: {e}") from None
            tensor = _merged(plan, t, base, report)
            del base
            n = writer.write(t.name, tensor)
            del tensor
            if t.contributions or t.dtype != t.src_meta.dtype:
                _trim_heap()
            report.tensors += 1
            if progress:
                progress.advance(n)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if progress:
        progress.end_shard()
    report.shards += 1
    return writer.data_bytes


def _merged(plan: MergePlan, t: TensorPlan, base: torch.Tensor, report: MergeReport) -> torch.Tensor:
    """The output tensor for plan entry `t` from its base tensor (untouched ones pass through)."""
    out_dtype = getattr(torch, t.dtype)
    if not t.contributions:
        return base if base.dtype == out_dtype else base.to(out_dtype)
    adapters = plan.adapters
    merged = merge_tensor(base.float(), t.contributions, lambda i, k: adapters[i].file.get(k))
    if not torch.isfinite(merged).all():
        raise AdapterError(f"{t.name}: the merged tensor has NaN/Inf values: the adapter seems broken")
    report.tensors_merged += 1
    for c in t.contributions:
        if c.kind == "base":
            continue
        kind = "dora" if c.is_dora else c.kind
        attr = {"lora": "lora_modules", "dora": "dora_modules", "embedding": "embedding_modules",
                "bias": "bias_modules", "replace": "replaced_tensors"}[kind]  # fmt: skip
        setattr(report, attr, getattr(report, attr) + 1)
    return merged.to(out_dtype)


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed mid-size blocks, e.g. 16 MB float32
    temporaries of a merge, in its heap, so without this RSS creeps up by a few tensors per shard)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _copy_other_files(base_dir: Path, dest: Path) -> None:
    """config, generation config, tokenizer files and anything else that is not a weight file."""
    for p in sorted(base_dir.iterdir()):
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name != "config.json":
            shutil.copy2(p, dest / p.name)


def _write_config(plan: MergePlan, config: MergeConfig, dest: Path) -> None:
    cfg = dict(plan.base_config)
    if plan.untie:
        cfg["tie_word_embeddings"] = False
    if config.dtype != "auto":
        cfg["dtype"] = config.dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = config.dtype
    cfg["mlora_merged_adapters"] = [{"path": str(a.path), "weight": a.weight} for a in plan.adapters]
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
