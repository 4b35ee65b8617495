"""Weighted multi-adapter merges, sharded bases, dtype casts, prefix-less checkpoints, interrupts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.merge import AdapterSpec, MergeConfig, merge_adapter
from tests.merge.conftest import PROMPTS, hash_dir, load_base, logits, peft_merged_state, peft_model, read_output, run_cli
from tests.tiny import build_peft_adapter

INDEX = "model.safetensors.index.json"


def test_weighted_merge_equals_base_plus_weighted_peft_deltas(bases, tmp_path, capsys) -> None:
    base = bases["llama"]
    adapters = [
        (build_peft_adapter(base, tmp_path / "plain", seed=1, r=8), 0.7),
        (build_peft_adapter(base, tmp_path / "rs", seed=2, r=4, use_rslora=True, target_modules=["q_proj", "v_proj"]), 0.3),
        (build_peft_adapter(base, tmp_path / "dora", seed=3, r=4, use_dora=True, target_modules=["q_proj", "down_proj"]), -0.5),
        (build_peft_adapter(base, tmp_path / "mts", seed=4, r=2, target_modules=["k_proj"], modules_to_save=["lm_head"],
                            train_saved_modules=True), 0.25),  # fmt: skip
    ]
    args = [a for path, w in adapters for a in ("--adapter", str(path), "--weight", str(w))]
    code, out, err = run_cli("--base", str(base), *args, "--out", str(tmp_path / "m"), capsys=capsys)
    assert code == 0, err
    assert "from 4 adapter(s)" in out

    original = load_file(str(base / "model.safetensors"))
    expected = {k: v.clone() for k, v in original.items()}
    for path, w in adapters:  # oracle: PEFT merges each adapter alone; the deltas add up with weights
        merged = peft_merged_state(base, path)
        for k in expected:
            expected[k] += w * (merged[k] - original[k])
    ours = read_output(tmp_path / "m")
    assert set(ours) == set(expected)
    for k in ours:
        torch.testing.assert_close(ours[k], expected[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert sum(not torch.equal(ours[k], original[k]) for k in ours) > 14


def test_weighted_verify_uses_peft_and_refuses_nonlinear_adapters(bases, tmp_path, capsys) -> None:
    base = bases["qwen2"]
    a = build_peft_adapter(base, tmp_path / "a", seed=1, r=4, lora_bias=True, target_modules=["q_proj", "v_proj"])
    b = build_peft_adapter(base, tmp_path / "b", seed=2, r=8, target_modules=["o_proj", "up_proj", "embed_tokens"])
    code, out, err = run_cli("--base", str(base), "-a", str(a), "-w", "0.6", "-a", str(b), "-w", "1.5",
                             "--out", str(tmp_path / "m"), "--verify", capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert "verify ok (transformers+peft)" in out

    dora = build_peft_adapter(base, tmp_path / "d", seed=3, r=4, use_dora=True)
    code, out, err = run_cli("--base", str(base), "-a", str(a), "-a", str(dora), "-w", "0.5", "-w", "0.5",
                             "--out", str(tmp_path / "m2"), "--verify", capsys=capsys)  # fmt: skip
    assert code == 1
    assert err.startswith("error: --verify cannot check a weighted merge of adapters with DoRA")
    assert not (tmp_path / "m2").exists()


def _resave_sharded(src: Path, dst: Path, max_shard_size: str) -> Path:
    model = load_base(src)
    model.save_pretrained(str(dst), max_shard_size=max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def sharded_llama(bases, tmp_path_factory) -> Path:
    base = _resave_sharded(bases["llama"], tmp_path_factory.mktemp("sharded") / "llama", "120KB")
    assert len(list(base.glob("*.safetensors"))) >= 3 and (base / INDEX).is_file()
    return base


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_sharded_base_merges_shard_by_shard_with_an_index(sharded_llama, tmp_path, dtype) -> None:
    base = sharded_llama
    adapter = build_peft_adapter(base, tmp_path / "a", seed=5, r=8, use_rslora=True)
    before = hash_dir(base)
    report = merge_adapter(MergeConfig(base=str(base), adapters=(str(adapter),), out=tmp_path / "m", dtype=dtype))
    assert hash_dir(base) == before
    out = tmp_path / "m"
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards and report.shards == len(shards)
    index = json.loads((out / INDEX).read_text())
    for name, file in index["weight_map"].items():  # the index points at the shard that really holds each tensor
        assert name in load_file(str(out / file))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_output(out).values())
    assert report.bytes_written == sum(p.stat().st_size for p in out.iterdir())

    want_dtype = torch.float32 if dtype == "auto" else torch.bfloat16
    theirs = peft_merged_state(base, adapter)
    ours = read_output(out)
    assert set(ours) == set(index["weight_map"]) == set(theirs)
    for k, t in ours.items():
        assert t.dtype == want_dtype
        torch.testing.assert_close(t, theirs[k].to(want_dtype), rtol=0, atol=1e-5 if dtype == "auto" else 0)
    assert json.loads((out / "config.json").read_text())["dtype"] == ("float32" if dtype == "auto" else "bfloat16")
    if dtype == "auto":
        for got, want in zip(logits(load_base(out), PROMPTS), logits(peft_model(base, adapter), PROMPTS)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_interrupted_merge_leaves_no_output_and_no_temp_files(sharded_llama, tmp_path) -> None:
    adapter = build_peft_adapter(sharded_llama, tmp_path / "a", r=4)
    before = hash_dir(sharded_llama)

    class Interrupt:
        def start_shard(self, name: str, total_bytes: int) -> None:
            self.n = getattr(self, "n", 0) + 1

        def advance(self, nbytes: int) -> None:
            if self.n == 2:
                raise KeyboardInterrupt

        def end_shard(self) -> None:
            pass

    out = tmp_path / "out" / "merged"
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(MergeConfig(base=str(sharded_llama), adapters=(str(adapter),), out=out), progress=Interrupt())
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # the staging directory is gone too
    assert hash_dir(sharded_llama) == before


def test_checkpoint_without_the_transformer_prefix(bases, tmp_path) -> None:
    """Old GPT-2 checkpoints say `h.0.attn.c_attn.weight`; PEFT says `transformer.h.0.attn.c_attn`."""
    src = bases["gpt2"]
    base = tmp_path / "gpt2-noprefix"
    shutil.copytree(src, base)
    sd = load_file(str(src / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = build_peft_adapter(src, tmp_path / "a", seed=7, r=4, target_modules=["c_attn", "c_fc"], use_dora=True)
    merge_adapter(MergeConfig(base=str(base), adapters=(str(adapter),), out=tmp_path / "m"))
    ours = read_output(tmp_path / "m")
    theirs = peft_merged_state(src, adapter)
    assert set(ours) == {k.removeprefix("transformer.") for k in sd}
    for k, t in ours.items():
        torch.testing.assert_close(t, theirs[k if k in theirs else "transformer." + k], rtol=0, atol=1e-5)
    for got, want in zip(logits(load_base(tmp_path / "m"), PROMPTS), logits(peft_model(src, adapter), PROMPTS)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_adapter_spec_weights_apply_in_the_python_api(bases, tmp_path) -> None:
    base = bases["llama"]
    a = build_peft_adapter(base, tmp_path / "a", seed=9, r=4, target_modules=["q_proj"])
    half = merge_adapter(MergeConfig(base=str(base), adapters=(AdapterSpec(str(a), 0.5),), out=tmp_path / "h"))
    full = merge_adapter(MergeConfig(base=str(base), adapters=(AdapterSpec(str(a), 1.0),), out=tmp_path / "f"))
    assert half.tensors_merged == full.tensors_merged == 2
    original = load_file(str(base / "model.safetensors"))
    h, f = read_output(tmp_path / "h"), read_output(tmp_path / "f")
    for k in original:
        torch.testing.assert_close(h[k] - original[k], 0.5 * (f[k] - original[k]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(r=8), dict(r=4, use_dora=True)], ids=["plain", "dora"])
def test_bf16_base_stays_bf16_and_matches_peft_in_bf16(bases, tmp_path, kw) -> None:
    """fp32 compute, cast back to the base dtype: what PEFT does when it merges into a bf16 model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16"
    load_base(bases["llama"]).to(torch.bfloat16).save_pretrained(str(base))
    shutil.copy(bases["llama"] / "tokenizer.json", base / "tokenizer.json")
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", seed=6, **kw)
    merge_adapter(MergeConfig(base=str(base), adapters=(str(adapter),), out=tmp_path / "m"))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    theirs = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    ours = read_output(tmp_path / "m")
    for k, t in ours.items():
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t, theirs[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
