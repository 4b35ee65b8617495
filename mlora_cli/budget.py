"""`mlora budget`: Slot-memory math for a base model: bytes per adapter slot, KV-cache headroom, sequences that fit."""

from __future__ import annotations

import typer

from engine.errors import NotBuiltError


def budget() -> None:
    """Slot-memory math for a base model: bytes per adapter slot, KV-cache headroom, sequences that fit."""
    raise NotBuiltError("`mlora budget` is not built yet", hint="tracked in the project's issues")


def register(app: typer.Typer) -> None:
    app.command(name="budget", help="Slot-memory math for a base model: bytes per adapter slot, KV-cache headroom, sequences that fit. [dim](not built yet)[/]")(budget)
