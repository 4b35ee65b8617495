"""Parity with transformers (the oracle): greedy tokens and prefill logits, per architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from tests.engine.conftest import PROMPTS, hf_greedy
from tests.tiny import build_tiny_model


def _check_parity(model_dir: Path, max_new: int = 12) -> None:
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_num_seqs=8, enable_lora=False)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, prompt, max_new), f"prompt {prompt}"
        assert out.finish_reason == "length"
    for prompt in PROMPTS:
        ours = llm.engine.runner.score(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_and_logits_match_transformers(tiny_models: dict[str, Path], arch: str) -> None:
    _check_parity(tiny_models[arch])


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
    ids=["llama3", "linear", "yarn", "dynamic"],
)  # fmt: skip
def test_rope_scaling_matches_transformers(tmp_path: Path, rope: dict) -> None:
    d = build_tiny_model(tmp_path / "m", "llama", rope_scaling=rope, rope_theta=500.0)
    _check_parity(d, max_new=20)


def test_sharded_checkpoint_loads(tmp_path: Path, llama_dir: Path) -> None:
    """A checkpoint split into shards with model.safetensors.index.json gives the same outputs."""
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(str(sharded), max_shard_size="50KB")
    for f in llama_dir.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    a = LLM(str(llama_dir), enable_lora=False).generate(PROMPTS, params)
    b = LLM(str(sharded), enable_lora=False).generate(PROMPTS, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_llama_with_attention_and_mlp_bias(tmp_path: Path) -> None:
    d = build_tiny_model(tmp_path / "b", "llama", attention_bias=True, mlp_bias=True)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # transformers initialises biases to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(str(d))
    _check_parity(d, max_new=8)
