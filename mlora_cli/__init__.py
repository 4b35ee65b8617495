"""mlora command-line interface (Typer)."""

from __future__ import annotations

from engine.version import __version__

__all__ = ["__version__"]
