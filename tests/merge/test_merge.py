"""`mlora merge` equals PEFT's merge_and_unload, tensor for tensor (PEFT is the oracle)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import AdapterError, ConfigError
from engine.merge import MergeConfig, merge_adapter
from tests.tiny import build_peft_adapter, build_tiny_model

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-bases")
    return {arch: build_tiny_model(root / arch, arch, seed=3) for arch in ("llama", "qwen2")}


def peft_merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


CASES = {
    "default": dict(arch="llama", r=8),
    "rslora_patterns": dict(arch="llama", r=8, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 5}),
    "dora": dict(arch="llama", r=4, use_dora=True),
    "attn_only_subset_layers": dict(arch="qwen2", r=4, target_modules=ATTN, layers_to_transform=[1]),
    "lora_bias_on_qkv_bias": dict(arch="qwen2", r=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_peft_merge_and_unload(case, bases, tmp_path):
    kw = dict(CASES[case])
    base = bases[kw.pop("arch")]
    adapter = build_peft_adapter(base, tmp_path / "adapter", seed=11, **kw)
    if kw.get("lora_bias"):  # PEFT inits lora_B.bias to zero; make it matter
        from safetensors.torch import save_file

        f = adapter / "adapter_model.safetensors"
        t = load_file(str(f))
        for k in t:
            if k.endswith("lora_B.bias"):
                t[k] = torch.randn(t[k].shape, generator=torch.Generator().manual_seed(5)) * 0.1
        save_file(t, str(f))
    report = merge_adapter(MergeConfig(base=str(base), adapter=str(adapter), out=tmp_path / "merged"))
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    theirs = peft_merged_state(base, adapter)
    original = load_file(str(base / "model.safetensors"))
    assert set(ours) == set(original)
    changed = 0
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=f"{case}: {name} differs from PEFT")
        changed += not torch.equal(tensor, original[name])
    assert changed >= report.merged_modules  # every LoRA'd weight really moved
    if kw.get("use_dora"):
        assert report.dora_modules == report.merged_modules
    if kw.get("lora_bias"):
        assert report.bias_modules == report.merged_modules == 6


def test_merged_directory_loads_in_transformers_and_matches_peft_logits(bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = bases["llama"]
    adapter = build_peft_adapter(base, tmp_path / "a", seed=2, r=8)
    merge_adapter(MergeConfig(base=str(base), adapter=str(adapter), out=tmp_path / "m"))
    ids = torch.tensor([[5, 9, 40, 77, 100, 3]])
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft(ids).logits, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_wrong_base_is_refused_before_writing(bases, tmp_path):
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", r=4)
    other = build_tiny_model(tmp_path / "wide", "llama", hidden_size=96, intermediate_size=128)
    with pytest.raises(AdapterError, match="different base model"):
        merge_adapter(MergeConfig(base=str(other), adapter=str(adapter), out=tmp_path / "out"))


def test_lora_bias_without_base_bias_is_refused(bases, tmp_path):
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", r=4, target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(AdapterError, match="no bias"):
        merge_adapter(MergeConfig(base=str(bases["llama"]), adapter=str(adapter), out=tmp_path / "out"))


def test_nonempty_output_needs_force(bases, tmp_path):
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", r=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        merge_adapter(MergeConfig(base=str(bases["llama"]), adapter=str(adapter), out=out))
    merge_adapter(MergeConfig(base=str(bases["llama"]), adapter=str(adapter), out=out, force=True))
    assert (out / "model.safetensors").is_file()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLORA_DEBUG"}
    return subprocess.run([sys.executable, "-m", "mlora_cli.main", "merge", *args], capture_output=True, text=True,
                          env={**env, "COLUMNS": "200"}, timeout=300)


def test_cli_merges_using_the_adapters_base_and_reports(bases, tmp_path):
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", r=4)  # base_model_name_or_path = local dir
    res = _cli(str(adapter), "--out", str(tmp_path / "m"))
    assert res.returncode == 0, res.stderr
    assert "merged 14 modules" in res.stdout
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_cli_errors_are_one_line(tmp_path):
    res = _cli(str(tmp_path / "nope"), "--out", str(tmp_path / "m"))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "error:" in res.stderr
    res = _cli(str(tmp_path))  # --out missing: usage error
    assert res.returncode == 2
