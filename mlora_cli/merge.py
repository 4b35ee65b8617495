"""`mlora merge`: bake a LoRA adapter into the base weights, exactly as PEFT would."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlora_cli._common import console

HELP = "Bake a LoRA adapter into the base weights, exactly as PEFT's merge_and_unload would."


def merge(
    adapter: Annotated[Path, typer.Argument(help="PEFT adapter directory (or hub id).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model directory.", show_default=False)],
    base: Annotated[
        str | None,
        typer.Option("--base", "-b", help="Base model dir or hub id (default: the adapter's base_model_name_or_path)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty output directory.")] = False,
) -> None:
    """Bake a LoRA adapter into the base weights, exactly as PEFT's merge_and_unload would."""
    from engine.adapters import load_adapter
    from engine.errors import ConfigError
    from engine.merge import MergeConfig, merge_adapter

    if base is None:
        base = load_adapter(adapter).config.base_model_name_or_path
        if not base:
            raise ConfigError("the adapter names no base model", hint="pass --base MODEL")
    with console.status("merging..."):
        report = merge_adapter(MergeConfig(base=base, adapter=str(adapter), out=out, force=force))
    extra = []
    if report.dora_modules:
        extra.append(f"{report.dora_modules} DoRA")
    if report.bias_modules:
        extra.append(f"{report.bias_modules} with lora_bias")
    note = f" ({', '.join(extra)})" if extra else ""
    console.print(
        f"merged {report.merged_modules} modules{note} into {report.out} "
        f"({len(report.files)} file(s), {report.bytes_written:,} bytes)"
    )


def register(app: typer.Typer) -> None:
    app.command(name="merge", help=HELP)(merge)
