"""Configuration and model-loading errors are one-line MloraErrors a user can act on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.errors import ConfigError, MloraError, PromptTooLongError, TokenIdError


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(dtype="int8"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(num_kv_blocks=4, kv_cache_memory_bytes=1 << 20), "at most one of num_kv_blocks, kv_cache_memory_bytes"),
        (dict(max_loras=4, max_cpu_loras=2), "max_cpu_loras"),
        (dict(loras=(("a", "x"), ("a", "y"))), "duplicate"),
        (dict(max_queue=-1), "max_queue"),
    ],
)
def test_bad_engine_config(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        EngineConfig(model="m", **kwargs)


def test_dtype_aliases_and_unknown_option() -> None:
    assert EngineConfig(dtype="bf16").dtype == "bfloat16"
    with pytest.raises(ConfigError, match="unknown engine option"):
        EngineConfig.from_kwargs(model="m", max_num_seq=3)


def test_unsupported_architecture_is_named(tmp_path: Path, llama_dir: Path) -> None:
    bad = tmp_path / "gpt2ish"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MloraError, match="GPT2LMHeadModel|gpt2"):
        LLM(str(bad))


def test_missing_model_and_weights(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(str(tmp_path / "nope" / "model"))
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(llama_dir / "config.json", empty / "config.json")
    for f in llama_dir.glob("tokenizer*"):
        shutil.copy(f, empty / f.name)
    with pytest.raises(ConfigError, match="safetensors"):
        LLM(str(empty))


def test_prompt_errors(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), enable_lora=False, max_model_len=16)
    with pytest.raises(PromptTooLongError, match="16 tokens"):
        llm.generate([list(range(3, 30))], SamplingParams())
    with pytest.raises(ConfigError, match="vocabulary"):
        llm.generate([[1, 10**6]], SamplingParams())
    vocab = llm.engine.processor.vocab_size  # the model's, not the tokenizer's
    with pytest.raises(TokenIdError, match=rf"prompt token id {vocab} is out of range \[0, {vocab}\)") as err:
        llm.generate([[5, 6], [5, vocab]], SamplingParams())  # a good first prompt is rolled back with the batch
    assert err.value.param == "prompt"
    with pytest.raises(ConfigError, match="empty"):
        llm.generate([[]], SamplingParams())
    assert not llm.engine.has_unfinished()


def test_kv_capacity_from_memory_budget(llama_dir: Path) -> None:
    """kv_cache_memory_bytes -> blocks = bytes // (block bytes); max_model_len clamps to what fits."""
    from engine.planning.budget import ModelDims, kv_bytes_per_token

    llm = LLM(str(llama_dir), enable_lora=False, block_size=8, kv_cache_memory_bytes=200_000)
    per_block = kv_bytes_per_token(ModelDims.from_hf_config(llm.engine.hf_config), "float32") * 8
    assert llm.engine.block_manager.num_blocks == 200_000 // per_block
    assert llm.max_model_len == min(256, llm.engine.block_manager.num_blocks * 8)
