"""Prefix caching on the real engine (built-in demo model, fp32 on CPU, greedy): outputs are the
same with the cache on and off, and K/V are never shared across adapters, adapter versions or
requests whose numbers blew up."""

from __future__ import annotations

from pathlib import Path

import pytest

import engine.adapters.loader as adapter_loader
from engine import LLM, SamplingParams
from engine.loader import demo_adapters

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SYSTEM = "You are a helpful assistant for tenant number "  # 47 bytes: several full blocks of 4
# per tenant: a shared system prompt, short different user turns; base model and three adapters mixed
PROMPTS = [SYSTEM + f"{t}. user: {q}" for t in range(2) for q in ("hi", "what is up", "tell me more")]
ADAPTERS = [None, "upper", "reverse", "rot13", "upper", None]


def _llm(caching: bool, **kw) -> LLM:
    opts = dict(enable_lora=True, max_loras=4, max_num_seqs=16, num_kv_blocks=128, block_size=4, seed=0)
    opts.update(kw)
    return LLM(enable_prefix_caching=caching, **opts)


def _run(llm: LLM, prompts: list[str], adapters: list[str | None]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, GREEDY, adapters=adapters)]


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 24}, {"num_kv_blocks": 40, "max_num_batched_tokens": 64}],
                         ids=["one-batch", "chunked-prefill", "preemption"])
def test_outputs_equal_with_caching_on_and_off_across_mixed_adapters(kw) -> None:
    prompts = PROMPTS * 2  # every prompt of each (prompt, adapter) pair appears twice: exact repeats too
    adapters = [ADAPTERS[i % len(ADAPTERS)] for i in range(len(prompts))]
    off = _run(_llm(False, **kw), prompts, adapters)
    on_llm = _llm(True, **kw)
    on = _run(on_llm, prompts, adapters)
    again = _run(on_llm, prompts, adapters)  # a warm cache: nearly every prefix hits
    assert on == off and again == off
    bm = on_llm.engine.block_manager
    assert bm.hits > 0 and bm.queries > bm.hits
    assert bm.num_free_blocks == bm.num_blocks  # every reference dropped
    if "num_kv_blocks" in kw:
        assert on_llm.engine.scheduler.num_preemptions > 0


def test_adapter_a_never_reuses_adapter_b_blocks() -> None:
    llm = _llm(True)
    bm = llm.engine.block_manager
    prompt = SYSTEM + "same prompt for everyone"
    for adapter in (None, "upper", "reverse", "rot13"):
        llm.generate([prompt], GREEDY, adapters=[adapter])
        assert bm.hits == 0, f"{adapter} hit the blocks of another adapter"
    llm.generate([prompt], GREEDY, adapters=["reverse"])
    assert bm.hits > 0  # the same adapter does hit


def test_a_replaced_adapter_never_hits_the_old_versions_blocks() -> None:
    llm = _llm(True)
    bm = llm.engine.block_manager
    paths = dict(demo_adapters())
    prompt = SYSTEM + "replace me"
    llm.add_adapter("tenant", str(paths["upper"]))
    first = _run(llm, [prompt], ["tenant"])
    llm.add_adapter("tenant", str(paths["reverse"]))  # a new version under the same name
    hits = bm.hits
    second = _run(llm, [prompt], ["tenant"])
    assert bm.hits == hits
    assert second == _run(_llm(False), [prompt], ["reverse"]) and first != second
    llm.add_adapter("tenant", str(paths["reverse"]))  # same files again: still a new version, no hit
    assert _run(llm, [prompt], ["tenant"]) == second and bm.hits == hits
    _run(llm, [prompt], ["tenant"])
    assert bm.hits > hits


def test_a_non_finite_requests_blocks_are_never_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.engine.test_isolation_numeric import _poisoned_copy

    llm = _llm(True)
    bm = llm.engine.block_manager
    monkeypatch.setattr(adapter_loader, "module_value_issue", lambda *a, **k: None)
    llm.add_adapter("evil", str(_poisoned_copy(tmp_path / "evil")))
    prompt = SYSTEM + "poison"
    for _ in range(2):
        out = llm.generate([prompt], GREEDY, adapters=["evil"])[0]
        assert out.error and "non-finite" in out.error
    assert bm.hits == 0
    ok = _run(llm, [prompt, prompt], [None, "upper"])
    assert ok == _run(_llm(False), [prompt, prompt], [None, "upper"])


def test_prompt_logprobs_requests_compute_every_prompt_position() -> None:
    llm = _llm(True)
    prompt = SYSTEM + "score me"
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    first = llm.generate([prompt], params)[0]
    second = llm.generate([prompt], params)[0]
    assert len(second.prompt_logprobs) == len(first.prompt_logprobs) == len(first.prompt_token_ids)
    assert second.prompt_logprobs == first.prompt_logprobs and second.token_ids == first.token_ids
    assert llm.engine.block_manager.hits == 0


def test_llm_option_and_default() -> None:
    assert _llm(True).engine.block_manager.enable_prefix_caching
    assert not _llm(False).engine.block_manager.enable_prefix_caching
    assert LLM(num_kv_blocks=16).engine.block_manager.enable_prefix_caching  # on by default, as vLLM


def test_a_composition_never_shares_blocks_with_its_components_or_other_weights() -> None:
    """A composed request's K/V depend on every component and weight: it never hits the blocks of
    its first component alone, nor of the same components with other weights; with the cache on,
    every output equals the cache-off run."""
    prompt = SYSTEM + "compose me"
    cases = ["upper", [("upper", 0.5), ("reverse", 0.5)], [("upper", 0.7), ("reverse", 0.3)], "upper",
             [("upper", 0.5), ("reverse", 0.5)]]
    off_llm, on_llm = _llm(False), _llm(True)
    bm = on_llm.engine.block_manager
    for i, adapters in enumerate(cases):
        off = _run(off_llm, [prompt], [adapters])
        before = bm.hits
        assert _run(on_llm, [prompt], [adapters]) == off, adapters
        if i < 3:
            assert bm.hits == before, f"{adapters} hit blocks computed under another adapter set"
        else:
            assert bm.hits > before  # the same adapter (set and weights) again does hit
