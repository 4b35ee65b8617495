"""PEFT's matching rules, re-implemented in engine.adapters.config, checked against PEFT's own
functions on many (config, module key) pairs; hub-id resolution without the network."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from engine.adapters import load_adapter, parse_adapter_config
from engine.adapters.config import pattern_key
from engine.adapters.files import looks_like_hub_id

KEYS = [f"model.layers.{i}.{part}.{m}" for i in (0, 1, 11) for part, m in
        [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "o_proj"), ("mlp", "down_proj"), ("mlp", "up_proj")]]
KEYS += ["lm_head", "model.embed_tokens", "model.layers.1.self_attn", "model.language_model.layers.2.self_attn.q_proj"]

CONFIGS = [
    dict(target_modules=["q_proj", "down_proj"]),
    dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1, 11]),
    dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=r".*\.(q_proj|up_proj)"),
    dict(target_modules=r"model\.layers\.1\..*proj"),
    dict(target_modules=["q_proj", "k_proj", "lm_head"], exclude_modules=["k_proj"]),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=r".*layers\.0\..*"),
    dict(target_modules=["self_attn.q_proj", "model.layers.0.mlp.down_proj"]),
    dict(target_modules=["q_proj", "up_proj"], modules_to_save=["up_proj"]),
]


def _peft_config(kw: dict):
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, **kw)


def _ours(kw: dict):
    cfg = _peft_config(kw).to_dict()
    cfg["peft_type"] = "LORA"
    cfg["target_modules"] = sorted(cfg["target_modules"]) if isinstance(cfg["target_modules"], (set, list)) else cfg["target_modules"]
    return parse_adapter_config({k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()})


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_targets_module_agrees_with_peft(kw):
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_cfg, ours = _peft_config(kw), _ours(kw)
    for key in KEYS:
        peft_says = check_target_module_exists(peft_cfg, key)
        peft_says = bool(peft_says) and type(peft_says).__name__ != "_ExcludedModule"
        assert ours.targets(key) == peft_says, (kw, key)


def test_pattern_key_agrees_with_peft_first_match_rule():
    from peft.utils.other import get_pattern_key

    patterns = ["q_proj", "layers.1.self_attn.q_proj", r"layers\.1[01]?\..*down_proj", "model.layers.0.mlp.up_proj", "proj"]
    for perm in itertools.permutations(patterns, 3):
        for key in KEYS:
            assert pattern_key(list(perm), key) == get_pattern_key(list(perm), key), (perm, key)


def test_hub_ids_are_recognised_conservatively():
    assert looks_like_hub_id("meta-llama/Llama-3.1-8B") and looks_like_hub_id("org/my_adapter.v2")
    for s in ("/abs/path", "./rel/x", "a/b/c", "../x/y", "name", "a/..", "~/x"):
        assert not looks_like_hub_id(s), s


def test_hub_id_resolves_through_snapshot_download(llama_adapter, tmp_path, monkeypatch):
    """A non-local `org/name` goes to huggingface_hub.snapshot_download (faked here: no network in tests)."""
    import huggingface_hub

    fetched = tmp_path / "snapshot"
    shutil.copytree(llama_adapter, fetched)
    calls = []

    def fake_snapshot_download(*, repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, tuple(allow_patterns)))
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # so "someorg/some-adapter" is not a local path
    adapter = load_adapter("someorg/some-adapter")
    assert calls == [("someorg/some-adapter", ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"))]
    assert adapter.path == Path(fetched) and len(adapter.modules) == 14
