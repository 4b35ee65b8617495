"""`mlora bench`: Benchmark mixed-adapter batches against homogeneous ones and the alternatives."""

from __future__ import annotations

import typer

from engine.errors import NotBuiltError


def bench() -> None:
    """Benchmark mixed-adapter batches against homogeneous ones and the alternatives."""
    raise NotBuiltError("`mlora bench` is not built yet", hint="tracked in the project's issues")


def register(app: typer.Typer) -> None:
    app.command(name="bench", help="Benchmark mixed-adapter batches against homogeneous ones and the alternatives. [dim](not built yet)[/]")(bench)
