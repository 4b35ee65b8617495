"""The isolation load test (benchmarks/isolation_load.py) at CI size: 200 requests against `mlora serve`'s demo,
10% hostile and 10% dropped streams; every well-formed output equals its solo run, no 5xx, KV back to 0,
bounded RSS growth, clean exit. The full size (2,000 requests) is run by hand: see the script's docstring."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_isolation_load_at_ci_size() -> None:
    res = subprocess.run([sys.executable, "-m", "benchmarks.isolation_load", "--requests", "200"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK: every well-formed output equals its solo run" in res.stdout
