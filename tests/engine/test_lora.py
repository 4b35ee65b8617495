"""Multi-LoRA in the engine vs transformers+PEFT (the oracle): mixed batches, isolation, churn,
broken adapters. Adapters are made by PEFT itself (tests/tiny.py)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.errors import AdapterError, AdapterNotFoundError
from tests.engine.conftest import hf_greedy
from tests.tiny import build_peft_adapter

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTER_KINDS = {
    "r4": dict(r=4, lora_alpha=8),
    "r8": dict(r=8, lora_alpha=16),
    "r16": dict(r=16, lora_alpha=16),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "pattern": dict(r=8, lora_alpha=16, rank_pattern={"q_proj": 4, "down_proj": 2}, alpha_pattern={"v_proj": 32}),
    "attn": dict(r=8, lora_alpha=8, target_modules=ATTN),
}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 40, 41, 42, 43], [1, 100, 7, 9, 200, 3, 5, 77, 31], [1, 250]]


@pytest.fixture(scope="module")
def adapters(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """arch -> adapter name -> PEFT adapter dir, for llama and qwen2."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        arch: {name: build_peft_adapter(tiny_models[arch], root / arch / name, seed=i + 1, **kw)
               for i, (name, kw) in enumerate(ADAPTER_KINDS.items())}
        for arch in ("llama", "qwen2")
    }  # fmt: skip


def _peft_model(base_dir: Path, adapter_dir: Path | None):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    return model if adapter_dir is None else PeftModel.from_pretrained(model, str(adapter_dir)).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_batch_matches_peft(tiny_models: dict[str, Path], adapters, arch: str) -> None:
    base = tiny_models[arch]
    names = list(ADAPTER_KINDS)
    llm = LLM(str(base), max_loras=len(names), max_lora_rank=16, loras=tuple((n, str(p)) for n, p in adapters[arch].items()))
    reqs = [(p, n) for n in names + [None] for p in PROMPTS[:2]] + [(PROMPTS[2], n) for n in (None, "r16", "attn")]
    outs = llm.generate([p for p, _ in reqs], GREEDY, adapters=[n for _, n in reqs])
    stacks = llm.engine.lora.slots
    for name in names + [None]:
        ref = _peft_model(base, adapters[arch][name] if name else None)
        slot = -1 if name is None else llm.engine.lora.cache.slot_of(name)
        assert name is None or slot is not None
        for (prompt, n), out in zip(reqs, outs):
            if n != name:
                continue
            assert out.adapter == name
            assert out.token_ids == hf_greedy(ref, prompt, 10), f"{arch} adapter {name} prompt {prompt}"
            with torch.no_grad():
                want = ref(torch.tensor([prompt])).logits[0].float()
            torch.testing.assert_close(llm.engine.runner.score(prompt, slot, stacks), want, atol=1e-4, rtol=0)
    # the adapters really change the model (otherwise this test would prove nothing)
    base_logits = llm.engine.runner.score(PROMPTS[1])
    for name in names:
        diff = llm.engine.runner.score(PROMPTS[1], llm.engine.lora.cache.slot_of(name), stacks) - base_logits
        assert diff.abs().max() > 1e-2, name


def test_isolation_alone_equals_mixed_batch_of_32(tiny_models: dict[str, Path], adapters, tmp_path: Path) -> None:
    base = tiny_models["llama"]
    extra = {f"x{i}": build_peft_adapter(base, tmp_path / f"x{i}", seed=50 + i, r=4 + 4 * i, lora_alpha=16) for i in range(2)}
    pool = {**adapters["llama"], **extra}  # 8 adapters
    assert len(pool) == 8
    llm = LLM(str(base), max_loras=8, max_lora_rank=16, max_num_seqs=32, loras=tuple((n, str(p)) for n, p in pool.items()))
    names = list(pool)
    prompts = [[1] + [(5 * i + 3 * j) % 250 + 3 for j in range(2 + i % 7)] for i in range(32)]
    which = [names[i % 8] if i % 5 else None for i in range(32)]
    batch = llm.generate(prompts, GREEDY, adapters=which)
    for i in (0, 1, 7, 13, 22, 31):
        alone = llm.generate([prompts[i]], GREEDY, adapters=[which[i]])[0]
        assert alone.token_ids == batch[i].token_ids, f"request {i} ({which[i]})"


def _simulate_device_lru(trace: list[tuple[str, str]], slots: int) -> tuple[int, int]:
    """Independent model of the device tier: LRU over `slots`, pinned adapters never evicted.

    trace: ("acquire" | "release", adapter). Returns (loads, evictions)."""
    lru: OrderedDict[str, None] = OrderedDict()
    pins: dict[str, int] = {}
    loads = evictions = 0
    for kind, name in trace:
        if kind == "release":
            pins[name] -= 1
            continue
        if name in lru:
            lru.move_to_end(name)
        else:
            if len(lru) >= slots:
                victim = next(n for n in lru if pins.get(n, 0) == 0)
                del lru[victim]
                evictions += 1
            lru[name] = None
            loads += 1
        pins[name] = pins.get(name, 0) + 1
    return loads, evictions


def test_churn_counters_match_lru_simulation(tiny_models: dict[str, Path], adapters, tmp_path: Path) -> None:
    base = tiny_models["llama"]
    pool = dict(adapters["llama"])  # 6 adapters
    llm = LLM(str(base), max_loras=2, max_cpu_loras=3, max_lora_rank=16, max_num_seqs=4,
              loras=tuple((n, str(p)) for n, p in pool.items()))  # fmt: skip
    trace: list[tuple[str, str]] = []
    cache = llm.engine.lora.cache
    acquire, release = cache.acquire, cache.release

    def traced_acquire(name, version=None):  # record the access trace the cache sees (successful pins only)
        slot = acquire(name, version=version)
        if slot is not None:
            trace.append(("acquire", name))
        return slot

    def traced_release(name, slot=None):
        trace.append(("release", name))
        release(name, slot)

    cache.acquire, cache.release = traced_acquire, traced_release
    names = list(pool)
    order = [names[(i * 7 + i // 6) % 6] for i in range(60)]  # interleaved, every adapter 10 times
    prompts = [[1, 3 + i % 200, 9, 4 + i % 50] for i in range(60)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    core, done = llm.engine, {}
    for wave in range(15):  # requests arrive interleaved, four per step
        for i in range(4 * wave, 4 * wave + 4):
            core.add_request(f"q{i}", prompts[i], params, order[i])
        done.update({o.request_id: o for o in core.step() if o.finished})
    while core.has_unfinished():
        done.update({o.request_id: o for o in core.step() if o.finished})
    outs = [done[f"q{i}"] for i in range(60)]
    stats = llm.stats()
    loads, evictions = _simulate_device_lru(trace, 2)
    assert len([t for t in trace if t[0] == "acquire"]) == 60
    assert (stats.lora_loads, stats.lora_evictions) == (loads, evictions)
    assert evictions >= len(pool) - 2  # real churn: every adapter beyond the two slots evicted someone (every adapter loaded at least twice on average)
    reference = LLM(str(base), max_loras=6, max_lora_rank=16, loras=tuple((n, str(p)) for n, p in pool.items()))
    for i in range(0, 60, 7):
        assert outs[i].token_ids == reference.generate([prompts[i]], params, adapters=[order[i]])[0].token_ids


def test_broken_adapter_refused_while_requests_run(tiny_models: dict[str, Path], adapters, tmp_path: Path) -> None:
    base = tiny_models["llama"]
    good = adapters["llama"]["r8"]
    llm = LLM(str(base), max_loras=2, loras=(("good", str(good)),))
    expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, adapters=["good", None, "good"])]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    data = (good / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated weights
    core = llm.engine
    for i, (p, a) in enumerate(zip(PROMPTS, ["good", None, "good"])):
        core.add_request(f"run{i}", p, GREEDY, a)
    results: dict[str, list[int]] = {}
    for _ in range(3):
        results.update({o.request_id: o.token_ids for o in core.step() if o.finished})
    with pytest.raises(AdapterError):
        llm.add_adapter("good", str(broken))  # same name: an invalid replacement changes nothing
    with pytest.raises(AdapterError):
        llm.add_adapter("new", str(broken))
    assert llm.list_adapters() == ["good"]
    while core.has_unfinished():
        results.update({o.request_id: o.token_ids for o in core.step() if o.finished})
    assert [results[f"run{i}"] for i in range(3)] == expected
    with pytest.raises(AdapterNotFoundError):
        llm.generate(PROMPTS[:1], GREEDY, adapters=["new"])


def test_replace_and_remove_adapter(tiny_models: dict[str, Path], adapters) -> None:
    base = tiny_models["llama"]
    a, b = adapters["llama"]["r4"], adapters["llama"]["attn"]
    llm = LLM(str(base), max_loras=2, loras=(("x", str(a)), ("b", str(b))))
    want_b = llm.generate(PROMPTS[:1], GREEDY, adapters=["b"])[0].token_ids
    llm.add_adapter("x", str(b))  # same name again: replaced
    assert llm.generate(PROMPTS[:1], GREEDY, adapters=["x"])[0].token_ids == want_b
    llm.remove_adapter("x")
    assert llm.list_adapters() == ["b"]
    with pytest.raises(AdapterNotFoundError):
        llm.generate(PROMPTS[:1], GREEDY, adapters=["x"])


def test_slot_bytes_equal_budget_and_dora_matches_peft(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The engine's slots cost exactly what `mlora budget` says; a DoRA adapter is served like PEFT."""
    from engine.planning.budget import ModelDims, adapter_slot_bytes

    base = tiny_models["llama"]
    dora = build_peft_adapter(base, tmp_path / "dora", seed=9, r=8, lora_alpha=16, use_dora=True)
    llm = LLM(str(base), max_loras=3, max_lora_rank=16, loras=(("dora", str(dora)),))
    slots = llm.engine.lora.slots
    dims = ModelDims.from_hf_config(llm.engine.hf_config)
    assert slots.nbytes == 3 * adapter_slot_bytes(dims, rank=16, dtype="float32")
    ref = _peft_model(base, dora)
    outs = llm.generate(PROMPTS, GREEDY, adapters=["dora", None, "dora"])
    assert outs[0].token_ids == hf_greedy(ref, PROMPTS[0], 10)
    assert outs[2].token_ids == hf_greedy(ref, PROMPTS[2], 10)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPTS[1]])).logits[0].float()
    got = llm.engine.runner.score(PROMPTS[1], llm.engine.lora.cache.slot_of("dora"), slots)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def _slow_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk loads take 2 x PREFETCH_MIN_LOAD_S (a slow disk, or large adapters), so prefetching pays."""
    import time

    from engine.lora import LoraSlots
    from engine.lora.engine import PREFETCH_MIN_LOAD_S

    real = LoraSlots.load
    monkeypatch.setattr(LoraSlots, "load", lambda *a, **k: (time.sleep(2 * PREFETCH_MIN_LOAD_S), real(*a, **k))[1])


def test_waiting_requests_prefetch_their_adapter(tiny_models: dict[str, Path], adapters, monkeypatch) -> None:
    """While a request runs on adapter a, a waiting request's adapter (evicted from the CPU tier)
    is loaded from disk in the background before it gets a slot, when disk loads are slow."""
    _slow_loads(monkeypatch)
    base = tiny_models["llama"]
    pool = adapters["llama"]
    llm = LLM(str(base), max_loras=1, max_cpu_loras=2, max_lora_rank=16,
              loras=tuple((n, str(pool[n])) for n in ("r4", "r8", "r16")))  # fmt: skip
    cache = llm.engine.lora.cache
    assert "r4" not in cache.cpu_resident()  # registering three into a CPU tier of two evicted it
    core = llm.engine
    long = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    core.add_request("hot", PROMPTS[0], long, "r16")
    core.add_request("cold", PROMPTS[1], GREEDY, "r4")
    core.step()  # "hot" runs; "cold" waits for the only slot -> prefetch starts
    cache.close()  # wait for the background load
    assert "r4" in cache.cpu_resident() and cache.slot_of("r4") is None
    loads_before = cache.stats().disk_loads
    done = {}
    while core.has_unfinished():
        done.update({o.request_id: o for o in core.step() if o.finished})
    assert cache.stats().disk_loads == loads_before  # the slot fill came from the CPU copy
    assert done["cold"].token_ids == llm.generate([PROMPTS[1]], GREEDY, adapters=["r4"])[0].token_ids


def test_short_loads_are_done_at_activation_not_in_the_background(tiny_models: dict[str, Path], adapters,
                                                                   monkeypatch) -> None:
    """When disk loads are shorter than a background load's GIL hand-offs would cost the step, a waiting
    request's adapter is not prefetched: it is loaded when its request is activated, with the same output."""
    import engine.lora.engine as lora_engine

    monkeypatch.setattr(lora_engine, "PREFETCH_MIN_LOAD_S", 3600.0)  # every load counts as short
    llm = LLM(str(tiny_models["llama"]), max_loras=1, max_cpu_loras=2, max_lora_rank=16,
              loras=tuple((n, str(adapters["llama"][n])) for n in ("r4", "r16")))  # fmt: skip
    core, cache = llm.engine, llm.engine.lora.cache
    core.add_request("hot", PROMPTS[0], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), "r16")
    core.add_request("cold", PROMPTS[1], GREEDY, "r4")
    core.step()  # "hot" loads r16 (a short load) and runs; "cold" waits for the only slot
    cache.close()
    assert cache.stats().disk_loads == 1  # nothing was loaded ahead of "cold"'s turn
    done = {}
    while core.has_unfinished():
        done.update({o.request_id: o for o in core.step() if o.finished})
    assert cache.stats().disk_loads == 2  # r4, read when "cold" was activated
    assert done["cold"].token_ids == llm.generate([PROMPTS[1]], GREEDY, adapters=["r4"])[0].token_ids


def test_request_whose_adapter_was_removed_before_it_ran_is_aborted(tiny_models: dict[str, Path], adapters) -> None:
    llm = LLM(str(tiny_models["llama"]), max_loras=2, loras=(("a", str(adapters["llama"]["r4"])),))
    core = llm.engine
    core.add_request("base", PROMPTS[0], GREEDY)
    core.add_request("gone", PROMPTS[1], GREEDY, "a")
    llm.remove_adapter("a")
    outs = {o.request_id: o for o in core.step()}
    assert outs["gone"].finished and outs["gone"].finish_reason == "abort" and "'a'" in str(outs["gone"].stop_reason)
    while core.has_unfinished():
        outs.update({o.request_id: o for o in core.step()})
    assert outs["base"].finish_reason == "length" and len(outs["base"].token_ids) == 10
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
