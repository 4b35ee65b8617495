"""`mlora serve`: Serve the base model and its LoRA adapters behind an OpenAI-compatible API."""

from __future__ import annotations

import typer

from engine.errors import NotBuiltError


def serve() -> None:
    """Serve the base model and its LoRA adapters behind an OpenAI-compatible API."""
    raise NotBuiltError("`mlora serve` is not built yet", hint="tracked in the project's issues")


def register(app: typer.Typer) -> None:
    app.command(name="serve", help="Serve the base model and its LoRA adapters behind an OpenAI-compatible API. [dim](not built yet)[/]")(serve)
