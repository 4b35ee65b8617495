"""Fixtures for server tests: real byte-level HF tokenizers and a fake-engine server on a free port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from engine.byte_tokenizer import save_byte_tokenizer
from engine.server.config import ServerConfig
from engine.server.run import RunningServer, shutdown, start_server
from tests.server.fake_engine import FakeEngine

# A ChatML-like template, as real instruct models ship one.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _load(path: Path, template: str | None) -> Any:
    from transformers import AutoTokenizer

    save_byte_tokenizer(path, chat_template=template)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The byte-level tokenizer without a chat template (like the demo model's)."""
    return _load(tmp_path_factory.mktemp("tok"), None)


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The byte-level tokenizer with a chat template."""
    return _load(tmp_path_factory.mktemp("tokchat"), CHAT_TEMPLATE)


@asynccontextmanager
async def running(engine: FakeEngine, **config: Any) -> AsyncIterator[RunningServer]:
    """A real listening server (127.0.0.1, free port) over `engine`; shut down on exit."""
    cfg = ServerConfig(engine=engine.config, host="127.0.0.1", port=0, **config)
    await engine.start()
    server = await start_server(engine, cfg)
    try:
        yield server
    finally:
        await shutdown(server, engine, 0.5)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def arun() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    return run


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real Llama model directory (tests/tiny.py)."""
    from tests.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", "llama", seed=0)


@pytest.fixture(scope="session")
def peft_adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real PEFT LoRA adapter for `tiny_base` (passes the validate library)."""
    from tests.tiny import build_peft_adapter

    return build_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "a", seed=1, r=4, lora_alpha=8)
