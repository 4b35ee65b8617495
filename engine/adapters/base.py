"""The base model's LoRA-able linear shapes, read from its HF config.json (for `validate --base`).

Only json is read (no weights, no transformers import): `--base` may be a model directory, a
config.json file, or a Hugging Face Hub id (config.json fetched with huggingface_hub).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.adapters.files import looks_like_hub_id, read_json_file
from engine.planning.budget import LORA_MODULES, ModelDims, lora_module_shape
from engine.errors import AdapterError, ConfigError


@dataclass(frozen=True)
class BaseDims:
    """A base model's decoder dimensions (engine.planning.budget.ModelDims, the one source of truth for
    shapes) plus where they came from."""

    name: str  # what the user passed (path or hub id)
    source: str  # the config.json that was read
    dims: ModelDims
    aliases: tuple[str, ...] = ()  # other names of this base (the demo model's served name)

    @property
    def model_type(self) -> str:
        return self.dims.model_type

    @property
    def num_layers(self) -> int:
        return self.dims.layers

    @property
    def hidden(self) -> int:
        return self.dims.hidden

    @property
    def module_names(self) -> tuple[str, ...]:
        return LORA_MODULES

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one decoder linear."""
        return lora_module_shape(self.dims, module)

    def same_name(self, other: str) -> bool:
        """Whether an adapter's base_model_name_or_path plausibly names this base."""
        if any(_canon(other) == _canon(n) for n in (self.name, *self.aliases)):
            return True
        return os.path.exists(other) and _same_path(other, self.name)


def _same_path(a: str, b: str) -> bool:
    try:
        pa, pb = Path(a).resolve(), Path(b).resolve()
        return pa == pb or (pb.name == "config.json" and pa == pb.parent)
    except OSError:
        return False


def _canon(name: str) -> str:
    """'meta-llama/Llama-3.1-8B', '.../models--meta-llama--Llama-3.1-8B/snapshots/abc', '/x/Llama-3.1-8B/' -> 'llama-3.1-8b'."""
    m = re.search(r"models--[^/]+--([^/]+)", name)
    if m:
        return m.group(1).lower()
    parts = [p for p in re.split(r"[\\/]", name) if p and p != "config.json"]
    return parts[-1].lower() if parts else name.lower()


def dims_from_config(cfg: Any, *, name: str, source: str) -> BaseDims:
    """BaseDims from a decoded HF config dict; ConfigError (never another exception) if it is unusable."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source} does not hold a JSON object")
    try:
        dims = ModelDims.from_hf_config(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - odd values in a hostile config.json
        raise ConfigError(f"{source}: not a usable Llama-family config ({type(exc).__name__}: {str(exc)[:120]})") from None
    return BaseDims(name=name, source=source, dims=dims)


def read_base_dims(base: str | Path) -> BaseDims:
    """BaseDims for `base`: a model directory, its config.json, or a hub id; ConfigError if unreadable."""
    from engine.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME

    name = str(base)
    p = Path(base).expanduser()
    if name == DEMO_MODEL_NAME and not p.exists():  # the demo model by its served name
        p = DEMO_MODEL_DIR
    if p.is_dir():
        cfg_path = p / "config.json"
    elif p.exists() or os.path.lexists(p):
        cfg_path = p
    elif looks_like_hub_id(name):
        try:
            from huggingface_hub import hf_hub_download

            cfg_path = Path(hf_hub_download(repo_id=name, filename="config.json"))
        except Exception as exc:  # noqa: BLE001 - network/auth/not-found: one line for the user
            raise ConfigError(f"--base {name!r} is not a local path and its config.json could not be fetched: {type(exc).__name__}") from None
    else:
        raise ConfigError(f"--base {name}: no such model directory or config.json")
    try:
        cfg = read_json_file(cfg_path, "base config")
    except AdapterError as exc:
        raise ConfigError(f"--base {name}: {exc.message}") from None
    dims = dims_from_config(cfg, name=name, source=str(cfg_path))
    if _same_path(str(DEMO_MODEL_DIR), str(cfg_path)):  # adapters trained on the demo name it "mlora-demo"
        dims = replace(dims, aliases=(DEMO_MODEL_NAME,))
    return dims
