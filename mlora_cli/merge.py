"""`mlora merge`: Bake a LoRA adapter into the base weights, exactly as PEFT would."""

from __future__ import annotations

import typer

from engine.errors import NotBuiltError


def merge() -> None:
    """Bake a LoRA adapter into the base weights, exactly as PEFT would."""
    raise NotBuiltError("`mlora merge` is not built yet", hint="tracked in the project's issues")


def register(app: typer.Typer) -> None:
    app.command(name="merge", help="Bake a LoRA adapter into the base weights, exactly as PEFT would. [dim](not built yet)[/]")(merge)
