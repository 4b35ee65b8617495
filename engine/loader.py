"""Find a model (local dir, hub id or the built-in demo), read its config, tokenizer and weights.

Weights come from safetensors only (single file or a sharded `model.safetensors.index.json`):
they are memory-mapped and read tensor by tensor, never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

SUPPORTED_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def demo_model_dir() -> Path:
    """The built-in demo model's directory (shipped as package data by the demo issue)."""
    try:
        from engine.demo import DEMO_MODEL_DIR
    except ImportError as e:
        raise ConfigError("no model given and the built-in demo model is not installed", hint="pass --model") from e
    if not (Path(DEMO_MODEL_DIR) / "config.json").is_file():
        raise ConfigError("no model given and the built-in demo model's files are missing", hint="pass --model")
    return Path(DEMO_MODEL_DIR)


def demo_adapters() -> dict[str, Path]:
    """The demo model's adapters (name -> directory) that are present."""
    try:
        from engine.demo import DEMO_ADAPTERS
    except ImportError:
        return {}
    return {n: Path(p) for n, p in DEMO_ADAPTERS.items() if (Path(p) / "adapter_config.json").is_file()}


def resolve_model_path(model: str | None, *, revision: str | None = None) -> Path:
    """A local directory for `model`: an existing path, else a hub id via huggingface_hub. None, or the
    demo model's name (what the shipped demo adapters give as base_model_name_or_path), is the demo model."""
    from engine.demo import DEMO_MODEL_NAME

    if model is None:
        return demo_model_dir()
    path = Path(model).expanduser()
    if model == DEMO_MODEL_NAME and not path.exists():
        return demo_model_dir()
    if path.exists():
        if path.is_file() and path.name == "config.json":
            path = path.parent
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"model path {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model, revision=revision, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as e:  # network, auth, unknown repo: one line for the user
        raise ConfigError(f"cannot fetch model {model!r} from the Hugging Face Hub: {type(e).__name__}: {e}") from e
    return Path(local)


def load_hf_config(path: Path, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of the model in `path`, with a clear error for unsupported ones."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"cannot read the model config in {path}: {e}") from e
    arch = model_arch(cfg)
    if arch is None:
        names = ", ".join(getattr(cfg, "architectures", None) or [getattr(cfg, "model_type", "?")])
        raise ConfigError(
            f"unsupported model architecture {names}",
            hint="mlora serves Llama-family decoders: " + ", ".join(SUPPORTED_ARCHS),
        )
    return cfg


def model_arch(cfg: Any) -> str | None:
    """'llama' | 'mistral' | 'qwen2' | 'qwen3' for a supported config, else None."""
    for name in getattr(cfg, "architectures", None) or []:
        if name in SUPPORTED_ARCHS:
            return SUPPORTED_ARCHS[name]
    if not getattr(cfg, "architectures", None) and getattr(cfg, "model_type", None) in SUPPORTED_ARCHS.values():
        return cfg.model_type
    return None


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"cannot load the tokenizer in {path}: {e}") from e


def weight_files(path: Path) -> list[Path]:
    """The safetensors files holding the model's weights (sharded index honoured)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"malformed {index}: {e}") from e
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"weight shard(s) missing in {path}: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise ConfigError(
        f"no safetensors weights in {path}",
        hint="mlora loads only .safetensors (convert .bin checkpoints with transformers' save_pretrained)",
    )


def iter_weights(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every weight in the model directory, memory-mapped."""
    from safetensors import safe_open

    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"cannot read weights from {file}: {e}") from e
