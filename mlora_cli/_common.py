"""Shared CLI helpers: consoles and the one-line error convention."""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape

PIPE_WIDTH = 1000  # when piped (CI logs, files) rich would wrap and cut tables at 80 columns; lines are never that wide


def _console(*, stderr: bool = False) -> Console:
    """A console that never squeezes tables to 80 columns when not on a terminal (COLUMNS still wins)."""
    c = Console(stderr=stderr)
    if not c.is_terminal and not os.environ.get("COLUMNS"):
        c = Console(stderr=stderr, width=PIPE_WIDTH)
    return c


console = _console()
err_console = _console(stderr=True)

DEBUG_ENV = "MLORA_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "False")


def print_error(message: str, hint: str | None = None) -> None:
    """Print a known error as one line, plus a hint line (never a traceback)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    extra = f"hint: {escape(hint)}  " if hint else ""
    err_console.print(f"[dim]{extra}(set {DEBUG_ENV}=1 for the traceback)[/]", highlight=False, soft_wrap=True)
