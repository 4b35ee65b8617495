"""bf16 multi-LoRA on CPU: the engine's slot stacks (B stored rank-major on CPU) and the 16-bit
"dense"/"split" LoRA layouts give every row exactly its own adapter's delta (and base rows none),
checked per linear against the PEFT adapter files' weights in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.adapters import load_adapter
from engine.model import LoraContext
from kernels import LoraBatchMeta
from tests.tiny import build_peft_adapter

KINDS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=16, use_rslora=True), "c": dict(r=16, lora_alpha=16),
         "d": dict(r=8, lora_alpha=8, rank_pattern={"q_proj": 2})}  # fmt: skip


@pytest.fixture(scope="module")
def bf16_llm(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bf16_adapters")
    paths = {n: build_peft_adapter(tiny_models["llama"], root / n, seed=30 + i, **kw) for i, (n, kw) in enumerate(KINDS.items())}
    llm = LLM(str(tiny_models["llama"]), dtype="bfloat16", device="cpu", max_loras=4, max_lora_rank=16,
              loras=tuple((n, str(p)) for n, p in paths.items()))  # fmt: skip
    llm.generate([[1, 5, 6]] * 4, None, adapters=list(KINDS))  # make all four resident
    return llm, paths


@pytest.mark.parametrize("layout", ["decode", "prefill_then_decode"])
def test_every_row_gets_its_own_adapter_delta(bf16_llm, layout: str) -> None:
    llm, paths = bf16_llm
    runner, lora = llm.engine.runner, llm.engine.lora
    slots = lora.slots
    assert slots.B["q_proj"].stride(2) == 1  # CPU storage is rank-major: B[l][s].T is contiguous
    names = list(KINDS)
    slot_of = {n: lora.cache.slot_of(n) for n in names}
    if layout == "decode":  # interleaved, unequal segments, base rows among them
        which = [names[i % 4] if i % 5 else None for i in range(23)] + ["c", "c"]
        split = None
    else:  # a 9-token prompt on "b", then decode rows
        which = ["b"] * 9 + [names[i % 4] if i % 3 else None for i in range(14)]
        split = 9
    ts_list = [-1 if n is None else slot_of[n] for n in which]
    meta = LoraBatchMeta.from_token_lora_slots(ts_list, split=split)
    assert meta.path_for(torch.bfloat16) in ("dense", "split")
    ctx = LoraContext(token_lora_slots=torch.tensor(ts_list, dtype=torch.int32), meta=meta, stacks=slots)
    loaded = {n: load_adapter(paths[n]) for n in names}
    layer = runner.model.layers[1]
    gen = torch.Generator().manual_seed(0)
    for lin, parts in ((layer.qkv, ("q_proj", "k_proj", "v_proj")), (layer.down_proj, ("down_proj",))):
        x = torch.randn(len(which), lin.weight.shape[1], generator=gen).to(torch.bfloat16)
        got = lin(x, ctx).double()  # [T, out]
        base = x.double() @ lin.weight.double().T
        offset = 0
        for part in parts:
            n_out = dict(lin.parts)[part]
            for t, name in enumerate(which):
                want = base[t, offset:offset + n_out].clone()
                if name is not None:
                    mod = loaded[name].modules.get((1, part))
                    if mod is not None:
                        want += mod.scaling * (x[t].double() @ mod.lora_a.double().T) @ mod.lora_b.double().T
                torch.testing.assert_close(got[t, offset:offset + n_out], want, atol=0.05, rtol=0.02,
                                           msg=f"{layout} row {t} ({name}) {part}")  # fmt: skip
            offset += n_out
