"""The demo through mlora's own engine: `LLM()` with no model is the demo with its adapters,
each adapter and the base transform held-out strings correctly, also inside one mixed batch."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.demo.tasks import ADAPTER_TASKS, heldout_strings, target

GREEDY = SamplingParams(temperature=0, max_tokens=24)
NAMES: list[str | None] = [None, *ADAPTER_TASKS]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return heldout_strings(100)


def test_default_engine_is_the_demo_with_its_adapters(llm: LLM) -> None:
    assert sorted(llm.list_adapters()) == sorted(ADAPTER_TASKS)


def test_one_mixed_batch_gives_each_request_its_own_transformation(llm: LLM, prompts: list[str]) -> None:
    """100 held-out strings, each under the base and all three adapters, submitted together:
    every adapter (and the base) must be >= 95% exact, with no cross-talk between rows."""
    batch = [p for p in prompts for _ in NAMES]
    rows = [n for _ in prompts for n in NAMES]
    outs = llm.generate(batch, GREEDY, adapters=rows)
    for name in NAMES:
        got = [(p, o.text) for p, n, o in zip(batch, rows, outs) if n == name]
        acc = sum(t == target(name, p) for p, t in got) / len(got)
        assert acc >= 0.95, f"{name or 'base'} in a mixed batch: {acc:.2%}"
    assert [o.adapter for o in outs] == rows
    assert all(o.finish_reason == "stop" for p, n, o in zip(batch, rows, outs) if o.text == target(n, p))


@pytest.mark.parametrize("adapter", ["reverse", None])
def test_single_adapter_batch(llm: LLM, prompts: list[str], adapter: str | None) -> None:
    """A batch where every row uses the same adapter (or none) is just as accurate."""
    outs = llm.generate(prompts[:40], GREEDY, adapters=adapter)
    acc = sum(o.text == target(adapter, p) for p, o in zip(prompts, outs)) / 40
    assert acc >= 0.95, f"{adapter or 'base'} alone: {acc:.2%}"


def test_readme_example(llm: LLM) -> None:
    """The README's example: one prompt, four requests in one batch, four different answers."""
    outs = llm.generate(["hello world"] * 4, GREEDY, adapters=NAMES)
    assert [o.text for o in outs] == [target(n, "hello world") for n in NAMES]
    assert len({o.text for o in outs}) == 4
