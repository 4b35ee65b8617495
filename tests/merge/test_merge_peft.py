"""`mlora merge` equals PEFT's merge_and_unload tensor for tensor, and the merged model gives the
PEFT model's logits in transformers (PEFT and transformers are the oracles)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.merge import MergeConfig, merge_adapter
from tests.merge.conftest import PROMPTS, hash_dir, load_base, logits, peft_merged_state, peft_model, read_output
from tests.tiny import build_peft_adapter

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]

# name -> (arch, build_peft_adapter kwargs, the output is untied)
CASES: dict[str, tuple[str, dict, bool]] = {
    "llama_plain": ("llama", dict(r=8), False),
    "llama_rslora_rank_alpha_pattern": ("llama", dict(r=8, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 5}), False),
    "llama_dora": ("llama", dict(r=4, use_dora=True), False),
    "llama_modules_to_save": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], train_saved_modules=True), False),
    "llama_embedding_lora": ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj"]), False),
    "qwen2_attn_subset_layers": ("qwen2", dict(r=4, target_modules=ATTN, layers_to_transform=[1]), False),
    "qwen2_lora_bias": ("qwen2", dict(r=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True), False),
    "qwen2_dora_rslora": ("qwen2", dict(r=4, use_dora=True, use_rslora=True, target_modules=ATTN), False),
    "qwen2_tied_embedding_lora": ("qwen2", dict(r=4, target_modules=["embed_tokens", "q_proj"]), True),
    "qwen2_tied_lm_head_lora": ("qwen2", dict(r=4, target_modules=["lm_head", "v_proj"]), True),
    "qwen2_tied_modules_to_save": ("qwen2", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], train_saved_modules=True), True),
    "gpt2_fan_in_fan_out": ("gpt2", dict(r=4, target_modules=GPT2_ALL), False),
    "gpt2_dora": ("gpt2", dict(r=4, target_modules=GPT2_ALL, use_dora=True), False),
    "gpt2_lora_bias_rank_pattern": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], lora_bias=True, rank_pattern={"c_fc": 2}), False),
    "gpt2_tied_embedding_lora": ("gpt2", dict(r=4, target_modules=["wte", "c_attn"]), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_peft_merge_and_unload(case: str, bases: dict[str, Path], tmp_path: Path) -> None:
    arch, kw, untied = CASES[case]
    base = bases[arch]
    adapter = build_peft_adapter(base, tmp_path / "adapter", seed=11, **kw)
    before = hash_dir(base)
    report = merge_adapter(MergeConfig(base=str(base), adapters=(str(adapter),), out=tmp_path / "merged"))
    assert hash_dir(base) == before  # the base directory is only ever read

    ours = read_output(tmp_path / "merged")
    theirs = peft_merged_state(base, adapter, untie=untied)
    original = load_file(str(base / "model.safetensors"))
    expected_keys = set(original) | ({"lm_head.weight"} if untied else set())
    assert set(ours) == expected_keys
    emb = next(k for k in original if k.endswith(("embed_tokens.weight", "wte.weight")))
    changed = 0
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-5, msg=lambda m: f"{case}: {name}: {m}")
        changed += not torch.equal(tensor, original.get(name, original[emb]))  # an untied lm_head starts as the embedding
    assert changed == report.tensors_merged > 0  # every adapted tensor really moved, nothing else did
    if kw.get("use_dora"):
        assert report.dora_modules > 0 and report.lora_modules == 0
    if kw.get("lora_bias"):
        assert report.bias_modules == report.lora_modules + report.dora_modules > 0
    assert report.untied == untied
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    if untied:
        assert cfg["tie_word_embeddings"] is False and report.notes

    # the merged directory loads in transformers and behaves like the (unmerged) PEFT model
    merged = load_base(tmp_path / "merged")
    for got, want in zip(logits(merged, PROMPTS), logits(peft_model(base, adapter), PROMPTS)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
