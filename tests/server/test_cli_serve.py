"""`mlora serve` as users run it: flags -> one config; SIGTERM drains in-flight requests and exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from engine.errors import ConfigError
from mlora_cli.serve import build_config, parse_lora

DEFAULTS = dict(host="127.0.0.1", port=8000, allow_runtime_lora=False, grace_period=10.0)


def test_flags_build_one_frozen_config(tmp_path: Path) -> None:
    cfg = build_config(**DEFAULTS, model="some/model", lora=["sql=/a/sql", "chat = ./chat"], max_loras=2,
                       max_lora_rank=32, max_cpu_loras=6, dtype="bf16", device="cpu", max_model_len=512,
                       max_num_seqs=8, max_queue=3, api_key="k", adapter_root=str(tmp_path))
    e = cfg.engine
    assert (e.model, e.loras, e.max_loras, e.max_lora_rank, e.max_cpu_loras) == (
        "some/model", (("sql", "/a/sql"), ("chat", "./chat")), 2, 32, 6)
    assert (e.dtype, e.device, e.max_model_len, e.max_num_seqs, e.max_queue) == ("bfloat16", "cpu", 512, 8, 3)
    assert cfg.api_key == "k" and cfg.adapter_root == os.path.realpath(tmp_path) and cfg.port == 8000
    with pytest.raises(Exception):
        cfg.port = 1  # type: ignore[misc]  # frozen
    # unset engine flags keep the engine's defaults; no --model = the demo model
    plain = build_config(**DEFAULTS)
    assert plain.engine.model is None and plain.engine.max_loras == 4 and plain.api_key is None
    # the CPU tier: a byte budget beyond the count by default; an explicit count alone is vLLM's cap
    assert plain.engine.max_cpu_lora_bytes == 2**30 and e.max_cpu_lora_bytes == 0
    sized = build_config(**DEFAULTS, max_cpu_loras=6, max_cpu_lora_bytes=5 * 2**20).engine
    assert (sized.max_cpu_loras, sized.max_cpu_lora_bytes) == (6, 5 * 2**20)


def test_lora_dtype_flag_reaches_the_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """--lora-dtype (vLLM's flag; mlora also takes float32) is EngineConfig.lora_dtype; auto by default."""
    import engine.server.run
    import mlora_cli.main
    from typer.testing import CliRunner

    assert build_config(**DEFAULTS).engine.lora_dtype == "auto"
    assert build_config(**DEFAULTS, dtype="bf16", lora_dtype="fp32").engine.lora_dtype == "float32"
    seen = []  # the parsed command line up to the server start (stubbed: no model loads)
    monkeypatch.setattr(engine.server.run, "serve", lambda config, **kw: seen.append(config))
    res = CliRunner().invoke(mlora_cli.main.app, ["serve", "--dtype", "bfloat16", "--lora-dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert (seen[0].engine.dtype, seen[0].engine.lora_dtype) == ("bfloat16", "float32")


def test_bad_lora_spec_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_lora(["just-a-path"])
    with pytest.raises(ConfigError, match="not allowed"):
        parse_lora(["a,b=/x"])
    with pytest.raises(ConfigError, match="duplicate"):
        build_config(**DEFAULTS, lora=["a=/x", "a=/y"])


def test_lora_compose_flag_builds_named_compositions() -> None:
    cfg = build_config(**DEFAULTS, lora_compose=["mix=style:0.7,domain:0.5", "neg = a:-0.25,b"])
    assert cfg.engine.lora_compose == (("mix", (("style", 0.7), ("domain", 0.5))), ("neg", (("a", -0.25), ("b", 1.0))))
    with pytest.raises(ConfigError, match="NAME=adapter:weight"):
        build_config(**DEFAULTS, lora_compose=["style:0.7"])
    with pytest.raises(ConfigError, match="not a number"):
        build_config(**DEFAULTS, lora_compose=["m=a:x"])
    with pytest.raises(ConfigError, match="at most 4"):
        build_config(**DEFAULTS, lora_compose=["m=a:1,b:1,c:1,d:1,e:1"])


def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny_base: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlora_cli.main", "serve", "--model", str(tiny_base), "--port", "0", "--device", "cpu",
         "--dtype", "float32", "--max-model-len", "128", "--grace-period", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        seen = []
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+) ", line)
            if m:
                url = m.group(1)
                break
        assert url, "".join(seen) + proc.stderr.read()  # type: ignore[union-attr]
        assert "adapters:" in proc.stdout.readline()  # type: ignore[union-attr]
        body = json.dumps({"prompt": "drain me", "max_tokens": 100, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        resp = urllib.request.urlopen(urllib.request.Request(f"{url}/v1/completions", data=body), timeout=60)
        first = resp.readline()
        assert first.startswith(b"data: ") and json.loads(first[6:])["choices"][0]["finish_reason"] is None
        proc.send_signal(signal.SIGTERM)  # mid-generation
        rest = resp.read().decode()
        events = [json.loads(first[6:])] + [json.loads(b[6:]) for b in rest.strip().split("\n\n") if b != "data: [DONE]"]
        assert rest.endswith("data: [DONE]\n\n")
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == 100  # every token arrived
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{url}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
