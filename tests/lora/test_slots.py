"""LoraSlots against the oracle: PEFT's own get_delta_weight for real PEFT-made adapters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from engine.adapters import load_adapter
from engine.planning.budget import LORA_MODULES, ModelDims, adapter_slot_bytes, total_slot_bytes
from engine.errors import AdapterError
from engine.lora.manager import AdapterCache
from engine.lora.slots import DORA_UNSUPPORTED, LoraSlots
from tests.tiny import build_peft_adapter, build_tiny_model, tiny_config

MAX_RANK = 8
ADAPTERS: dict[str, dict] = {
    "r4": dict(r=4, lora_alpha=8, seed=1),
    "r8": dict(r=8, lora_alpha=16, seed=2),
    "rslora": dict(r=8, lora_alpha=8, use_rslora=True, seed=3),
    "pattern": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 8, "down_proj": 2}, alpha_pattern={"v_proj": 32}, seed=4),
    "attn_l1": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], layers_to_transform=[1], seed=5),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama, PEFT adapters for it, and PEFT's delta weights per adapter (the oracle)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("slots")
    base = build_tiny_model(root / "base", "llama")
    paths = {n: build_peft_adapter(base, root / n, **kw) for n, kw in ADAPTERS.items()}
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    names = list(paths)
    peft_model = PeftModel.from_pretrained(model, str(paths[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(str(paths[n]), adapter_name=n)
    deltas: dict[str, dict[tuple[int, str], torch.Tensor]] = {n: {} for n in names}
    for mod_name, mod in peft_model.named_modules():
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+_proj)$", mod_name)
        if m is None or not hasattr(mod, "get_delta_weight"):
            continue
        for n in names:
            if n in mod.lora_A:
                deltas[n][(int(m.group(1)), m.group(2))] = mod.get_delta_weight(n).detach().float()
    dims = ModelDims.from_hf_config(tiny_config("llama"))
    return dict(root=root, base=base, paths=paths, deltas=deltas, dims=dims)


def slot_delta(slots: LoraSlots, slot: int, layer: int, module: str) -> torch.Tensor:
    a, b, scales = slots.stacks_for(layer, module)  # [S, R, in], [S, out, R], [S]
    return scales[slot] * (b[slot].float() @ a[slot].float())  # [out, in]


def assert_slot_matches_peft(slots: LoraSlots, slot: int, env: dict, name: str) -> None:
    want = env["deltas"][name]
    assert want, f"oracle found no LoRA modules for {name}"
    for layer in range(env["dims"].layers):
        for module in slots.modules:
            got = slot_delta(slots, slot, layer, module)
            exp = want.get((layer, module), torch.zeros_like(got))
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6, msg=f"{name} layer {layer} {module}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch,modules", [("llama", LORA_MODULES), ("qwen3", ("q_proj", "v_proj", "down_proj"))])
def test_allocated_bytes_equal_budget(arch: str, modules: tuple[str, ...], dtype: str) -> None:
    dims = ModelDims.from_hf_config(tiny_config(arch))
    slots = LoraSlots(dims, max_loras=3, max_rank=16, modules=modules, dtype=dtype)
    per_slot = adapter_slot_bytes(dims, rank=16, modules=modules, dtype=dtype)
    assert slots.nbytes == per_slot * 3 == total_slot_bytes(dims, max_loras=3, max_rank=16, modules=modules, dtype=dtype)
    assert slots.modules == modules and slots.scale_nbytes == dims.layers * len(modules) * 3 * 4


def test_every_slot_equals_peft_delta_weight(env: dict) -> None:
    slots = LoraSlots(env["dims"], max_loras=len(ADAPTERS), max_rank=MAX_RANK)
    names = list(ADAPTERS)
    for s, n in enumerate(names):
        slots.set_slot(s, load_adapter(env["paths"][n], name=n))
    for s, n in enumerate(names):
        assert_slot_matches_peft(slots, s, env, n)


def test_lower_rank_and_subset_targets_are_zero_padded(env: dict) -> None:
    slots = LoraSlots(env["dims"], max_loras=2, max_rank=MAX_RANK)
    slots.set_slot(1, load_adapter(env["paths"]["attn_l1"]))  # rank 2, attention of layer 1 only
    for layer in range(env["dims"].layers):
        for m in slots.modules:
            a, b, scales = slots.stacks_for(layer, m)
            targeted = layer == 1 and m in ("q_proj", "k_proj", "v_proj", "o_proj")
            assert torch.count_nonzero(a[1, 2:]) == 0 and torch.count_nonzero(b[1, :, 2:]) == 0
            assert (torch.count_nonzero(a[1]) > 0) == targeted and (float(scales[1]) != 0.0) == targeted
            # the model skips idle (layer, module) pairs entirely
            assert (slots.get(layer, m) is not None) == targeted
    slots.reset_slot(1)
    assert all(slots.get(l, m) is None for l in range(env["dims"].layers) for m in slots.modules)
    assert all(not slot_delta(slots, 1, l, m).any() for l in range(env["dims"].layers) for m in slots.modules)


def test_reused_slot_leaves_no_stale_rows(env: dict) -> None:
    slots = LoraSlots(env["dims"], max_loras=1, max_rank=MAX_RANK)
    slots.set_slot(0, load_adapter(env["paths"]["r8"]))  # full rank, every module
    slots.set_slot(0, load_adapter(env["paths"]["attn_l1"]))  # rank 2, attention of layer 1 only
    assert_slot_matches_peft(slots, 0, env, "attn_l1")
    for m in slots.modules:
        a, b, _ = slots.stacks_for(0, m)  # layer 0 is untargeted by attn_l1
        assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) == 0
        a, b, _ = slots.stacks_for(1, m)
        assert torch.count_nonzero(a[:, 2:]) == 0 and torch.count_nonzero(b[:, :, 2:]) == 0
    # the same layout (every layer, one rank) at a lower rank: the fast path must pad too
    for name, rank in (("r8", 8), ("r4", 4), ("pattern", None), ("r4", 4)):
        slots.set_slot(0, load_adapter(env["paths"][name]))
        assert_slot_matches_peft(slots, 0, env, name)
        if rank is not None:
            for layer in range(env["dims"].layers):
                for m in slots.modules:
                    a, b, _ = slots.stacks_for(layer, m)
                    assert torch.count_nonzero(a[0, rank:]) == 0 and torch.count_nonzero(b[0, :, rank:]) == 0


def test_bf16_slots_hold_rounded_weights(env: dict) -> None:
    slots = LoraSlots(env["dims"], max_loras=1, max_rank=MAX_RANK, dtype="bf16")
    adapter = load_adapter(env["paths"]["rslora"])
    slots.set_slot(0, adapter)
    for (layer, m), w in adapter.modules.items():
        a, b, scales = slots.stacks_for(layer, m)
        assert a.dtype == torch.bfloat16 and scales.dtype == torch.float32
        assert torch.equal(a[0, : w.rank], w.lora_a.to(torch.bfloat16)) and float(scales[0]) == pytest.approx(w.scaling)


def _raises_and_keeps_slot(slots: LoraSlots, adapter: object, match: str) -> None:
    before = [t.clone() for t in (*slots.A.values(), *slots.B.values(), slots.scales)]
    with pytest.raises(AdapterError, match=match):
        slots.set_slot(0, adapter)
    after = [*slots.A.values(), *slots.B.values(), slots.scales]
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "a refused adapter modified the slot"


def test_unservable_adapters_are_refused_before_any_write(env: dict, tmp_path: Path) -> None:
    slots = LoraSlots(env["dims"], max_loras=1, max_rank=MAX_RANK)
    slots.set_slot(0, load_adapter(env["paths"]["r4"]))
    big = build_peft_adapter(env["base"], tmp_path / "r16", r=16, lora_alpha=16, target_modules=["q_proj"])
    _raises_and_keeps_slot(slots, load_adapter(big), r"rank 16 of layer 0 q_proj exceeds max_lora_rank 8")
    dora = build_peft_adapter(env["base"], tmp_path / "dora", r=4, use_dora=True, target_modules=["v_proj"])
    _raises_and_keeps_slot(slots, load_adapter(dora), re.escape(DORA_UNSUPPORTED))
    bias = build_peft_adapter(env["base"], tmp_path / "bias", r=4, lora_bias=True, target_modules=["o_proj"])
    _raises_and_keeps_slot(slots, load_adapter(bias), "lora_bias: LoRA B carries a bias vector")
    other = build_tiny_model(tmp_path / "other", "llama", hidden_size=32, intermediate_size=48)
    foreign = build_peft_adapter(other, tmp_path / "foreign", r=4, target_modules=["up_proj"])
    _raises_and_keeps_slot(slots, load_adapter(foreign), r"base model needs A \[r, 64\] and B \[128, r\]")
    emb = build_peft_adapter(env["base"], tmp_path / "emb", r=4, target_modules=["embed_tokens", "q_proj"])
    _raises_and_keeps_slot(slots, load_adapter(emb), "embed")
    mts = build_peft_adapter(env["base"], tmp_path / "mts", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _raises_and_keeps_slot(slots, load_adapter(mts), "modules_to_save|lm_head")
    narrow = LoraSlots(env["dims"], max_loras=1, max_rank=MAX_RANK, modules=("q_proj",))
    with pytest.raises(AdapterError, match=r"LoRA on 'k_proj' is not served \(slots hold q_proj\)"):
        narrow.set_slot(0, load_adapter(env["paths"]["attn_l1"]))
    assert_slot_matches_peft(slots, 0, env, "r4")


def test_cache_and_slots_together(env: dict, tmp_path: Path) -> None:
    """AdapterCache wired to real slots: every acquired slot holds exactly its adapter."""
    slots = LoraSlots(env["dims"], max_loras=2, max_rank=MAX_RANK)
    cache = AdapterCache(max_loras=2, max_cpu_loras=3, loader=slots.load, slot_writer=slots.set_slot,
                         slot_clearer=slots.reset_slot)
    for n, p in env["paths"].items():
        cache.register(n, str(p))
    dora = build_peft_adapter(env["base"], tmp_path / "dora", r=4, use_dora=True, target_modules=["v_proj"])
    before = (cache.resident(), cache.cpu_resident())
    with pytest.raises(AdapterError, match="DoRA"):
        cache.register("dora", str(dora))
    assert (cache.resident(), cache.cpu_resident()) == before and "dora" not in cache
    for n in ["r4", "pattern", "r4", "attn_l1", "rslora", "pattern", "r8"]:
        s = cache.acquire(n)
        assert s is not None and cache.slot_of(n) == s
        assert_slot_matches_peft(slots, s, env, n)
        cache.release(n, s)
    st = cache.stats()
    assert st.device_hits == 1 and st.device_loads == 6 and st.device_evictions == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_slots_use_pinned_async_copies_and_match_cpu(env: dict) -> None:
    cpu = LoraSlots(env["dims"], max_loras=2, max_rank=MAX_RANK, dtype="bf16")
    gpu = LoraSlots(env["dims"], max_loras=2, max_rank=MAX_RANK, dtype="bf16", device="cuda")
    for s, n in enumerate(["pattern", "attn_l1"]):
        prepared = gpu.prepare(load_adapter(env["paths"][n], name=n))
        assert prepared.scales is not None and prepared.scales.is_pinned()
        gpu.set_slot(s, prepared)
        cpu.set_slot(s, load_adapter(env["paths"][n], name=n))
    torch.cuda.synchronize()
    for m in cpu.modules:
        assert torch.equal(gpu.A[m].cpu(), cpu.A[m]) and torch.equal(gpu.B[m].cpu(), cpu.B[m])
    assert torch.equal(gpu.scales.cpu(), cpu.scales)
