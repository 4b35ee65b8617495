"""DoRA served from slots: each linear's output equals PEFT's own DoRA layer forward (the oracle)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.adapters import load_adapter
from engine.planning.budget import ModelDims
from engine.lora.manager import AdapterCache
from engine.lora.slots import LoraSlots, apply_dora
from tests.tiny import build_peft_adapter, build_tiny_model, tiny_config

MODULES = ("q_proj", "v_proj", "o_proj", "down_proj")


def realistic_magnitudes(adapter_dir: Path, base_weights: dict[tuple[int, str], torch.Tensor], seed: int) -> None:
    """PEFT initialises magnitude to ||W||_row; tiny.py re-draws it as a small LoRA-like tensor.
    Put it back near ||W||_row (with noise) so the test exercises a trained-looking DoRA."""
    f = adapter_dir / "adapter_model.safetensors"
    sd = load_file(str(f))
    gen = torch.Generator().manual_seed(seed)
    for k in list(sd):
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+_proj)\.lora_magnitude_vector", k)
        if m:
            w = base_weights[(int(m.group(1)), m.group(2))]
            sd[k] = w.norm(dim=1) * (1 + 0.2 * torch.randn(w.shape[0], generator=gen))
    save_file(sd, str(f))


@pytest.fixture(scope="module", params=["qwen2", "llama"])  # qwen2: q/k/v carry a bias
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    arch = request.param
    root = tmp_path_factory.mktemp(f"dora-{arch}")
    base = build_tiny_model(root / "base", arch)
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    hf.save_pretrained(str(base), safe_serialization=True)
    layers = hf.model.layers

    def linear(layer: int, module: str) -> torch.nn.Linear:
        block = layers[layer].self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else layers[layer].mlp
        return getattr(block, module)

    weights = {(l, m): linear(l, m).weight.detach().clone() for l in range(len(layers)) for m in MODULES}
    biases = {k: (linear(*k).bias.detach().clone() if linear(*k).bias is not None else None) for k in weights}
    assert (arch == "qwen2") == any(b is not None and b.abs().max() > 0 for b in biases.values())
    dora = build_peft_adapter(base, root / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=list(MODULES),
                              rank_pattern={"down_proj": 2}, seed=7)
    realistic_magnitudes(dora, weights, seed=8)
    plain = build_peft_adapter(base, root / "plain", r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"], seed=9)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(dora), adapter_name="dora"
    )
    peft_model.load_adapter(str(plain), adapter_name="plain")
    peft_model.eval()
    dims = ModelDims.from_hf_config(tiny_config(arch))
    return dict(base=base, dora=dora, plain=plain, peft=peft_model, weights=weights, biases=biases, dims=dims)


def peft_linear(peft_model, layer: int, module: str):  # type: ignore[no-untyped-def]
    for name, mod in peft_model.named_modules():
        if re.search(rf"layers\.{layer}\.\w+\.{module}$", name):
            return mod
    raise KeyError((layer, module))


def test_dora_slots_match_peft_forward_in_a_mixed_batch(env: dict) -> None:
    slots = LoraSlots(env["dims"], max_loras=2, max_rank=8, base_weight=lambda l, m: env["weights"][(l, m)])
    slots.set_slot(0, load_adapter(env["dora"], name="dora"))
    slots.set_slot(1, load_adapter(env["plain"], name="plain"))
    token_lora_slots = torch.tensor([-1, 0, 1, 0, -1, 1, 0], dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    for (layer, module), W in env["weights"].items():
        bias = env["biases"][(layer, module)]
        x = torch.randn(len(token_lora_slots), W.shape[1], generator=gen)  # [T, in]
        y = F.linear(x, W, bias)  # [T, out]: base once for everyone
        stack = slots.get(layer, module)
        assert stack is not None
        a, b, scales = stack
        for t, s in enumerate(token_lora_slots.tolist()):  # reference shrink/expand
            if s >= 0:
                y[t] += scales[s] * (x[t] @ a[s].T) @ b[s].T
        g = slots.dora(layer, module)
        assert g is not None and g.shape == (3, W.shape[0])
        apply_dora(y, g, token_lora_slots, bias)
        mod = peft_linear(env["peft"], layer, module)
        with torch.no_grad():
            for s, adapter in ((-1, None), (0, "dora"), (1, "plain")):
                rows = token_lora_slots == s
                if adapter is None:
                    want = F.linear(x[rows], W, bias)
                else:
                    env["peft"].set_adapter(adapter)
                    want = mod(x[rows]) if adapter in mod.lora_A else F.linear(x[rows], W, bias)
                torch.testing.assert_close(y[rows], want, rtol=1e-5, atol=1e-5, msg=f"{adapter} {layer} {module}")
            # DoRA really changes the output beyond plain LoRA (the test is not vacuous)
            env["peft"].set_adapter("dora")
            dora_out = mod(x[token_lora_slots == 0])
            plain_math = F.linear(x[token_lora_slots == 0], W, bias) + scales[0] * (x[token_lora_slots == 0] @ a[0].T) @ b[0].T
            assert (dora_out - plain_math).abs().max() > 1e-3


def test_dora_slot_reuse_and_disabled_dora(env: dict) -> None:
    slots = LoraSlots(env["dims"], max_loras=1, max_rank=8, base_weight=lambda l, m: env["weights"][(l, m)])
    slots.set_slot(0, load_adapter(env["dora"]))
    assert slots.dora(0, "q_proj") is not None and slots.dora(0, "k_proj") is None
    slots.set_slot(0, load_adapter(env["plain"]))  # a plain adapter leaves no stale g behind
    assert all(slots.dora(l, m) is None for l in range(env["dims"].layers) for m in slots.modules)
    assert slots.G is not None and all(torch.equal(g, torch.ones_like(g)) for g in slots.G.values())
    cache = AdapterCache(max_loras=1, loader=slots.load, slot_writer=slots.set_slot)
    cache.register("dora", str(env["dora"]))  # accepted (validated with allow_dora) when DoRA is enabled
    s = cache.acquire("dora")
    assert s == 0 and slots.dora(1, "down_proj") is not None  # the DoRA adapter's g, where the plain one left ones
    assert slots.dora(0, "q_proj") is not None and slots.dora(0, "k_proj") is None
