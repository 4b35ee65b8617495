"""`mlora serve --ray` as users run it: a clear error without Ray or with unsupported flags, and a real
start (local Ray instance, 1 replica), a request, Ctrl+C, exit 0 with Ray torn down."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from engine.errors import ConfigError
from mlora_cli.serve import build_config, scan_lora_dir


def _cli(*args: str, hide_ray: bool = False) -> subprocess.CompletedProcess:
    """Run `mlora ARGS` in a fresh interpreter (as the console script does); `hide_ray`: as if Ray were not installed."""
    hide = "import sys; sys.modules['ray'] = None; sys.modules['ray.serve'] = None; " if hide_ray else "import sys; "
    code = hide + "from mlora_cli.main import main; sys.argv = ['mlora', *sys.argv[1:]]; main()"
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MLORA_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def test_ray_not_installed_is_one_line_naming_the_extra() -> None:
    res = _cli("serve", "--ray", "--device", "cpu", hide_ray=True)
    assert res.returncode == 1
    assert "install mlora[ray]" in res.stderr and 'pip install "mlora[ray]"' in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_replicas_without_ray_is_a_one_line_error() -> None:
    res = _cli("serve", "--replicas", "3", "--device", "cpu")
    assert res.returncode == 1 and "--replicas needs --ray" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.ray
@pytest.mark.parametrize("flags, message", [
    (["--port", "0"], "--port 0 is not supported with --ray"),
    (["--allow-runtime-lora", "--adapter-root", "/"], "--allow-runtime-lora is not supported with --ray"),
])
def test_unsupported_flags_with_ray_are_one_line_errors(flags: list[str], message: str) -> None:
    pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'mlora[ray]'")
    res = _cli("serve", "--ray", "--device", "cpu", *flags)
    assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr + res.stdout


def test_lora_dir_names_each_adapter_after_its_directory(tmp_path: Path) -> None:
    from engine.demo import DEMO_ADAPTERS

    root = DEMO_ADAPTERS["upper"].parent
    cfg = build_config(host="127.0.0.1", port=8000, allow_runtime_lora=False, grace_period=1.0, lora_dir=str(root),
                       lora=["extra=/somewhere/else"])
    assert cfg.engine.loras == (("reverse", str(root / "reverse")), ("rot13", str(root / "rot13")),
                                ("upper", str(root / "upper")), ("extra", "/somewhere/else"))
    with pytest.raises(ConfigError, match="no adapter directories"):
        scan_lora_dir(str(tmp_path))
    (tmp_path / "bad name").mkdir()
    (tmp_path / "bad name" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="'bad name' is not allowed"):
        scan_lora_dir(str(tmp_path))
    with pytest.raises(ConfigError, match="not a directory"):
        scan_lora_dir(str(tmp_path / "missing"))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_serve_ray_answers_then_ctrl_c_exits_0() -> None:
    pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'mlora[ray]'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    from engine.demo import DEMO_ADAPTERS, DEMO_MODEL_DIR

    # the demo model by path, so its adapters come only from --lora-dir (the replicas' catalog)
    model, adapters = str(DEMO_MODEL_DIR), str(DEMO_ADAPTERS["upper"].parent)
    proc = subprocess.Popen([sys.executable, "-m", "mlora_cli.main", "serve", "--ray", "--replicas", "1", "--port",
                             str(port), "--device", "cpu", "--grace-period", "2", "--model", model,
                             "--lora-dir", adapters],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        seen = []
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if line.startswith("adapters:"):
                break
        out = "".join(seen)
        m = re.search(r"mlora serving (\S+) on Ray Serve \(1 replica\) at (http://127\.0\.0\.1:\d+) ", out)
        assert m and m.group(1) == model, out
        url = m.group(2)
        assert set(re.findall(r"\w+", seen[-1])) >= {"upper", "reverse", "rot13"}
        with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as r:
            cards = {c["id"]: c for c in json.loads(r.read())["data"]}
        assert set(cards) == {model, "upper", "reverse", "rot13"} and cards["rot13"]["root"] == f"{adapters}/rot13"
        body = json.dumps({"model": "reverse", "prompt": "hello world", "max_tokens": 32, "temperature": 0}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["choices"][0]["text"] == "dlrow olleh"
            assert r.headers.get("x-mlora-replica")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, proc.stdout.read()  # type: ignore[union-attr]
        assert "server stopped" in proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.ray
def test_replicas_reserve_a_gpu_when_they_would_use_one() -> None:
    pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'mlora[ray]'")
    from engine.config import EngineConfig
    from engine.server.config import ServerConfig
    from engine.server.ray_ingress import RayConfig, replica_gpus

    def cfg(device: str, gpus: float | None = None) -> RayConfig:
        return RayConfig(server=ServerConfig(engine=EngineConfig(device=device)), replica_gpus=gpus)

    assert [replica_gpus(cfg("auto"), 0), replica_gpus(cfg("auto"), 4), replica_gpus(cfg("cpu"), 4)] == [0, 1, 0]
    assert [replica_gpus(cfg("cuda"), 0), replica_gpus(cfg("cuda", 0.5), 1)] == [1, 0.5]


@pytest.mark.ray
def test_app_builder_refuses_unknown_options_in_one_line() -> None:
    pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'mlora[ray]'")
    from engine.server.ray_ingress import app_builder

    with pytest.raises(ConfigError, match="unknown engine option.*: bogus"):
        app_builder({"replicas": 1, "bogus": 1})
    with pytest.raises(ConfigError, match="--replicas must be an integer >= 1"):
        app_builder({"replicas": "0"})  # `serve run ... replicas=0` passes strings
    with pytest.raises(ConfigError, match="max_cpu_loras \\(1\\) must be >= max_loras \\(2\\)"):
        app_builder({"replicas": "1", "max_loras": "2", "max_cpu_loras": "1"})
