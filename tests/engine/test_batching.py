"""Batch invariance, mid-flight arrivals, KV pressure with preemption, chunked prefill, abort."""

from __future__ import annotations

from pathlib import Path

from engine import LLM, SamplingParams
from engine.core import EngineCore
from engine.config import EngineConfig
from tests.engine.conftest import PROMPTS, hf_greedy

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _alone(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [llm.generate([p], params)[0].token_ids for p in prompts]


def _prompts(n: int) -> list[list[int]]:
    return [[1] + [(7 * i + 13 * j) % 250 + 3 for j in range(3 + (i * 5) % 29)] for i in range(n)]


def test_batch_equals_alone_and_transformers(llama_dir: Path, hf_llama) -> None:
    llm = LLM(str(llama_dir), enable_lora=False)
    prompts = _prompts(12)
    batch = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert batch == _alone(llm, prompts)
    assert batch[3] == hf_greedy(hf_llama, prompts[3], 24)


def test_mid_flight_arrivals_match_alone(llama_dir: Path) -> None:
    core = EngineCore(EngineConfig(model=str(llama_dir), enable_lora=False))
    prompts = _prompts(9)
    done: dict[str, list[int]] = {}
    for wave in range(3):  # a new wave of three requests joins every 5 steps
        for i in range(3):
            core.add_request(f"r{wave * 3 + i}", prompts[wave * 3 + i], GREEDY)
        for _ in range(5):
            done.update({o.request_id: o.token_ids for o in core.step() if o.finished})
    while core.has_unfinished():
        done.update({o.request_id: o.token_ids for o in core.step() if o.finished})
    alone = _alone(LLM(str(llama_dir), enable_lora=False), prompts)
    assert [done[f"r{i}"] for i in range(9)] == alone


def test_kv_pressure_preempts_and_recomputes_correctly(llama_dir: Path) -> None:
    """A pool too small for all requests at once forces preemption; outputs stay the same."""
    prompts = _prompts(8)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    small = LLM(str(llama_dir), enable_lora=False, num_kv_blocks=12, block_size=8, max_model_len=96)
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.block_manager.num_free_blocks == 12
    big = LLM(str(llama_dir), enable_lora=False)
    assert [o.token_ids for o in outs] == _alone(big, prompts, params)


def test_chunked_prefill_matches(llama_dir: Path) -> None:
    """Long prompts split over steps by a small token budget give the same tokens."""
    prompts = [list(range(3, 120)), list(range(40, 90)), [1, 2, 3]]
    chunked = LLM(str(llama_dir), enable_lora=False, max_num_batched_tokens=16)
    whole = LLM(str(llama_dir), enable_lora=False)
    assert [o.token_ids for o in chunked.generate(prompts, GREEDY)] == [o.token_ids for o in whole.generate(prompts, GREEDY)]


def test_abort_frees_all_blocks(llama_dir: Path) -> None:
    core = EngineCore(EngineConfig(model=str(llama_dir), enable_lora=False, block_size=4))
    total = core.block_manager.num_free_blocks
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        core.add_request(f"a{i}", p, long)
    for _ in range(6):
        core.step()
    assert core.block_manager.num_free_blocks < total
    core.add_request("waiting-one", [1, 2, 3], long)
    outs = [core.abort(f"a{i}") for i in range(len(PROMPTS))] + [core.abort("waiting-one")]
    assert all(o is not None and o.finished and o.finish_reason == "abort" for o in outs)
    assert core.block_manager.num_free_blocks == total
    assert not core.has_unfinished()
    assert core.abort("a0") is None


def test_max_model_len_ends_with_length(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), enable_lora=False, max_model_len=20)
    out = llm.generate([list(range(3, 15))], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 20


def test_seeded_sampling_survives_preemption(llama_dir: Path) -> None:
    prompts = _prompts(6)
    params = [SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=100 + i, ignore_eos=True) for i in range(6)]
    small = LLM(str(llama_dir), enable_lora=False, num_kv_blocks=10, block_size=8, max_model_len=80)
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    big = LLM(str(llama_dir), enable_lora=False)
    assert [o.token_ids for o in outs] == [big.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
