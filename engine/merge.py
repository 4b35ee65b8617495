"""Bake a LoRA adapter into the base weights, exactly as PEFT's `merge_and_unload()` would.

For every LoRA'd linear (PEFT's `Linear.merge`):
    plain LoRA:  W += (scaling * B @ A).to(adapter dtype)        # PEFT's get_delta_weight
    DoRA:        W' = (m / ||W + scaling * B @ A||_row) * (W + scaling * B @ A)
    lora_bias:   b += scaling * lora_B.bias
Tensors the adapter does not touch are copied bit for bit. The output directory is a normal
Hugging Face model directory (config, tokenizer, safetensors with the same shard layout).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import AdapterError, ConfigError, MloraError

_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


@dataclass(frozen=True)
class MergeConfig:
    """What `mlora merge` does: base model + adapter -> new model directory."""

    base: str
    adapter: str
    out: Path
    force: bool = False

    def __post_init__(self) -> None:
        if not str(self.base) or not str(self.adapter):
            raise ConfigError("both a base model and an adapter are required")


@dataclass
class MergeReport:
    out: Path
    merged_modules: int
    dora_modules: int
    bias_modules: int
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0


def _weight_key(layer: int, module: str) -> str:
    block = "self_attn" if module in _ATTN else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


def _merge_one(weight: torch.Tensor, bias: torch.Tensor | None, mod) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PEFT's Linear.merge for one module; returns (new weight, new bias)."""
    lora_dtype = mod.lora_b.dtype
    # get_delta_weight: (B @ A) * scaling, computed in fp32 for half dtypes, returned in the adapter dtype
    delta = ((mod.lora_b.float() @ mod.lora_a.float()) * mod.scaling).to(lora_dtype)
    if mod.magnitude is None:
        new_w = weight + delta.to(weight.dtype)
    else:  # DoRA (PEFT DoraLinearVariant.merge_safe): norm of W + delta per output row
        w32 = weight.to(delta.dtype)
        norm = torch.linalg.norm(w32 + delta, dim=1).to(w32.dtype).detach()
        factor = (mod.magnitude.to(norm.dtype) / norm).view(-1, 1)
        new_w = (factor * (w32 + delta)).to(weight.dtype)
    new_b = bias
    if mod.bias is not None:
        if bias is None:
            raise AdapterError(
                f"{mod.module_path}: the adapter has lora_bias but the base layer has no bias (PEFT refuses this too)"
            )
        new_b = bias + (mod.bias * mod.scaling).to(bias.dtype)
    return new_w, new_b


def merge_adapter(config: MergeConfig) -> MergeReport:
    """Write base+adapter merged weights to `config.out`; AdapterError/ConfigError on bad input."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from engine.adapters import load_adapter
    from engine.loader import resolve_model_path, weight_files

    base_dir = resolve_model_path(config.base)
    adapter = load_adapter(config.adapter)
    blocking = [r for r in adapter.unservable_reasons(allow_dora=True) if "lora_bias" not in r]
    if blocking:
        raise AdapterError(f"cannot merge {adapter.name!r}: " + "; ".join(blocking))
    if not adapter.modules:
        raise AdapterError(f"adapter {adapter.name!r} has no LoRA weights on decoder linears: nothing to merge")

    out = Path(config.out)
    if out.resolve() == base_dir.resolve():
        raise ConfigError("the output directory is the base model's directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not config.force:
        raise ConfigError(f"{out} exists and is not empty", hint="pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)

    pending = {(_weight_key(layer, m)): mod for (layer, m), mod in adapter.modules.items()}
    report = MergeReport(out=out, merged_modules=0, dora_modules=0, bias_modules=0)
    for file in weight_files(base_dir):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
        for prefix, mod in list(pending.items()):
            wkey = prefix + ".weight"
            if wkey not in tensors:
                continue
            weight, bkey = tensors[wkey], prefix + ".bias"
            if tuple(weight.shape) != (mod.out_features, mod.in_features):
                raise AdapterError(
                    f"{prefix}: adapter expects [{mod.out_features}, {mod.in_features}] but the base weight is "
                    f"{list(weight.shape)}: this adapter was trained for a different base model"
                )
            new_w, new_b = _merge_one(weight, tensors.get(bkey), mod)
            if not torch.isfinite(new_w).all():
                raise AdapterError(f"{prefix}: merged weight has NaN/Inf: the adapter is broken")
            tensors[wkey] = new_w.contiguous()
            if new_b is not None and mod.bias is not None:
                tensors[bkey] = new_b.contiguous()
                report.bias_modules += 1
            report.merged_modules += 1
            report.dora_modules += mod.magnitude is not None
            del pending[prefix]
        target = out / file.name
        save_file(tensors, str(target), metadata={"format": "pt", **metadata})
        report.files.append(file.name)
        report.bytes_written += target.stat().st_size
    if pending:
        missing = ", ".join(sorted(pending)[:3])
        raise AdapterError(f"the base model has no weight for {len(pending)} adapted module(s), e.g. {missing}")
    for extra in sorted(base_dir.iterdir()):
        if extra.is_file() and not extra.name.endswith(".safetensors"):
            shutil.copy2(extra, out / extra.name)
    _note_provenance(out, adapter)
    return report


def _note_provenance(out: Path, adapter) -> None:
    """Record which adapter was merged in the output config (a key transformers ignores)."""
    cfg_path = out / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise MloraError(f"cannot update {cfg_path}: {e}") from e
    cfg["mlora_merged_adapter"] = str(adapter.path)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
