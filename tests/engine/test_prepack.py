"""oneDNN-prepacked CPU base weights (engine.model.prepack_cpu_linears): same results as the plain
F.linear path, no second copy of any weight, the embedding stays plain, and MLORA_CPU_PREPACK=0 turns it off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.model import packed_linear, plain_weight, prepack_weight, small_batch_linear
from kernels import tuning
from tests.engine.conftest import PROMPTS

pytestmark = pytest.mark.skipif(not tuning.mkldnn_prepack_available(torch.float32),
                                reason="needs torch with mkldnn on an x86 CPU")


@pytest.mark.parametrize("rows", [1, 2, 7, 32, 65, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_fp32(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g) if bias else None
    x = torch.randn(64, rows, generator=g).t()  # a non-contiguous [rows, 64] view
    packed = prepack_weight(w)
    assert packed.is_mkldnn and packed.shape == w.shape and packed.dtype == w.dtype
    assert packed.nbytes == w.nbytes  # the budget's base-weight bytes stay right
    assert torch.equal(plain_weight(packed), w)  # unpacking gives W back exactly (DoRA reads it)
    y = small_batch_linear(x, packed, b)
    assert y.shape == (rows, 96) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_linear(x, packed, b), y, atol=0, rtol=0)


@pytest.mark.skipif(not tuning.mkldnn_prepack_available(torch.bfloat16), reason="no bf16 prepack")
@pytest.mark.parametrize("rows", [1, 8, 33])
def test_packed_linear_matches_f_linear_bf16(rows):
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(rows, 64, generator=g).bfloat16()
    y = small_batch_linear(x, prepack_weight(w))
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), atol=0.1, rtol=0.02)


def _packed(llm: LLM) -> dict[str, bool]:
    model = llm.engine.runner.model
    out = {name: p.is_mkldnn for name, p in model.named_parameters()}
    out["embed_tokens"] = model.embed_tokens.is_mkldnn
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied lm_head; tied to the embedding
def test_engine_packs_by_default_and_tokens_equal_the_plain_path(tiny_models: dict[str, Path], arch, monkeypatch):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    runs = {}
    for mode in ("1", "0"):  # "1": every weight (auto leaves the tiny model's small weights plain)
        monkeypatch.setenv(tuning.PREPACK_ENV, mode)
        llm = LLM(str(tiny_models[arch]), dtype="float32", device="cpu", max_num_seqs=8, enable_lora=False)
        packed = _packed(llm)
        linears = [n for n in packed if n.endswith(("qkv.weight", "o_proj.weight", "gate_up.weight", "down_proj.weight"))]
        assert linears and all(packed[n] is (mode == "1") for n in linears)
        assert not packed["embed_tokens"]  # the embedding lookup needs the plain table
        model = llm.engine.runner.model
        if model.lm_head is not None:
            assert model.lm_head.is_mkldnn is (mode == "1")
        assert not any(p.is_mkldnn for n, p in packed.items() if "norm" in n and p)
        toks = [o.token_ids for o in llm.generate(PROMPTS, params)]
        logits = [llm.engine.runner.score(p) for p in PROMPTS]
        runs[mode] = (toks, logits)
    assert runs["1"][0] == runs["0"][0]  # greedy tokens identical
    for a, b in zip(runs["1"][1], runs["0"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_base_weight_is_plain_for_dora(tiny_models: dict[str, Path], monkeypatch):
    monkeypatch.setenv(tuning.PREPACK_ENV, "1")
    llm = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", max_num_seqs=2, enable_lora=False)
    runner = llm.engine.runner
    assert runner.model.layers[0].qkv.weight.is_mkldnn
    w = runner.base_weight(0, "k_proj")
    q = runner.args.num_heads * runner.args.head_dim
    full = plain_weight(runner.model.layers[0].qkv.weight)
    assert not w.is_mkldnn and torch.equal(w, full[q : q + w.shape[0]])


@pytest.mark.parametrize("mode, small, big", [("auto", False, True), ("", False, True), ("1", True, True),
                                             ("0", False, False), ("off", False, False)])
def test_switch(monkeypatch, mode, small, big):
    monkeypatch.setenv(tuning.PREPACK_ENV, mode)
    assert tuning.cpu_prepack(torch.float32, 64 * 64) is small  # auto: too small to amortise the packed call
    assert tuning.cpu_prepack(torch.float32, 768 * 768) is big
    assert tuning.cpu_prepack(torch.bfloat16, 768 * 768) is big
    assert tuning.cpu_prepack(torch.float16, 768 * 768) is False  # oneDNN fp16 without AMX-FP16 is not a fast path


@pytest.mark.parametrize("amx", ["0", "1"])
def test_auto_follows_the_cpu(request, monkeypatch, amx):
    """auto packs bf16 on every CPU, fp32 only without AMX (where MKL's fp32 GEMM is not the faster one);
    an explicit "1" packs whatever the CPU."""
    monkeypatch.setenv("MLORA_CPU_AMX", amx)
    monkeypatch.setenv(tuning.PREPACK_ENV, "auto")
    tuning.cpu_has_amx.cache_clear()  # the probe is cached per process
    request.addfinalizer(tuning.cpu_has_amx.cache_clear)  # the next caller probes the restored env
    assert tuning.cpu_prepack(torch.bfloat16, 768 * 768) is True
    assert tuning.cpu_prepack(torch.float32, 768 * 768) is (amx == "0")
    monkeypatch.setenv(tuning.PREPACK_ENV, "1")
    assert tuning.cpu_prepack(torch.float32, 768 * 768) is True


def test_auto_leaves_the_tiny_model_plain(tiny_models: dict[str, Path], monkeypatch):
    monkeypatch.delenv(tuning.PREPACK_ENV, raising=False)
    llm = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", max_num_seqs=2, enable_lora=False)
    assert not any(_packed(llm).values())
