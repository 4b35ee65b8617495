"""AsyncLLM's thread ownership: only the engine thread calls into EngineCore, its scheduler and its LoRA engine.

Every method of the three objects is wrapped on the instance to record the thread that calls it; a server-like
mix of requests (base, adapter, composition, an unknown adapter, an abort, runtime adapter and composition
changes) must leave calls from one thread only, the engine thread. `stats()` is the documented exception
(atomic snapshots for a /metrics scrape) and is not exercised here.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path
from typing import Any

import pytest

from engine import AsyncLLM, EngineConfig, SamplingParams
from engine.async_llm import ENGINE_THREAD_NAME
from engine.errors import AdapterNotFoundError
from tests.engine.conftest import PROMPTS

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _record_threads(objects: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Wrap each method of `objects` (on the instance) to log (object.method, thread name, thread id)."""
    calls: list[tuple[str, str, int]] = []
    for label, obj in objects.items():
        for name in dir(type(obj)):
            if name.startswith("__") or not callable(getattr(type(obj), name, None)) or isinstance(
                    getattr(type(obj), name), (type, property)):
                continue

            def wrap(fn: Any, what: str) -> Any:
                @functools.wraps(fn)
                def recorded(*args: Any, **kwargs: Any) -> Any:
                    t = threading.current_thread()
                    calls.append((what, t.name, t.ident or 0))
                    return fn(*args, **kwargs)

                return recorded

            setattr(obj, name, wrap(getattr(obj, name), f"{label}.{name}"))
    return calls


def test_only_the_engine_thread_touches_the_core(llama_dir: Path, tmp_path: Path) -> None:
    from tests.tiny import build_peft_adapter

    good = build_peft_adapter(llama_dir, tmp_path / "good", seed=3, r=4, lora_alpha=8)
    other = build_peft_adapter(llama_dir, tmp_path / "other", seed=4, r=4, lora_alpha=8)

    async def main() -> list[tuple[str, str, int]]:
        eng = AsyncLLM(EngineConfig(model=str(llama_dir), max_loras=2, max_queue=16, max_queue_per_tenant=8))
        calls = _record_threads({"core": eng.core, "scheduler": eng.core.scheduler, "lora": eng.core.lora})
        await eng.start()
        await eng.add_adapter("good", str(good))
        await eng.add_adapter("other", str(other), weight=2.0)
        await eng.add_composition("mix", "good:0.5,other:0.5")

        async def run(rid: str, prompt: Any, **kw: Any) -> list[Any]:
            return [o async for o in eng.generate(prompt, GREEDY, request_id=rid, **kw)]

        outs = await asyncio.gather(run("base", PROMPTS[0]), run("ids", [5, 6, 7], adapter="good"),
                                    run("mix", PROMPTS[1], adapter="mix"), run("t", "x", tenant="acme"))
        assert all(o[-1].finished for o in outs)
        with pytest.raises(AdapterNotFoundError):  # found unknown on the engine thread, raised to the caller
            await run("nope", PROMPTS[0], adapter="nope")
        long = eng.generate(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), request_id="long")
        await long.__anext__()
        await long.aclose()  # an abort through the inbox
        await eng.remove_composition("mix")
        await eng.remove_adapter("other")
        await eng.stop()
        return calls

    calls = asyncio.run(main())
    assert {"core.step", "core.add_processed", "core.abort", "scheduler.add", "core.add_composition"} <= {c[0] for c in calls}
    off = sorted({(what, name) for what, name, _ in calls if not name.startswith(ENGINE_THREAD_NAME)})
    assert not off, f"called off the engine thread: {off}"
    assert len({ident for *_, ident in calls}) == 1  # one engine thread for the engine's life


def test_the_recorder_sees_a_call_from_another_thread(llama_dir: Path) -> None:
    """The check above would catch the old design (the event loop calling core.tokenize / resolve_adapters)."""
    eng = AsyncLLM(EngineConfig(model=str(llama_dir), enable_lora=False))
    calls = _record_threads({"core": eng.core, "scheduler": eng.core.scheduler})
    eng.core.has_unfinished()
    assert calls[0][0] == "core.has_unfinished" and not calls[0][1].startswith(ENGINE_THREAD_NAME)
