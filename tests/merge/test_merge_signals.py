"""A merge killed by SIGTERM cleans up and says so; one killed by SIGKILL leaves a staging directory
that the next merge removes (issue 15, "no leftovers"). Real subprocesses, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.merge.writer import LOCK_NAME, Staging, clean_stale_staging
from tests.tiny import build_peft_adapter

REPO = Path(__file__).resolve().parents[2]


def _start_merge(base: Path, adapter: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLORA_DEBUG", None)
    cmd = [sys.executable, "-m", "mlora_cli.main", "merge", "--base", str(base), "-a", str(adapter), "-o", str(out),
           "--verify"]  # --verify keeps the staging directory alive for seconds: a window to signal into
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _staging_dirs(parent: Path) -> list[Path]:
    return sorted(parent.glob(".*.mlora-merge-*"))


def _wait_for_staging(proc: subprocess.Popen, parent: Path) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = [d for d in _staging_dirs(parent) if (d / LOCK_NAME).exists() and any(d.glob("*.safetensors"))]
        if found:
            return found[0]
        assert proc.poll() is None, f"merge ended before it could be signalled: {proc.communicate()}"
        time.sleep(0.005)
    raise AssertionError("no staging directory appeared")


@pytest.fixture
def adapter(bases, tmp_path: Path) -> Path:
    return build_peft_adapter(bases["llama"], tmp_path / "a", r=4)


def test_sigterm_cleans_up_and_exits_with_one_line(bases, adapter: Path, tmp_path: Path) -> None:
    parent = tmp_path / "models"
    parent.mkdir()
    proc = _start_merge(bases["llama"], adapter, parent / "out")
    _wait_for_staging(proc, parent)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # handled (128 + SIGTERM), not killed by the signal
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0] == f"error: interrupted by SIGTERM: nothing was written to {parent / 'out'}"
    assert _staging_dirs(parent) == [] and not (parent / "out").exists()


def test_sigkill_leftovers_are_removed_by_the_next_merge(bases, adapter: Path, tmp_path: Path) -> None:
    parent = tmp_path / "models"
    parent.mkdir()
    proc = _start_merge(bases["llama"], adapter, parent / "out")
    stale = _wait_for_staging(proc, parent)
    proc.kill()
    proc.communicate(timeout=60)
    assert stale.exists()  # SIGKILL cannot be handled: the directory is left behind ...
    decoy = parent / ".notes.mlora-merge-0123abcd"  # our pattern but no lock file: not provably ours
    decoy.mkdir()
    other = parent / "keep-me"
    other.mkdir()
    proc = _start_merge(bases["llama"], adapter, parent / "out")  # ... and the next merge removes it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not stale.exists() and decoy.exists() and other.exists()
    assert (parent / "out").is_dir() and not (parent / "out" / LOCK_NAME).exists()
    assert "removed 1 staging directory left by earlier interrupted merges" in " ".join(out.split())


def test_a_running_merge_staging_is_never_removed(tmp_path: Path) -> None:
    live = Staging(tmp_path / "out")  # this process holds its lock
    assert clean_stale_staging(tmp_path) == [] and live.dir.exists()
    link = tmp_path / ".x.mlora-merge-deadbeef"
    link.symlink_to(live.dir)  # a symlink matching the pattern is never followed or removed
    live.discard()
    assert clean_stale_staging(tmp_path) == [] and link.is_symlink()
