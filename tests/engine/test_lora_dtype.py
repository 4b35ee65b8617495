"""lora_dtype (vLLM's name; default "auto" = the model's dtype) different from the model's: a bf16 model
with float32 LoRA slots runs each linear's LoRA path in fp32 into a zeroed fp32 buffer and adds it to
the bf16 base output once (engine.model.LoraLinear), as PEFT does by default (autocast_adapter_dtype
keeps adapter weights in fp32 on a bf16 base). Checked per linear against the PEFT adapter files in
float64 (one bf16 rounding, and closer than bf16 slots), end to end on a mixed batch, against PEFT
itself, and a lora_dtype the engine cannot use is a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.adapters import load_adapter
from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.model import LoraContext
from kernels import LoraBatchMeta
from tests.tiny import build_peft_adapter

KINDS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=16, use_rslora=True), "c": dict(r=16, lora_alpha=16),
         "d": dict(r=8, lora_alpha=8, rank_pattern={"q_proj": 2})}  # fmt: skip
BF16_EPS = 2.0**-7  # the spacing of bf16 numbers in [1, 2): one rounding is at most half of it, relative


@pytest.fixture(scope="module")
def adapter_paths(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_dtype_adapters")
    return {n: build_peft_adapter(tiny_models["llama"], root / n, seed=50 + i, **kw)
            for i, (n, kw) in enumerate(KINDS.items())}


def _llm(model: Path, paths: dict[str, Path], lora_dtype: str) -> LLM:
    return LLM(str(model), dtype="bfloat16", lora_dtype=lora_dtype, device="cpu", max_loras=4, max_lora_rank=16,
               loras=tuple((n, str(p)) for n, p in paths.items()))  # fmt: skip


@pytest.fixture(scope="module")
def llms(tiny_models: dict[str, Path], adapter_paths: dict[str, Path]) -> dict[str, LLM]:
    """lora_dtype -> a bf16 LLM with all four adapters resident."""
    out = {}
    for lora_dtype in ("float32", "auto"):
        llm = _llm(tiny_models["llama"], adapter_paths, lora_dtype)
        llm.generate([[1, 5, 6]] * 4, None, adapters=list(KINDS))  # make all four resident
        out[lora_dtype] = llm
    return out


def _layout(layout: str) -> tuple[list[str | None], int | None]:
    names = list(KINDS)
    if layout == "decode":  # interleaved, unequal segments, base rows among them
        return [names[i % 4] if i % 5 else None for i in range(23)] + ["c", "c"], None
    return ["b"] * 9 + [names[i % 4] if i % 3 else None for i in range(14)], 9  # a 9-token prompt on "b", then decodes


def _linear_errors(llm: LLM, paths: dict[str, Path], which: list[str | None], split: int | None) -> list[torch.Tensor]:
    """Per linear: (got - want) / max(|want|, 1e-3) over every row and column, where want is the bf16
    base output (the same linear without LoRA) plus the adapter's delta in float64."""
    lora = llm.engine.lora
    slot_of = {n: lora.cache.slot_of(n) for n in KINDS}
    ts_list = [-1 if n is None else slot_of[n] for n in which]
    meta = LoraBatchMeta.from_token_lora_slots(ts_list, split=split)
    ctx = LoraContext(token_lora_slots=torch.tensor(ts_list, dtype=torch.int32), meta=meta, stacks=lora.slots)
    loaded = {n: load_adapter(paths[n]) for n in KINDS}
    errors = []
    gen = torch.Generator().manual_seed(0)
    for layer_i, layer in enumerate(llm.engine.runner.model.layers):
        for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj):
            x = torch.randn(len(which), lin.weight.shape[1], generator=gen).to(torch.bfloat16)
            base = lin(x, None)
            assert base.dtype == torch.bfloat16
            got = lin(x, ctx)
            assert got.dtype == torch.bfloat16
            want = base.double()
            offset = 0
            for part, n_out in lin.parts:
                for t, name in enumerate(which):
                    mod = loaded[name].modules.get((layer_i, part)) if name is not None else None
                    if mod is not None:
                        delta = mod.scaling * (x[t].double() @ mod.lora_a.double().T) @ mod.lora_b.double().T
                        want[t, offset : offset + n_out] += delta
                offset += n_out
            errors.append((got.double() - want) / want.abs().clamp_min(1e-3))
    return errors


@pytest.mark.parametrize("layout", ["decode", "prefill_then_decode"])
def test_fp32_lora_on_bf16_is_one_rounding_of_the_exact_sum(llms, adapter_paths, layout: str) -> None:
    which, split = _layout(layout)
    slots = llms["float32"].engine.lora.slots
    assert slots.A["q_proj"].dtype == slots.B["q_proj"].dtype == torch.float32
    assert llms["float32"].engine.runner.dtype == torch.bfloat16
    fp32 = _linear_errors(llms["float32"], adapter_paths, which, split)
    bf16 = _linear_errors(llms["auto"], adapter_paths, which, split)
    for err in fp32:  # round_bf16(base + delta): within half a bf16 spacing (+ fp32's own error), row by row
        assert err.abs().max().item() <= BF16_EPS / 2 * 1.01, err.abs().max().item()
    worst32 = max(e.abs().max().item() for e in fp32)
    worst16 = max(e.abs().max().item() for e in bf16)
    mean32 = torch.cat([e.flatten() for e in fp32]).abs().mean().item()
    mean16 = torch.cat([e.flatten() for e in bf16]).abs().mean().item()
    assert worst16 > BF16_EPS / 2 * 1.01  # bf16 slots round A, B, A x and the sum: more than one rounding
    assert mean32 < 0.75 * mean16  # measured: about half


def _prompts(n: int) -> list[list[int]]:
    return [[1] + [(7 * i + 13 * j) % 250 + 3 for j in range(3 + (i * 5) % 29)] for i in range(n)]


def _same_or_near_tie(batch, alone, what: str) -> None:
    """bf16 is not batch invariant in mlora even without LoRA (the CPU matmul depends on the row count):
    batch and solo runs must agree token for token, up to a step whose top two tokens are within bf16
    noise of each other; logprobs before it agree to bf16 noise."""
    for i, (b, a) in enumerate(zip(batch.logprobs, alone.logprobs, strict=True)):
        if b.token_id != a.token_id:
            top2 = sorted(a.top.values(), reverse=True)[:2]
            assert top2[0] - top2[1] < 0.1, f"{what}: step {i} chose {b.token_id} in the batch, {a.token_id} alone"
            return
        assert abs(b.logprob - a.logprob) < 0.05, (what, i, b.logprob, a.logprob)


def test_bf16_model_fp32_lora_mixed_batch_matches_solo_runs(llms) -> None:
    llm = llms["float32"]
    slots = llm.engine.lora.slots
    assert all(slots.A[m].dtype == slots.B[m].dtype == torch.float32 for m in slots.A)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = _prompts(10)
    adapters = ["a", "b", None, "c", "d", "a", None, "c", "b", "d"]  # four adapters of three ranks and the base
    batch = llm.generate(prompts, params, adapters=adapters)
    equal = 0
    for prompt, name, out in zip(prompts, adapters, batch):
        alone = llm.generate([prompt], params, adapters=[name])[0]
        assert len(out.token_ids) == 12
        _same_or_near_tie(out, alone, f"adapter {name}")
        equal += out.token_ids == alone.token_ids
    assert equal >= len(prompts) - 2, equal
    # the adapters do act (fp32 LoRA on bf16 is not silently dropped): each changes the base output
    base = [o.token_ids for o in llm.generate(prompts[:1] * 4, params, adapters=[None, "a", "b", "c"])]
    assert len({tuple(t) for t in base}) == 4, base


def test_fp32_lora_on_bf16_matches_peft_default(llms, tiny_models, adapter_paths) -> None:
    """transformers in bf16 + PEFT's default load (autocast_adapter_dtype=True: fp32 adapter weights, the
    LoRA path in fp32, the sum rounded to bf16 once) is what lora_dtype="float32" computes: its prompt's
    next-token logprobs match PEFT's (measured: exactly), closer than bf16 slots (~0.01-0.02 off)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
    prompts = _prompts(2)
    total = {"float32": 0.0, "auto": 0.0}
    for name, path in adapter_paths.items():
        base = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]), dtype=torch.bfloat16).eval()
        peft = PeftModel.from_pretrained(base, str(path)).eval()
        assert next(p for n, p in peft.named_parameters() if "lora_A" in n).dtype == torch.float32
        for prompt in prompts:
            with torch.no_grad():
                ref = torch.log_softmax(peft(torch.tensor([prompt])).logits[0, -1].float(), -1)
            for lora_dtype, llm in llms.items():
                top = llm.generate([prompt], params, adapters=[name])[0].logprobs[0].top
                err = max(abs(lp - ref[t].item()) for t, lp in top.items())
                total[lora_dtype] += err
                if lora_dtype == "float32":
                    assert err < 2e-3, (name, err)
    assert total["float32"] < total["auto"] / 4, total


@pytest.mark.parametrize("bad", ["int8", "float64", "fp8"])
def test_unusable_lora_dtype_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=f"lora_dtype must be one of auto, float32, bfloat16, float16, got '{bad}'"):
        EngineConfig(lora_dtype=bad)
    assert EngineConfig(lora_dtype="fp32").lora_dtype == "float32"  # aliases as for dtype
