"""Byte math against real oracles: transformers models (tiny and full-size on the meta device),
PEFT adapters built by PEFT itself, and the issue's acceptance numbers for Llama-3.1-8B."""

from __future__ import annotations

import json
from math import prod

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from engine.planning.budget import (
    LORA_MODULES,
    ModelDims,
    adapter_slot_bytes,
    base_weight_bytes,
    dtype_bytes,
    kv_bytes_per_token,
    linear_weight_bytes,
    lm_head_bytes,
    lora_module_shape,
    lora_params_per_rank,
    normalize_modules,
    slot_stack_shapes,
    total_slot_bytes,
)
from engine.planning.budget_plan import inspect_adapter
from engine.errors import ConfigError
from engine.planning.presets import load_model_preset, model_preset_names
from tests.tiny import build_peft_adapter, build_tiny_model, tiny_config

# (arch, config overrides): head_dim != hidden/heads, biases, tied/untied embeddings
TINY_CASES = [
    ("llama", {}),
    ("llama", {"head_dim": 8, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("mistral", {"head_dim": 24}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 24}),
]


def _meta_model(raw: dict):
    """A full-size transformers model on the meta device (no memory): the oracle for real configs."""
    cfg = AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_")})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def _linear_param_numel(model) -> int:
    return sum(
        p.numel() for name, p in model.named_parameters() if any(f".{m}." in name for m in LORA_MODULES)
    )


def test_llama_31_8b_acceptance_numbers():
    dims = ModelDims.from_hf_config(load_model_preset("llama-3.1-8b"))
    assert (dims.hidden, dims.intermediate, dims.layers, dims.heads, dims.kv_heads, dims.vocab) == (
        4096, 14336, 32, 32, 8, 128256,
    )  # fmt: skip
    per_slot = adapter_slot_bytes(dims, rank=16, modules=LORA_MODULES, dtype="bf16")
    assert per_slot == 83_886_080 == 80 * 2**20
    assert total_slot_bytes(dims, max_loras=16, max_rank=16, modules=LORA_MODULES, dtype="bfloat16") == 1_342_177_280
    assert kv_bytes_per_token(dims, "bf16") == 131_072


def test_llama_31_8b_slot_bytes_equal_peft_lora_params_of_the_real_architecture():
    """PEFT itself, on the full-size Llama-3.1-8B built on the meta device, is the oracle."""
    model = _meta_model(load_model_preset("llama-3.1-8b"))
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=list(LORA_MODULES)))
    lora_numel = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    dims = ModelDims.from_hf_config(load_model_preset("llama-3.1-8b"))
    assert lora_numel * 2 == adapter_slot_bytes(dims, rank=16, dtype="bf16")


@pytest.mark.parametrize("preset", model_preset_names())
def test_every_preset_matches_the_transformers_model_it_describes(preset):
    raw = load_model_preset(preset)
    dims = ModelDims.from_hf_config(raw)
    model = _meta_model(raw)
    assert base_weight_bytes(dims, "bf16") == sum(p.numel() for p in model.parameters()) * 2
    assert linear_weight_bytes(dims, "bf16") == _linear_param_numel(model) * 2
    layer = model.model.layers[0]
    for module in LORA_MODULES:
        lin = getattr(layer.self_attn, module, None) or getattr(layer.mlp, module)
        assert lora_module_shape(dims, module) == (lin.in_features, lin.out_features)
    assert lm_head_bytes(dims, "bf16") == model.lm_head.weight.numel() * 2


def test_presets_have_the_public_config_facts():
    q3 = ModelDims.from_hf_config(load_model_preset("qwen3-8b"))
    assert (q3.head_dim, q3.heads, q3.kv_heads, q3.layers, q3.qk_norm) == (128, 32, 8, 36, True)
    l1 = ModelDims.from_hf_config(load_model_preset("llama-3.2-1b"))
    assert (l1.head_dim, l1.tie_word_embeddings) == (64, True)
    q2 = ModelDims.from_hf_config(load_model_preset("qwen2.5-7b"))
    assert q2.bias_modules == ("q_proj", "k_proj", "v_proj")
    for name in model_preset_names():
        raw = load_model_preset(name)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "tie_word_embeddings", "torch_dtype",
                    "max_position_embeddings", "model_type"):  # fmt: skip
            assert key in raw, (name, key)


@pytest.mark.parametrize(("arch", "overrides"), TINY_CASES)
def test_tiny_models_base_linear_lmhead_and_kv_bytes_match_transformers(arch, overrides):
    cfg = tiny_config(arch, **overrides)
    dims = ModelDims.from_hf_config(cfg)
    assert dims == ModelDims.from_hf_config(json.loads(cfg.to_json_string()))  # object and config.json agree
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert base_weight_bytes(dims, "fp32") == sum(p.numel() * p.element_size() for p in model.parameters())
    assert linear_weight_bytes(dims, torch.float32) == _linear_param_numel(model) * 4
    for module in LORA_MODULES:
        layer = model.model.layers[1]
        lin = getattr(layer.self_attn, module, None) or getattr(layer.mlp, module)
        assert lora_module_shape(dims, module) == (lin.in_features, lin.out_features)
    tokens = 7
    with torch.no_grad():
        out = model(torch.arange(tokens)[None], use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    kv = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
             for layer in cache.layers)  # fmt: skip
    assert kv_bytes_per_token(dims, "float32") * tokens == kv


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize(("rank", "modules"), [(8, LORA_MODULES), (4, ("q_proj", "v_proj"))])
def test_slot_bytes_equal_lora_numel_of_a_real_peft_adapter_file(tmp_path, arch, rank, modules):
    base = build_tiny_model(tmp_path / "base", arch, head_dim=24)
    adapter = build_peft_adapter(base, tmp_path / "ad", r=rank, target_modules=list(modules))
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        numel = sum(prod(f.get_slice(k).get_shape()) for k in f.keys() if ".lora_A." in k or ".lora_B." in k)
    dims = ModelDims.from_hf_config(json.loads((base / "config.json").read_text()))
    assert numel * 4 == adapter_slot_bytes(dims, rank=rank, modules=modules, dtype="fp32")
    assert numel == rank * lora_params_per_rank(dims, modules)
    facts = inspect_adapter(adapter, dims)
    assert (facts.rank, facts.modules, facts.num_params, facts.problems) == (rank, modules, numel, ())
    assert facts.layers == dims.layers and facts.file_dtype == "float32"


def test_allocated_stacks_equal_slot_bytes_times_max_loras():
    """What the slot allocator allocates from slot_stack_shapes is N x adapter_slot_bytes."""
    dims = ModelDims.from_hf_config(load_model_preset("qwen3-8b"))
    for max_loras, rank, mods in [(1, 16, LORA_MODULES), (5, 8, ("q_proj", "k_proj", "down_proj"))]:
        stacks = slot_stack_shapes(dims, max_loras=max_loras, max_rank=rank, modules=mods)
        allocated = 0
        for _ in range(dims.layers):
            for a_shape, b_shape in stacks.values():
                a = torch.empty(a_shape, dtype=torch.float16, device="meta")
                b = torch.empty(b_shape, dtype=torch.float16, device="meta")
                allocated += a.numel() * a.element_size() + b.numel() * b.element_size()
        assert allocated == adapter_slot_bytes(dims, rank=rank, modules=mods, dtype="fp16") * max_loras
        for module, (a_shape, b_shape) in stacks.items():
            in_f, out_f = lora_module_shape(dims, module)
            assert a_shape == (max_loras, rank, in_f) and b_shape == (max_loras, out_f, rank)


def test_dtypes_and_aliases():
    for name, size in [("fp16", 2), ("float16", 2), ("half", 2), ("bf16", 2), ("bfloat16", 2), ("fp32", 4),
                       ("float32", 4), (torch.bfloat16, 2), (torch.float32, 4), ("torch.float16", 2)]:  # fmt: skip
        assert dtype_bytes(name) == size
    with pytest.raises(ConfigError, match="unsupported dtype int8"):
        dtype_bytes("int8")


def test_missing_config_fields_are_named():
    raw = load_model_preset("llama-3.1-8b")
    del raw["vocab_size"], raw["intermediate_size"]
    with pytest.raises(ConfigError, match="missing required field\\(s\\): intermediate_size, vocab_size"):
        ModelDims.from_hf_config(raw)


def test_bad_config_values_and_modules_are_config_errors():
    raw = dict(load_model_preset("llama-3.1-8b"), num_key_value_heads=5)
    with pytest.raises(ConfigError, match="not a multiple"):
        ModelDims.from_hf_config(raw)
    with pytest.raises(ConfigError, match="hidden_size must be an integer"):
        ModelDims.from_hf_config(dict(raw, hidden_size="big"))
    assert normalize_modules("v,q,gate") == ("q_proj", "v_proj", "gate_proj")
    assert normalize_modules(["all"]) == LORA_MODULES
    with pytest.raises(ConfigError, match="unknown target module 'lm_head'"):
        normalize_modules("q,lm_head")
    dims = ModelDims.from_hf_config(load_model_preset("llama-3.1-8b"))
    with pytest.raises(ConfigError, match="max_rank must be a positive integer"):
        slot_stack_shapes(dims, max_loras=1, max_rank=-4, modules=LORA_MODULES)
