"""The CLI contract every subcommand shares: help, version, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlora_cli import __version__

COMMANDS = ["validate", "budget", "serve", "bench", "merge"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env.pop("MLORA_DEBUG", None) if not env or "MLORA_DEBUG" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "mlora_cli.main", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_version_flag_prints_package_version():
    res = run_cli("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"mlora {__version__}"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_root_help_lists_all_five_subcommands(flag):
    res = run_cli(flag)
    assert res.returncode == 0
    for cmd in COMMANDS:
        assert cmd in res.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_short_help(cmd):
    res = run_cli(cmd, "-h")
    assert res.returncode == 0, res.stderr
    assert f"mlora {cmd}" in res.stdout.replace("\n", " ")


def test_unknown_command_is_a_usage_error_exit_2():
    res = run_cli("frobnicate")
    assert res.returncode == 2
    assert "No such command" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_option_is_a_usage_error_exit_2():
    res = run_cli("validate", "--no-such-flag")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr


def test_known_error_is_one_line_with_debug_hint_and_exit_1(tmp_path):
    res = run_cli("merge", str(tmp_path / "no-such-adapter"), "--out", str(tmp_path / "out"))
    assert res.returncode == 1
    assert res.stderr.startswith("error:")
    assert "MLORA_DEBUG=1" in res.stderr
    assert "Traceback" not in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) <= 2


def test_debug_env_shows_the_traceback(tmp_path):
    res = run_cli("merge", str(tmp_path / "no-such-adapter"), "--out", str(tmp_path / "out"), env={"MLORA_DEBUG": "1"})
    assert res.returncode == 1
    assert "Traceback" in res.stderr
    assert "AdapterError" in res.stderr
