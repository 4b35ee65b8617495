"""`mlora serve` with no arguments: the built-in demo model and its adapters, through the openai client.

PENDING: not collected (the name does not start with test_) until the demo model and its adapters
ship as package data (engine/demo/model, engine/demo/adapters/*). Enable with
`git mv tests/server/pending_test_demo_serve.py tests/server/test_demo_serve.py`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import openai

EXPECTED = {
    None: "hello world",  # the base model copies
    "upper": "HELLO WORLD",
    "reverse": "dlrow olleh",
    "rot13": "uryyb jbeyq",
}


def test_mlora_serve_without_arguments_serves_the_demo() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "mlora_cli.main", "serve", "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("adapters:"):
                break
        out = "".join(lines)
        m = re.search(r"(http://127\.0\.0\.1:\d+) ", out)
        assert m, out + proc.stderr.read()  # type: ignore[union-attr]
        assert "mlora-demo" in out
        assert {"upper", "reverse", "rot13"} <= set(re.findall(r"\w+", lines[-1]))
        client = openai.OpenAI(base_url=m.group(1) + "/v1", api_key="none", max_retries=0)
        ids = {c.id: c for c in client.models.list().data}
        assert set(ids) == {"mlora-demo", "upper", "reverse", "rot13"}
        assert all(ids[a].parent == "mlora-demo" for a in ("upper", "reverse", "rot13"))  # type: ignore[attr-defined]
        for adapter, want in EXPECTED.items():
            model = adapter or "mlora-demo"
            r = client.completions.create(model=model, prompt="hello world", max_tokens=32, temperature=0)
            assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
            chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello world"}],
                                                  temperature=0)
            assert chat.choices[0].message.content == want
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
