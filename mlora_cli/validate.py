"""`mlora validate`: Check that a PEFT LoRA adapter is servable, and if not, exactly why."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from mlora_cli._common import console

_STYLE = {"pass": "[green]pass[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]fail[/]"}


def validate(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Adapter directory (adapter_config.json + adapter_model.safetensors) or a Hub id.", show_default=False)],
    base: Annotated[
        Optional[str],
        typer.Option("--base", help="Base model (directory, config.json or Hub id) to check module dims and layer count against."),
    ] = None,
    max_lora_rank: Annotated[
        Optional[int],
        typer.Option("--max-lora-rank", min=1, help="Fail if the adapter's largest rank (incl. rank_pattern) exceeds this."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of a table.")] = False,
) -> None:
    """Check that a PEFT LoRA adapter is servable, and if not, exactly why.

    Exit 0: valid (warnings allowed). Exit 1: invalid. Exit 2: usage error.
    """
    from engine.adapters import validate_adapter

    report = validate_adapter(path, base=base, max_lora_rank=max_lora_rank)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        _render(report)
    raise typer.Exit(0 if report.valid else 1)


def _render(report) -> None:  # noqa: ANN001 - ValidationReport, imported lazily
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"mlora validate {escape(report.path)}", title_justify="left", show_lines=False)
    table.add_column("check", style="bold", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("message", overflow="fold")
    for c in report.checks:
        table.add_row(c.name, _STYLE[c.status], escape(c.message))
    console.print(table)
    a = report.adapter
    if a.get("rank") is not None and a.get("num_params") is not None:
        console.print(
            f"[dim]rank {a['rank']}, alpha {a['alpha']}, scaling {a['scaling']:.4g}, modules {a['target_modules']}, "
            f"{a['num_params']} params, {a['size_bytes']} bytes, {a['dtype']}[/]",
            highlight=False, soft_wrap=True,
        )
    style = "bold green" if report.valid else "bold red"
    console.print(f"[{style}]{escape(report.verdict())}[/]", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command(
        name="validate",
        help="Check that a PEFT LoRA adapter is servable, and if not, exactly why.",
        epilog="Exit status: 0 valid (warnings allowed), 1 invalid, 2 usage error.",
    )(validate)
