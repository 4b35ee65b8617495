"""Shared fixtures: tiny real base models and real PEFT adapters, built once per test session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.tiny import build_peft_adapter, build_tiny_model


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of a tiny seeded-random model (config.json + safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("bases")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def llama_adapter(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A default PEFT LoRA (r=8, alpha=16, all seven decoder linears) for the tiny llama."""
    return build_peft_adapter(bases["llama"], tmp_path_factory.mktemp("adapters") / "llama-default", seed=1)


@pytest.fixture
def adapter_copy(llama_adapter: Path, tmp_path: Path) -> Path:
    """A private copy of the default llama adapter, for tests that corrupt it."""
    dst = tmp_path / "copy"
    shutil.copytree(llama_adapter, dst)
    return dst


def edit_config(adapter_dir: Path, **changes: object) -> None:
    """Rewrite fields of adapter_config.json (a key mapped to `...` is deleted)."""
    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))
