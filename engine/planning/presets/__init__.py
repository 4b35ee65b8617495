"""Built-in model and GPU presets for `mlora budget`, stored as JSON data next to this file.

A model preset is the public `config.json` facts of a popular base model (the fields
`engine.planning.budget.ModelDims.from_hf_config` reads), so the budget math runs offline. `gpus.json`
holds each GPU's total memory in bytes as the driver reports it (nvidia-smi `memory.total`).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

_DIR = Path(__file__).resolve().parent
_GPU_FILE = "gpus.json"

DEFAULT_MODEL_PRESET = "llama-3.1-8b"
DEFAULT_GPU_PRESET = "H100-80GB"


def model_preset_names() -> list[str]:
    """Names of the built-in model presets, sorted (e.g. `llama-3.1-8b`, `qwen3-8b`)."""
    return sorted(p.stem for p in _DIR.glob("*.json") if p.name != _GPU_FILE)


def find_model_preset(name: str) -> str | None:
    """The canonical preset name matching `name` case-insensitively, or None."""
    wanted = name.strip().lower()
    for known in model_preset_names():
        if known == wanted:
            return known
    return None


def load_model_preset(name: str) -> dict[str, Any]:
    """The config dict of model preset `name` (case-insensitive); ConfigError listing known ones."""
    known = find_model_preset(name)
    if known is None:
        raise ConfigError(
            f"unknown model preset {name!r}; known presets: {', '.join(model_preset_names())}",
            hint="or pass a local model dir, a config.json path, or a Hugging Face hub id",
        )
    return dict(_read_json(known + ".json"))


@lru_cache(maxsize=None)
def _read_json(filename: str) -> dict[str, Any]:
    with open(_DIR / filename, encoding="utf-8") as f:
        return json.load(f)


def gpu_preset_names() -> list[str]:
    """Names of the built-in GPU presets (e.g. `H100-80GB`, `L4`)."""
    return [k for k in _read_json(_GPU_FILE) if not k.startswith("_")]


def gpu_memory_bytes(name: str) -> int:
    """Total memory in bytes of GPU preset `name` (case-insensitive); ConfigError listing known ones."""
    wanted = name.strip().lower()
    for known in gpu_preset_names():
        if known.lower() == wanted:
            return int(_read_json(_GPU_FILE)[known]["memory_bytes"])
    raise ConfigError(
        f"unknown GPU preset {name!r}; known GPUs: {', '.join(gpu_preset_names())}",
        hint="or give the memory directly with --gpu-memory GIB",
    )


def resolve_model_config(model: str | None) -> tuple[dict[str, Any], str]:
    """The config dict for `model` and where it came from, trying in order: a local model dir or
    config.json path, a preset name, then a Hugging Face hub id (config.json only). None = default preset.
    """
    model = (model or DEFAULT_MODEL_PRESET).strip()
    path = Path(model).expanduser()
    if path.exists():
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no config.json in {str(path)!r}", hint="pass a model dir that holds config.json")
        return _read_config_file(file), str(file)
    preset = find_model_preset(model)
    if preset is not None:
        return load_model_preset(preset), f"preset {preset}"
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return _hub_config(model), f"hub {model}"
    raise ConfigError(
        f"unknown model {model!r}: not a local path, a preset ({', '.join(model_preset_names())}) or a hub id",
        hint="pass a local model dir, a config.json path, a preset name, or a hub id like org/name",
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_config_file(file: Path) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read model config {str(file)!r}: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"cannot read model config {str(file)!r}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model config {str(file)!r} is not a JSON object")
    return data


def _hub_config(repo_id: str) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(repo_id=repo_id, filename="config.json")
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing repo: all one line for the user
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise ConfigError(
            f"cannot fetch config.json of hub model {repo_id!r}: {type(exc).__name__}: {first}",
            hint=f"offline or gated? pass a local model dir or config.json, or a preset: {', '.join(model_preset_names())}",
        ) from None
    return _read_config_file(Path(file))


__all__ = [
    "DEFAULT_GPU_PRESET",
    "DEFAULT_MODEL_PRESET",
    "find_model_preset",
    "gpu_memory_bytes",
    "gpu_preset_names",
    "load_model_preset",
    "model_preset_names",
    "resolve_model_config",
]
