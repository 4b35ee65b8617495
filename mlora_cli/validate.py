"""`mlora validate`: Check that a PEFT LoRA adapter is servable, and if not, exactly why."""

from __future__ import annotations

import typer

from engine.errors import NotBuiltError


def validate() -> None:
    """Check that a PEFT LoRA adapter is servable, and if not, exactly why."""
    raise NotBuiltError("`mlora validate` is not built yet", hint="tracked in the project's issues")


def register(app: typer.Typer) -> None:
    app.command(name="validate", help="Check that a PEFT LoRA adapter is servable, and if not, exactly why. [dim](not built yet)[/]")(validate)
