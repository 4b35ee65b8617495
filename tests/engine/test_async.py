"""AsyncLLM: streaming deltas, abort on close, early errors, responsiveness, stats."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import AsyncLLM, EngineConfig, LLM, SamplingParams
from engine.errors import EngineStoppedError, PromptTooLongError, QueueFullError
from tests.engine.conftest import PROMPTS

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def test_streams_equal_offline_and_deltas_concatenate(llama_dir: Path) -> None:
    offline = LLM(str(llama_dir), enable_lora=False).generate(["hello there", PROMPTS[0], "abc"], GREEDY)

    async def main() -> list[tuple[str, list[int], list]]:
        eng = AsyncLLM(EngineConfig(model=str(llama_dir), enable_lora=False))
        await eng.start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        async def one(i: int, prompt) -> tuple[str, list[int], list]:
            text, ids, outs = "", [], []
            async for out in eng.generate(prompt, GREEDY, request_id=f"r{i}"):
                text += out.delta_text
                ids += out.delta_token_ids
                outs.append(out)
            return text, ids, outs

        t = asyncio.create_task(ticker())
        res = await asyncio.gather(*(one(i, p) for i, p in enumerate(["hello there", PROMPTS[0], "abc"])))
        t.cancel()
        assert ticks > 10  # the event loop kept running while steps computed in a thread
        await eng.stop()
        return res

    for (text, ids, outs), ref in zip(asyncio.run(main()), offline):
        assert ids == ref.token_ids and text == ref.text
        assert outs[-1].finished and outs[-1].text == ref.text and not any(o.finished for o in outs[:-1])


def test_closing_the_stream_aborts_and_frees_blocks(llama_dir: Path) -> None:
    async def main() -> None:
        eng = AsyncLLM(EngineConfig(model=str(llama_dir), enable_lora=False))
        await eng.start()
        free0 = eng.stats().kv_free_blocks
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        gens = [eng.generate(p, long, request_id=f"s{i}") for i, p in enumerate(PROMPTS)]
        for g in gens:
            await g.__anext__()
        assert eng.stats().num_running == len(PROMPTS)
        for g in gens:
            await g.aclose()
        for _ in range(200):
            await asyncio.sleep(0.01)
            s = eng.stats()
            if s.num_running == 0 and s.kv_free_blocks == free0:
                break
        assert eng.stats().kv_free_blocks == free0 and eng.stats().num_running == 0
        # explicit abort() ends a stream with finish_reason "abort"
        outs = []

        async def consume() -> None:
            async for out in eng.generate(PROMPTS[0], long, request_id="x"):
                outs.append(out)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await eng.abort("x")
        await task
        assert outs[-1].finish_reason == "abort"
        await eng.stop()

    asyncio.run(main())


def test_errors_before_first_output(llama_dir: Path) -> None:
    async def main() -> None:
        eng = AsyncLLM(EngineConfig(model=str(llama_dir), enable_lora=False, max_queue=0, max_model_len=32))
        with pytest.raises(EngineStoppedError):
            await eng.generate("hi", GREEDY, request_id="a").__anext__()
        await eng.start()
        with pytest.raises(PromptTooLongError):
            await eng.generate(list(range(3, 60)), GREEDY, request_id="b").__anext__()
        with pytest.raises(QueueFullError):
            await eng.generate("hi", GREEDY, request_id="c").__anext__()
        await eng.stop()
        with pytest.raises(EngineStoppedError):
            await eng.generate("hi", GREEDY, request_id="d").__anext__()

    asyncio.run(main())


def test_stop_lets_running_requests_finish(llama_dir: Path) -> None:
    async def main() -> list:
        eng = AsyncLLM(EngineConfig(model=str(llama_dir), enable_lora=False))
        await eng.start()
        outs: list = []

        async def consume() -> None:
            async for out in eng.generate(PROMPTS[1], GREEDY, request_id="z"):
                outs.append(out)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.005)
        await eng.stop(grace_s=30)
        await task
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 16


def test_async_adapters_and_stats(llama_dir: Path, tmp_path: Path) -> None:
    from engine.errors import AdapterError, AdapterNotFoundError
    from tests.tiny import build_peft_adapter

    good = build_peft_adapter(llama_dir, tmp_path / "good", seed=3, r=4, lora_alpha=8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    want = LLM(str(llama_dir), loras=(("good", str(good)),)).generate([PROMPTS[0]], GREEDY, adapters=["good"])[0]

    async def main() -> None:
        eng = AsyncLLM(EngineConfig(model=str(llama_dir), max_loras=2))
        await eng.start()
        await eng.add_adapter("good", str(good))
        with pytest.raises(AdapterError):
            await eng.add_adapter("bad", str(tmp_path / "bad"))
        assert eng.list_adapters() == ["good"]
        long = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
        stream = eng.generate(PROMPTS[1], long, request_id="long", adapter="good")
        await stream.__anext__()
        s = eng.stats()
        assert s.running_by_adapter == {"good": 1} and s.resident_adapters == ["good"] and s.lora_loads == 1
        await stream.aclose()
        outs = [o async for o in eng.generate(PROMPTS[0], GREEDY, request_id="g", adapter="good")]
        assert outs[-1].token_ids == want.token_ids and outs[-1].adapter == "good"
        await eng.remove_adapter("good")
        with pytest.raises(AdapterNotFoundError):
            await eng.generate(PROMPTS[0], GREEDY, request_id="h", adapter="good").__anext__()
        await eng.stop()

    asyncio.run(main())
