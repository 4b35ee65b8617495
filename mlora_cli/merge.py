"""`mlora merge`: bake LoRA adapters into the base weights, exactly as PEFT's merge_and_unload would."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlora_cli._common import console

HELP = "Bake LoRA adapter(s) into the base weights, exactly as PEFT's merge_and_unload would, shard by shard."


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class _RichProgress:
    """One rich bar per shard (bytes written), used as engine.merge's MergeProgress."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.task = None

    def start_shard(self, name: str, total_bytes: int) -> None:
        self.task = self.progress.add_task(name, total=max(total_bytes, 1))

    def advance(self, nbytes: int) -> None:
        self.progress.advance(self.task, nbytes)

    def end_shard(self) -> None:
        task = next(t for t in self.progress.tasks if t.id == self.task)
        self.progress.update(self.task, completed=task.total)


_SIGTERM = "SIGTERM"


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list[bool]]:
    """SIGTERM (a supervisor, `kill`, a CI timeout) stops the merge like Ctrl+C: the staging
    directory is removed and the CLI exits non-zero with one line, instead of dying mid-write.
    Yields a flag set once SIGTERM arrived: raised inside a C call, the KeyboardInterrupt can come
    out as another exception (torch turns it into a ValueError), and the flag still says why."""
    termed = [False]
    if threading.current_thread() is not threading.main_thread():
        yield termed
        return

    def on_term(signum: int, frame: object) -> None:
        termed[0] = True
        raise KeyboardInterrupt(_SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield termed
    finally:
        signal.signal(signal.SIGTERM, previous)


def merge(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model directory (must not exist unless --force).", show_default=False)],
    adapter_arg: Annotated[
        Optional[Path],
        typer.Argument(metavar="[ADAPTER]", help="Shorthand for one --adapter.", show_default=False),
    ] = None,
    base: Annotated[
        Optional[str],
        typer.Option("--base", "-b", help="Base model dir or hub id (default: the first adapter's base_model_name_or_path)."),
    ] = None,
    adapters: Annotated[
        Optional[list[Path]],
        typer.Option("--adapter", "-a", help="PEFT adapter dir or hub id; repeat to merge several.", show_default=False),
    ] = None,
    weights: Annotated[
        Optional[list[float]],
        typer.Option("--weight", "-w", help="Weight of each adapter's delta, one per adapter in order (default 1.0).", show_default=False),
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Output dtype: auto (the base's), float32, float16, bfloat16.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Compare logits of the merged model with base+adapter(s); fail above --tolerance.")] = False,
    tolerance: Annotated[
        Optional[float],
        typer.Option("--tolerance", help="--verify limit on the max abs logit difference (default by dtype: fp32 1e-3, fp16 0.05, bf16 0.25)."),
    ] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write a JSON summary here ('-' = stdout).", show_default=False)] = None,
) -> None:
    """Bake LoRA adapter(s) into the base weights, exactly as PEFT's merge_and_unload would, shard by shard.

    mlora merge --base MODEL --adapter A [--weight 0.7 --adapter B --weight 0.3] --out DIR [--dtype bfloat16] [--verify]
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from engine.adapters.config import parse_adapter_config
    from engine.adapters.files import read_adapter_config_json, resolve_adapter_dir
    from engine.errors import ConfigError, MloraError, UsageError
    from engine.merge import AdapterSpec, MergeConfig, merge_adapter

    paths = [str(p) for p in ([adapter_arg] if adapter_arg is not None else []) + list(adapters or [])]
    if not paths:
        raise UsageError("no adapter given", hint="mlora merge --base MODEL --adapter PATH --out DIR")
    ws = list(weights or [])
    if ws and len(ws) != len(paths):
        raise UsageError(f"got {len(paths)} adapter(s) but {len(ws)} --weight value(s); give one weight per adapter or none")
    if base is None:
        base = parse_adapter_config(read_adapter_config_json(resolve_adapter_dir(paths[0]))).base_model_name_or_path
        if not base:
            raise ConfigError("the adapter names no base model", hint="pass --base MODEL")
    specs = tuple(AdapterSpec(p, w) for p, w in zip(paths, ws or [1.0] * len(paths)))
    config = MergeConfig(base=base, adapters=specs, out=out, dtype=dtype, force=force, verify=verify, tolerance=tolerance)
    quiet = str(json_file) == "-"
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    termed = [False]
    try:
        with _sigterm_as_interrupt() as termed, Progress(*columns, console=console, transient=False, disable=quiet) as progress:
            report = merge_adapter(config, progress=_RichProgress(progress))
    except BaseException as e:  # merge_adapter already removed its staging directory
        if not (termed[0] or isinstance(e, KeyboardInterrupt)):
            raise
        term = termed[0] or str(e) == _SIGTERM
        raise MloraError(f"interrupted by {'SIGTERM' if term else 'Ctrl+C'}: nothing was written to {out}",
                         exit_code=143 if term else 130) from None
    if json_file is not None:
        text = json.dumps(report.to_json(), indent=2) + "\n"
        if quiet:
            typer.echo(text, nl=False)
            return
        json_file.write_text(text)
    kinds = [(report.lora_modules, "LoRA"), (report.dora_modules, "DoRA"), (report.embedding_modules, "embedding LoRA"),
             (report.bias_modules, "lora_bias"), (report.replaced_tensors, "replaced (modules_to_save)")]  # fmt: skip
    what = ", ".join(f"{n} {label}" for n, label in kinds if n)
    console.print(
        f"merged {report.tensors_merged} tensors ({what}) from {len(specs)} adapter(s) into {report.out}: "
        f"{report.shards} shard(s), {_fmt_bytes(report.bytes_written)}, {report.seconds:.1f} s, "
        f"peak RSS {_fmt_bytes(report.peak_rss_bytes)}",
        highlight=False,
    )
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    if report.verify is not None:
        v = report.verify
        console.print(f"verify ok ({v.method}): max abs logit difference {v.max_abs_diff:.3g} <= {v.tolerance:.3g} on {v.prompts} prompts", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="merge", help=HELP)(merge)
