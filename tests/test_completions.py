"""Shell completions are generated from the CLI and must not go stale."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mlora_cli.completions import FILES, generate_all

ROOT = Path(__file__).resolve().parents[1]
COMPLETIONS = ROOT / "completions"


@pytest.mark.parametrize("name", sorted(FILES.values()))
def test_checked_in_completion_matches_the_cli(name):
    fresh = generate_all()[name]
    on_disk = (COMPLETIONS / name).read_text()
    assert on_disk == fresh, (
        f"completions/{name} is stale: regenerate with `python -m mlora_cli.completions completions/`"
    )


def _bash_complete(words: list[str]) -> list[str]:
    script = COMPLETIONS / "mlora.bash"
    words_str = " ".join(f"'{w}'" for w in words)
    prog = (
        f"source '{script}'; COMP_WORDS=({words_str}); COMP_CWORD={len(words) - 1}; "
        '_mlora; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    res = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_completes_subcommands_and_their_options():
    assert set(_bash_complete(["mlora", "v"])) == {"validate"}
    assert "budget" in _bash_complete(["mlora", ""])
    opts = _bash_complete(["mlora", "validate", "--"])
    assert "--help" in opts


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh not installed")
def test_zsh_script_parses():
    res = subprocess.run(["zsh", "-n", str(COMPLETIONS / "_mlora")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish not installed")
def test_fish_script_parses():
    res = subprocess.run(["fish", "--no-execute", str(COMPLETIONS / "mlora.fish")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
