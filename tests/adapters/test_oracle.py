"""load_adapter against PEFT itself: for every LoRA'd module, scale * B @ A must equal PEFT's
own get_delta_weight, the scaling must equal PEFT's, and the set of modules must be the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.adapters import check_servable, load_adapter
from engine.adapters.keys import decoder_module
from engine.errors import AdapterError
from tests.tiny import build_peft_adapter

VARIANTS: dict[str, dict] = {
    "default": {},
    "rslora": dict(use_rslora=True, r=4, lora_alpha=8),
    "rslora_rank_pattern": dict(use_rslora=True, r=4, lora_alpha=8, rank_pattern={"q_proj": 2}),
    "patterns": dict(
        r=8, lora_alpha=16,
        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 3, "layers.0.self_attn.o_proj": 5},
    ),
    "regex_targets": dict(target_modules=r".*layers\.1\.self_attn\.(q_proj|k_proj)|.*\.down_proj"),
    "dora": dict(use_dora=True, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "layer_subset": dict(layers_to_transform=[1], target_modules=["q_proj", "o_proj", "gate_proj"]),
}


def peft_oracle(base_dir: Path, adapter_dir: Path) -> dict[tuple[int, str], object]:
    """(layer, module) -> PEFT's LoraLayer, from PeftModel.from_pretrained on the real base."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            dm = decoder_module(name.removeprefix("base_model.model."))
            assert dm is not None, name
            out[dm] = module
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_delta_equals_peft_get_delta_weight(bases, tmp_path, arch, variant):
    adapter_dir = build_peft_adapter(bases[arch], tmp_path / variant, seed=3, **VARIANTS[variant])
    adapter = load_adapter(adapter_dir)
    oracle = peft_oracle(bases[arch], adapter_dir)

    assert set(adapter.modules) == set(oracle)  # same modules, no more, no fewer
    for key, layer in oracle.items():
        mine = adapter.modules[key]
        assert mine.scaling == pytest.approx(layer.scaling["default"], rel=1e-12), key
        assert mine.rank == layer.r["default"], key
        with torch.no_grad():
            expected = layer.get_delta_weight("default")  # [out, in]
        torch.testing.assert_close(mine.delta_weight(), expected, rtol=1e-5, atol=1e-7)
        if variant == "dora":
            torch.testing.assert_close(mine.magnitude, layer.lora_magnitude_vector["default"].weight.detach())
        else:
            assert mine.magnitude is None
    assert adapter.max_rank == max(m.rank for m in adapter.modules.values())
    assert adapter.num_params == sum(p.numel() for m in oracle.values() for n, p in m.named_parameters()
                                     if "default" in n and "lora_" in n)


def test_layer_subset_and_patterns_reach_the_right_modules(bases, tmp_path):
    """layers_to_transform=[1] must yield only layer-1 modules; rank_pattern must set per-module rank."""
    a = load_adapter(build_peft_adapter(bases["llama"], tmp_path / "a", **VARIANTS["layer_subset"]))
    assert a.layers == [1] and a.module_names == ["gate_proj", "o_proj", "q_proj"]
    b = load_adapter(build_peft_adapter(bases["llama"], tmp_path / "b", **VARIANTS["patterns"]))
    assert b.modules[(0, "q_proj")].rank == 4 and b.modules[(1, "down_proj")].rank == 2 and b.modules[(0, "down_proj")].rank == 8
    assert b.modules[(0, "o_proj")].scaling == 5 / 8 and b.modules[(1, "o_proj")].scaling == 2.0


def test_legacy_bin_loads_like_safetensors(bases, llama_adapter, tmp_path):
    """A legacy adapter_model.bin (torch.save) gives the same deltas as PEFT's own loading of it."""
    import shutil

    from safetensors.torch import load_file

    d = tmp_path / "legacy"
    shutil.copytree(llama_adapter, d)
    torch.save(load_file(str(d / "adapter_model.safetensors")), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    adapter = load_adapter(d)
    oracle = peft_oracle(bases["llama"], d)
    assert set(adapter.modules) == set(oracle)
    for key, layer in oracle.items():
        torch.testing.assert_close(adapter.modules[key].delta_weight(), layer.get_delta_weight("default").detach())


def test_safetensors_tensors_are_memory_mapped_not_copied(llama_adapter):
    """Loading keeps the file's dtype and does not materialise extra float32 copies."""
    adapter = load_adapter(llama_adapter, name="mine")
    assert adapter.name == "mine"
    m = adapter.modules[(0, "q_proj")]
    assert m.lora_a.shape == (8, 64) and m.lora_b.shape == (64, 8)
    assert adapter.size_bytes == sum(t.numel() * 4 for mm in adapter.modules.values() for t in mm.tensors())
    check_servable(adapter)  # plain LoRA: no exception


def test_check_servable_rejects_dora_unless_allowed(bases, tmp_path):
    adapter = load_adapter(build_peft_adapter(bases["llama"], tmp_path / "d", **VARIANTS["dora"]))
    with pytest.raises(AdapterError, match="served only if the engine supports DoRA"):
        check_servable(adapter)
    check_servable(adapter, allow_dora=True)


def test_load_adapter_errors_are_one_line_adapter_errors(adapter_copy):
    (adapter_copy / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(AdapterError, match="header is not valid JSON") as exc:
        load_adapter(adapter_copy)
    assert "\n" not in str(exc.value)
    with pytest.raises(AdapterError, match="adapter directory not found"):
        load_adapter(adapter_copy / "nope")


@pytest.mark.parametrize("poison,fragment", [
    (lambda t: t.__setitem__((0, 0), float("nan")), "NaN/Inf values in layer 1 k_proj"),
    (lambda t: t.__setitem__((2, 3), float("-inf")), "NaN/Inf values in layer 1 k_proj"),
])
def test_check_servable_refuses_non_finite_weights(adapter_copy, poison, fragment):
    from safetensors.torch import load_file, save_file

    p = adapter_copy / "adapter_model.safetensors"
    sd = load_file(str(p))
    poison(sd["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"])
    save_file(sd, str(p))
    adapter = load_adapter(adapter_copy)  # readable: values are judged by check_servable
    with pytest.raises(AdapterError, match=fragment):
        check_servable(adapter)
    check_servable(adapter, check_values=False)


def test_check_servable_refuses_integer_weights(adapter_copy):
    from safetensors.torch import load_file, save_file

    p = adapter_copy / "adapter_model.safetensors"
    save_file({k: v.to(torch.int8) for k, v in load_file(str(p)).items()}, str(p))
    with pytest.raises(AdapterError, match="dtype torch.int8"):
        check_servable(load_adapter(adapter_copy))
