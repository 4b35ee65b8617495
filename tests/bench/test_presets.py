"""Preset models and adapters: deterministic, cached, and in the real HF / PEFT formats."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import engine.bench.presets as presets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLORA_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_preset_is_a_loadable_llama_built_once(cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = presets.build_preset_model("tiny")
    assert path.parent == cache and path.name.startswith("tiny-")
    cfg = json.loads((path / "config.json").read_text())
    for key, value in presets.PRESETS["tiny"].items():
        assert cfg[key] == value
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert presets.build_preset_model("tiny") == path  # cached: not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok("hello", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], presets.PRESETS["tiny"]["vocab_size"])


def test_preset_weights_are_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("MLORA_BENCH_CACHE", str(tmp_path / "a"))
    a = load_file(str(presets.build_preset_model("tiny") / "model.safetensors"))
    monkeypatch.setenv("MLORA_BENCH_CACHE", str(tmp_path / "b"))
    b = load_file(str(presets.build_preset_model("tiny") / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_preset_is_a_config_error():
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="tiny"):
        presets.preset_config_dict("huge")


def test_adapters_without_peft_match_peft_files_exactly(cache, monkeypatch):
    model = presets.build_preset_model("tiny")
    with_peft = presets.build_adapters(model, rank=4, count=2, seed=5)
    monkeypatch.setattr(presets, "_peft_available", lambda: False)
    monkeypatch.setattr(presets, "cache_root", lambda: cache / "direct")
    direct = presets.build_adapters(model, rank=4, count=2, seed=5)
    for p, d in zip(with_peft, direct):
        tp, td = load_file(str(p / "adapter_model.safetensors")), load_file(str(d / "adapter_model.safetensors"))
        assert tp.keys() == td.keys()
        assert all(torch.equal(tp[k], td[k]) for k in tp)  # same keys, shapes and seeded values
        cp, cd = (json.loads((x / "adapter_config.json").read_text()) for x in (p, d))
        for key in ("r", "lora_alpha", "target_modules", "peft_type", "task_type", "use_rslora", "use_dora", "bias"):
            assert (sorted(cp[key]) if key == "target_modules" else cp[key]) == (
                sorted(cd[key]) if key == "target_modules" else cd[key]
            ), key
    a0, a1 = (load_file(str(p / "adapter_model.safetensors")) for p in with_peft)
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)  # distinct adapters


def test_adapters_change_the_output_the_way_peft_says(cache, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = presets.build_preset_model("tiny")
    monkeypatch.setattr(presets, "_peft_available", lambda: False)
    (adapter,) = presets.build_adapters(model_dir, rank=4, count=1)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, str(adapter))
        out = peft_model(ids).logits
    assert not torch.allclose(ref, out, atol=1e-3)  # PEFT reads the directly written file and applies it
    assert presets.build_adapters(model_dir, rank=4, count=1) == [adapter]
