"""issue 18, `mlora serve` flags as a vLLM user passes them: --served-model-name, KV sizing, --seed,
--chat-template, --threads, ...; the startup summary; a busy port found before the model loads;
usage errors exit 2; a broken adapter in --lora-dir is skipped with a warning."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from engine.config import EngineConfig
from engine.demo import DEMO_ADAPTERS
from engine.errors import UsageError
from engine.server.config import ServerConfig
from mlora_cli.serve import build_config
from tests.server.real_server import ServerThread, scrape
from tests.test_cli import run_cli

_BASE = dict(host="127.0.0.1", port=0, allow_runtime_lora=False, grace_period=1.0, max_queue=8)


def test_flags_reach_the_engine_config(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    cfg = build_config(**_BASE, served_model_name="my-llm", kv_cache_memory_bytes=1 << 20, block_size=8,
                       max_num_batched_tokens=512, seed=7, revision="main", trust_remote_code=True,
                       chat_template=str(template), cpu_threads=2)
    e = cfg.engine
    assert (e.served_model_name, e.kv_cache_memory_bytes, e.block_size, e.max_num_batched_tokens, e.seed) == \
        ("my-llm", 1 << 20, 8, 512, 7)
    assert e.revision == "main" and e.trust_remote_code and e.cpu_threads == 2 and e.chat_template.startswith("{%")
    inline = build_config(**_BASE, chat_template="{{ messages[0]['content'] }}")
    assert inline.engine.chat_template == "{{ messages[0]['content'] }}"
    with pytest.raises(UsageError, match="neither a file nor a Jinja template"):
        build_config(**_BASE, chat_template="missing.jinja")
    with pytest.raises(UsageError, match="at most one of"):
        build_config(**_BASE, num_kv_blocks=10, gpu_memory_utilization=0.5)
    with pytest.raises(UsageError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=0.0)


def test_served_model_name_tokenize_and_summary_on_the_demo_model() -> None:
    """The real demo engine under another name, driven by the openai client; KV sized in blocks."""
    from engine.server.run import engine_summary

    cfg = ServerConfig(engine=EngineConfig(device="cpu", served_model_name="my-llm", num_kv_blocks=64, block_size=8,
                                           seed=3, cpu_threads=1), port=0)
    srv = ServerThread(cfg).start()
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0)
        ids = {m.id for m in client.models.list().data}
        assert "my-llm" in ids and {"upper", "reverse"} <= ids
        assert all(getattr(m, "parent", None) in (None, "my-llm") for m in client.models.list().data)
        r = client.completions.create(model="my-llm", prompt="hello world", max_tokens=16, temperature=0)
        assert r.model == "my-llm" and r.choices[0].text == "hello world"
        assert client.completions.create(model="upper", prompt="hello", max_tokens=8, temperature=0).choices[0].text \
            == "HELLO"
        body = json.dumps({"model": "my-llm", "prompt": "hello"}).encode()
        tok = json.loads(urllib.request.urlopen(urllib.request.Request(f"{srv.url}/tokenize", data=body)).read())
        assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == srv.engine.max_model_len
        msgs = [{"role": "user", "content": "hello"}, {"role": "user", "content": "there"}]
        body = json.dumps({"model": "my-llm", "messages": msgs}).encode()
        count = json.loads(urllib.request.urlopen(urllib.request.Request(f"{srv.url}/tokenize", data=body)).read())["count"]
        chat = client.chat.completions.create(model="my-llm", messages=msgs, max_tokens=2)  # type: ignore[arg-type]
        assert chat.usage is not None and chat.usage.prompt_tokens == count  # /tokenize counts what chat counts
        # vLLM's series under the served name; slot loads are timed (tier="slot"), not only disk loads
        assert scrape(srv.url, "vllm:request_success_total", model_name="my-llm", finished_reason="stop") >= 1
        assert scrape(srv.url, "vllm:prompt_tokens_total", model_name="my-llm") > 0
        assert scrape(srv.url, "vllm:request_queue_time_seconds_count", model_name="my-llm") >= 1
        assert scrape(srv.url, "mlora:lora_load_duration_seconds_count", tier="slot") >= 1
        line = engine_summary(srv.engine)
        assert "model my-llm" in line and "float32 on cpu" in line and "KV cache 512 tokens (64 blocks of 8)" in line
        assert f"max context {srv.engine.max_model_len} tokens" in line and "4 LoRA slots" in line
    finally:
        srv.stop()


def test_busy_port_fails_before_the_model_loads() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        res = run_cli("serve", "--port", str(port), "--device", "cpu")
        elapsed = time.monotonic() - t0
    assert res.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr and "loading the model" not in res.stdout + res.stderr
    assert elapsed < 15  # the interpreter and CLI start; no model load (the engine is never built)


@pytest.mark.parametrize(("args", "fragment"), [
    (("serve", "--lora", "upper="), "--lora expects NAME=PATH, got 'upper='"),
    (("serve", "--lora", "justaname"), "--lora expects NAME=PATH"),
    (("serve", "--replicas", "2"), "--replicas needs --ray"),
    (("serve", "--gpu-memory-utilization", "0.5", "--num-kv-blocks", "8"), "at most one of"),
])
def test_serve_usage_errors_exit_2(args: tuple[str, ...], fragment: str) -> None:
    res = run_cli(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert fragment in res.stderr and "Traceback" not in res.stderr


def test_lora_dir_skips_a_broken_adapter_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "loras"
    shutil.copytree(DEMO_ADAPTERS["upper"], d / "good")
    shutil.copytree(DEMO_ADAPTERS["reverse"], d / "broken")
    (d / "broken" / "adapter_config.json").write_text("{not json")
    cfg = build_config(**_BASE, lora_dir=str(d))
    assert [n for n, _ in cfg.engine.loras] == ["good"]
    err = capsys.readouterr().err
    assert "warning:" in err and "skipping adapter 'broken'" in err


def test_lora_dir_resolver_on_the_real_engine(tmp_path: Path) -> None:
    """vLLM's filesystem resolver with the openai client: an adapter copied into --lora-dir while the
    server runs is validated, registered and served on its first request; a missing one stays 404."""
    root = tmp_path / "root"
    loras = root / "loras"
    loras.mkdir(parents=True)
    cfg = ServerConfig(engine=EngineConfig(device="cpu", num_kv_blocks=64, block_size=8), port=0,
                       allow_runtime_lora=True, adapter_root=str(root), lora_dir=str(loras))
    srv = ServerThread(cfg).start()
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="r13", prompt="hello", max_tokens=8)
        shutil.copytree(DEMO_ADAPTERS["rot13"], loras / "r13")
        r = client.completions.create(model="r13", prompt="hello world", max_tokens=16, temperature=0)
        assert r.choices[0].text == "uryyb jbeyq" and r.model == "r13"
        assert "r13" in {m.id for m in client.models.list().data}
    finally:
        srv.stop()
