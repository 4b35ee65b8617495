"""The `mlora` Typer app: one thin module per subcommand, registered here."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from mlora_cli import __version__
from mlora_cli._common import debug_enabled, print_error

app = typer.Typer(
    name="mlora",
    help="mlora: one base LLM, many LoRA adapters, one server.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mlora {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", "-V", help="Show the version and exit.", callback=_version_callback, is_eager=True),
    ] = None,
) -> None:
    """mlora: one base LLM, many LoRA adapters, one server."""


def _register() -> None:
    # Imported here so each command module stays thin and `mlora -h` stays fast.
    from mlora_cli import bench, budget, merge, serve, validate

    for module in (validate, budget, serve, bench, merge):
        module.register(app)


_register()


def main() -> None:
    """Console-script entry point: known errors are one line + hint, exit 1; never a raw traceback."""
    from engine.errors import MloraError

    try:
        app(prog_name="mlora")
    except MloraError as exc:
        if debug_enabled():
            raise
        print_error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last line of defence: no raw tracebacks
        if debug_enabled():
            raise
        print_error(f"internal error: {type(exc).__name__}: {exc}", "this is a bug in mlora; please report it")
        sys.exit(1)


if __name__ == "__main__":
    main()
