"""README's fresh-machine commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    test_cmds = [b for b in blocks if "pytest" in b and "\n" not in b]
    assert test_cmds, "README must have a one-line test command in a ```bash block"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmds[0] in ci.splitlines()


def test_readme_serve_command_sets_up_and_serves_the_default_model():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    serve = [b for b in blocks if b.endswith("mlora serve")]
    assert serve, "README must have a one-line command that ends in `mlora serve`"
    assert "pip install torch==2.13.0" in serve[0] and "pip install ." in serve[0]
