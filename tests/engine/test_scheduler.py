"""Scheduler and block manager: torch-free, fast unit tests."""

from __future__ import annotations

import subprocess
import sys

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence


def test_scheduler_and_block_manager_import_no_torch() -> None:
    code = "import sys, engine.scheduler, engine.block_manager, engine.sequence, engine.detokenizer; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def _seq(rid: str, n: int, adapter: str | None = None, max_tokens: int = 4) -> Sequence:
    return Sequence(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter=adapter)


def _run(s: Scheduler, steps: int = 1000) -> list[list[str]]:
    """Drive the scheduler with a fake model that always samples token 7; returns per-step request ids."""
    log = []
    for _ in range(steps):
        if not s.has_unfinished():
            break
        out = s.schedule()
        log.append([it.seq.request_id for it in out.scheduled])
        s.postprocess(out, [7 if it.sample else None for it in out.scheduled])
    return log


def test_chunked_prefill_respects_token_budget() -> None:
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    seq = _seq("a", 20)
    s.add(seq)
    sizes = []
    while s.has_unfinished():
        out = s.schedule()
        sizes.append(out.num_tokens)
        s.postprocess(out, [7 if it.sample else None for it in out.scheduled])
    assert sizes == [8, 8, 4, 1, 1, 1]  # 20-token prompt in chunks of 8, then 3 decodes
    assert seq.output_token_ids == [7, 7, 7, 7] and seq.finish_reason == "length"
    assert bm.num_free_blocks == 64


def test_preemption_frees_blocks_and_requeues_at_front() -> None:
    bm = BlockManager(4, 4)  # 16 token slots for everyone
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = _seq("a", 6, max_tokens=6), _seq("b", 6, max_tokens=6)
    s.add(a)
    s.add(b)
    _run(s)
    assert s.num_preemptions >= 1
    assert a.num_output_tokens == 6 and b.num_output_tokens == 6
    assert bm.num_free_blocks == 4


def test_abort_releases_blocks() -> None:
    bm = BlockManager(16, 4)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    for i in range(3):
        s.add(_seq(f"r{i}", 9, max_tokens=50))
    out = s.schedule()
    s.postprocess(out, [7] * len(out.scheduled))
    assert bm.num_free_blocks < 16
    for i in range(3):
        assert s.abort(f"r{i}") is not None
    assert bm.num_free_blocks == 16 and not s.has_unfinished()


def test_max_loras_limits_distinct_adapters_per_step() -> None:
    s = Scheduler(BlockManager(256, 4), max_num_seqs=16, max_num_batched_tokens=512, max_loras=2)
    for i in range(8):
        s.add(_seq(f"r{i}", 3, adapter=f"ad{i % 4}"))
    while s.has_unfinished():
        out = s.schedule()
        assert len({n for it in out.scheduled for n in it.seq.adapter_names}) <= 2
        s.postprocess(out, [7 if it.sample else None for it in out.scheduled])


def test_resident_adapters_preferred() -> None:
    s = Scheduler(BlockManager(256, 4), max_num_seqs=1, max_num_batched_tokens=512, max_loras=1)
    s.add(_seq("cold", 3, adapter="cold"))
    s.add(_seq("warm", 3, adapter="warm"))
    out = s.schedule(resident={"warm"})
    assert [it.seq.request_id for it in out.scheduled] == ["warm"]


def test_hot_adapter_flood_does_not_starve_cold_request() -> None:
    """A hot adapter keeps the queue full; a cold request still runs within a bounded number of steps."""
    aging = 8
    s = Scheduler(BlockManager(512, 4), max_num_seqs=4, max_num_batched_tokens=512, max_loras=1, aging_steps=aging)
    n = 0
    for _ in range(4):
        s.add(_seq(f"hot{n}", 3, adapter="hot")); n += 1  # noqa: E702
    cold = _seq("cold", 3, adapter="cold")
    s.add(cold)
    for step in range(200):
        out = s.schedule(resident={"hot"})
        s.postprocess(out, [7 if it.sample else None for it in out.scheduled])
        for _ in range(2):  # the flood: new hot requests every step
            s.add(_seq(f"hot{n}", 3, adapter="hot")); n += 1  # noqa: E702
        if cold.is_finished:
            break
    assert cold.is_finished and cold.num_output_tokens == 4
    assert step < aging + 4 * 4 + 5  # aging, then drain the running hot requests (4 tokens each)


def test_long_prefill_does_not_stall_running_decodes() -> None:
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    short = _seq("short", 3, max_tokens=6)
    s.add(short)
    out = s.schedule()
    s.postprocess(out, [7])
    s.add(_seq("long", 40, max_tokens=2))
    for _ in range(5):  # while "long" prefills in chunks, "short" decodes every step
        before = short.num_output_tokens
        out = s.schedule()
        assert out.num_tokens <= 8
        s.postprocess(out, [7 if it.sample else None for it in out.scheduled])
        assert short.num_output_tokens == before + 1
