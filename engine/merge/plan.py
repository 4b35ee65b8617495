"""Plan a merge before writing a byte: read every header, map every adapter tensor to the base
tensor it changes, and check every shape, so that all user errors surface up front.

Only safetensors headers and adapter metadata are read here; tensor data is read later, shard by
shard. Adapter files are read with engine.adapters' defensive readers (never unpickled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.adapters.config import BASE_CHANGING_INITS, AdapterConfig, parse_adapter_config
from engine.adapters.files import (
    TensorMeta, WeightsFile, find_weights_file, read_adapter_config_json, read_safetensors_header,
    resolve_adapter_dir,
)
from engine.adapters.keys import parse_lora_key, strip_prefix
from engine.adapters.loader import check_module_shapes
from engine.adapters.servable import _VARIANT_FIELDS, dora_magnitude_issue, dtype_issue
from engine.errors import AdapterError, ConfigError, MloraError
from engine.merge.config import MergeConfig
from engine.merge.keys import LM_HEAD, BaseKeys, full_tensor_target
from engine.merge.ops import Contribution

INDEX_NAME = "model.safetensors.index.json"


@dataclass
class AdapterSource:
    """One adapter to merge: where it is, its config, its lazily read weights and its weight."""

    path: Path
    weight: float
    config: AdapterConfig
    file: WeightsFile


@dataclass
class TensorPlan:
    """One output tensor: read `source` from the base, apply `contributions`, write as `dtype`."""

    name: str
    source: str
    src_meta: TensorMeta
    dtype: str  # torch dtype name written
    contributions: tuple[Contribution, ...] = ()


@dataclass
class ShardPlan:
    name: str  # file name, same as the base's
    path: Path  # the base shard
    tensors: list[TensorPlan] = field(default_factory=list)


@dataclass
class MergePlan:
    base_dir: Path
    base_config: dict[str, Any]
    adapters: list[AdapterSource]
    shards: list[ShardPlan]
    sharded: bool  # the base has an index: write one too
    untie: bool = False
    notes: list[str] = field(default_factory=list)


def _base_files(base_dir: Path) -> tuple[list[Path], bool]:
    from engine.loader import weight_files

    return weight_files(base_dir), (base_dir / INDEX_NAME).is_file()


def _read_config(base_dir: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {base_dir / 'config.json'}: {str(e).splitlines()[0][:200]}") from None
    except RecursionError:
        raise ConfigError(f"cannot read {base_dir / 'config.json'}: not valid JSON (nested too deeply)") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{base_dir / 'config.json'} does not hold a JSON object")
    return cfg


def _refuse_unsupported(cfg: AdapterConfig, where: Path) -> None:
    for name, label in _VARIANT_FIELDS.items():
        if cfg.raw.get(name):
            raise AdapterError(f"{where}: {label} ({name}) is not a plain LoRA; mlora merge cannot bake it in")
    init = cfg.init_lora_weights
    if isinstance(init, str) and any(init.lower().startswith(p) for p in BASE_CHANGING_INITS):
        raise AdapterError(
            f"{where}: init_lora_weights={init!r} rewrote the base weights during training; merging onto the original "
            "base would be wrong",
            hint="convert it with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) first",
        )


def _open_adapter(path: str, weight: float) -> AdapterSource:
    adir = resolve_adapter_dir(path)
    cfg = parse_adapter_config(read_adapter_config_json(adir))
    if cfg.r <= 0 or any(v <= 0 for v in cfg.rank_pattern.values()):
        raise AdapterError(f"{adir}: r must be > 0 (r={cfg.r}, rank_pattern={cfg.rank_pattern})")
    _refuse_unsupported(cfg, adir)
    wf = WeightsFile(find_weights_file(adir))
    # What validate and the engine refuse for these two, merge refuses too (same rules, engine.adapters.servable):
    # integer/bool/float8 LoRA tensors would be merged as if they were weights, and use_dora without a module's
    # magnitude vector would be merged as plain LoRA.
    lora_dtypes = (wf.meta[k].dtype for k in wf.keys() if parse_lora_key(k) is not None)
    issue = dtype_issue(lora_dtypes) or dora_magnitude_issue(cfg, wf.keys())
    if issue:
        wf.close()
        raise AdapterError(f"{adir}: {issue}")
    return AdapterSource(path=adir, weight=float(weight), config=cfg, file=wf)


def _mismatch(module: str, want: tuple[int, ...], got: tuple[int, ...]) -> AdapterError:
    return AdapterError(
        f"{module}: the adapter expects a base tensor of shape {list(want)} but the base has {list(got)}: "
        "this adapter was trained for a different base model"
    )


def _contributions(i: int, src: AdapterSource, bk: BaseKeys, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, Contribution]]:
    """(base key, contribution) for every tensor adapter `i` changes; AdapterError if one does not fit."""
    cfg, wf, w = src.config, src.file, src.weight
    groups: dict[str, dict[str, str]] = {}
    out: list[tuple[str, Contribution]] = []
    for key in wf.keys():
        lk = parse_lora_key(key)
        if lk is not None:
            groups.setdefault(lk.module_path, {})[lk.role] = key
            continue
        target = full_tensor_target(key)
        if target is None:
            raise AdapterError(f"{wf.path.name}: tensor {key!r} is not LoRA, a saved module or a bias; mlora merge cannot apply it")
        base = _resolve(bk, target, wf.path.name, key)
        kind = "base" if ".base_layer." in key else "replace"
        out.append((base, Contribution(i, w, kind, (key,), module=strip_prefix(key))))
    for module, roles in sorted(groups.items()):
        emb = "embedding_A" in roles or "embedding_B" in roles
        role_a, role_b = ("embedding_A", "embedding_B") if emb else ("A", "B")
        ka, kb = roles.get(role_a), roles.get(role_b)
        # A [r, in] and B [out, r] for linears; A [r, vocab] and B [dim, r] for embeddings
        rshapes = {r: tuple(wf.shape(roles[k])) for r, k in (("A", role_a), ("B", role_b), ("magnitude", "magnitude"), ("bias", "bias")) if k in roles}
        problem = check_module_shapes(cfg, module, rshapes)
        if problem:
            raise AdapterError(f"{wf.path.name}: {problem}")
        scaling = cfg.scaling_for(module)
        (_, n_in), (n_out, _) = rshapes["A"], rshapes["B"]
        wkey = _resolve(bk, module + ".weight", wf.path.name, ka)
        got = shapes[wkey]
        if emb:
            if "magnitude" in roles or "bias" in roles:
                raise AdapterError(f"{module}: DoRA or lora_bias on an embedding layer is not supported by mlora merge")
            if got != (n_in, n_out):
                raise _mismatch(module, (n_in, n_out), got)
            out.append((wkey, Contribution(i, w, "embedding", (ka, kb), scaling, module=module)))
            continue
        fifo = cfg.fan_in_fan_out
        if not fifo and n_in != n_out and got == (n_in, n_out):
            fifo = True  # a Conv1D ([in, out]) layer: PEFT forces fan_in_fan_out=True for it at load time too
        want = (n_in, n_out) if fifo else (n_out, n_in)
        if len(got) != 2 or got != want:
            raise _mismatch(module, want, got)
        keys = (ka, kb, roles["magnitude"]) if "magnitude" in roles else (ka, kb)
        out.append((wkey, Contribution(i, w, "lora", keys, scaling, fifo, module)))
        if "bias" in roles:
            bkey = bk.resolve(module + ".bias")
            if bkey is None:
                raise AdapterError(f"{module}: the adapter has lora_bias but the base layer has no bias (PEFT refuses this too)")
            if shapes[bkey] != (n_out,):
                raise _mismatch(module + ".bias", (n_out,), shapes[bkey])
            out.append((bkey, Contribution(i, w, "bias", (roles["bias"],), scaling, module=module)))
    return out


def _resolve(bk: BaseKeys, name: str, file: str, adapter_key: str) -> str:
    hit = bk.resolve(name)
    if hit is None and name.endswith(LM_HEAD) and bk.input_embedding() is not None:
        return LM_HEAD  # a tied lm_head: it is the input embedding in the checkpoint
    if hit is None:
        raise AdapterError(
            f"{file}: {adapter_key!r} changes {name!r}, which the base model does not have: "
            "this adapter was trained for a different base model"
        )
    return hit


def build_plan(config: MergeConfig) -> MergePlan:
    """Everything `merge_adapter` needs, checked; raises MloraError on any bad input."""
    from engine.loader import resolve_model_path

    base_dir = resolve_model_path(config.base)
    base_cfg = _read_config(base_dir)
    files, sharded = _base_files(base_dir)
    metas: dict[str, tuple[Path, TensorMeta]] = {}
    order: dict[Path, list[str]] = {}
    for f in files:
        try:
            header = read_safetensors_header(f)
        except MloraError as e:
            raise ConfigError(f"base model weights: {e.message}") from None
        for k, m in header.items():
            if k in metas:
                raise ConfigError(f"base model weights: tensor {k!r} is in both {metas[k][0].name} and {f.name}")
            metas[k] = (f, m)
        order[f] = list(header)
    bk = BaseKeys(metas)
    shapes = {k: m.shape for k, (_, m) in metas.items()}
    emb = bk.input_embedding()
    if emb is not None and LM_HEAD not in metas:
        shapes[LM_HEAD] = shapes[emb]

    adapters = [_open_adapter(a.path, a.weight) for a in config.adapters]
    by_key: dict[str, list[Contribution]] = {}
    for i, src in enumerate(adapters):
        seen: set[tuple[str, str]] = set()
        for key, c in _contributions(i, src, bk, shapes):
            tag = c.kind if c.kind in ("bias", "base") else "tensor"
            if (key, tag) in seen:
                raise AdapterError(f"{src.path}: two entries change {key} (e.g. LoRA and modules_to_save on one module)")
            seen.add((key, tag))
            by_key.setdefault(key, []).append(c)

    def dtype_of(meta: TensorMeta) -> str:
        floating = meta.dtype in ("float32", "float16", "bfloat16", "float64")
        return config.dtype if config.dtype != "auto" and floating else meta.dtype

    for key in by_key:
        if key in metas and metas[key][1].dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise AdapterError(f"{key}: the base tensor is {metas[key][1].dtype} (quantised?); mlora merge needs float weights")

    plan = MergePlan(base_dir=base_dir, base_config=base_cfg, adapters=adapters, shards=[], sharded=sharded)
    tied_cfg = base_cfg.get("tie_word_embeddings", LM_HEAD not in metas)
    untie = bool(tied_cfg) and emb is not None and (LM_HEAD in by_key or emb in by_key)
    for f in files:
        shard = ShardPlan(name=f.name, path=f)
        for k in order[f]:
            meta = metas[k][1]
            shard.tensors.append(TensorPlan(k, k, meta, dtype_of(meta), tuple(by_key.get(k, ()))))
            if untie and k == emb and LM_HEAD not in metas:  # give lm_head its own copy, next to the embedding
                shard.tensors.append(TensorPlan(LM_HEAD, emb, meta, dtype_of(meta), tuple(by_key.get(LM_HEAD, ()))))
        plan.shards.append(shard)
    if untie:
        plan.untie = True
        what = "lm_head" if LM_HEAD in by_key else "the input embedding"
        plan.notes.append(
            f"the base ties lm_head to the input embedding and the adapter changes {what}: the output is untied "
            "(tie_word_embeddings=false, lm_head.weight written), which keeps the adapted model's behaviour"
        )
    for c in (c for cs in by_key.values() for c in cs):
        if c.kind == "replace" and c.weight != 1.0:
            plan.notes.append("a weight != 1 on a replaced module (modules_to_save) interpolates: base + w * (trained - base)")
            break
    planned = {t.name for sh in plan.shards for t in sh.tensors}
    lost = sorted(set(by_key) - planned)
    if lost:
        raise AdapterError(f"the base checkpoint has no tensor {lost[0]} to merge into (tie_word_embeddings is false)")
    return plan
