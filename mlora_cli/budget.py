"""`mlora budget`: exact LoRA slot memory, base weights, KV-cache headroom and a working-set recommendation.

Thin: parse flags -> one frozen `BudgetConfig` -> `plan_budget` -> rich tables (or `--json`).
Exit 0 when it fits, 3 when weights + slots (or one max-length sequence of KV) exceed the GPU budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

EXIT_DOES_NOT_FIT = 3


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value, unit = float(abs(n)), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    sign = "-" if n < 0 else ""
    return f"{n:,} ({sign}{value:.1f} {unit})" if unit != "B" else f"{n:,}"


def _fmt_short(n: int) -> str:
    """'112.7 GiB (121,026,553,447 bytes)': the human figure first, then the exact one."""
    human = _fmt_bytes(n)
    return human[human.index("(") + 1 : -1] + f" ({n:,} bytes)" if "(" in human else f"{n:,} bytes"


def budget(
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", help="Local model dir or config.json, a preset (llama-3.1-8b, llama-3.1-70b, llama-3.2-1b, mistral-7b, qwen2.5-7b, qwen3-8b) or a hub id (config only). Default: llama-3.1-8b.", envvar="MLORA_MODEL", show_default=False),
    ] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", min=1, help="Slot rank (max LoRA rank a slot holds).")] = 16,
    max_loras: Annotated[int, typer.Option("--max-loras", min=1, help="Adapter slots resident on the GPU.")] = 4,
    target_modules: Annotated[str, typer.Option("--target-modules", help="Comma list of q,k,v,o,gate,up,down (or q_proj,...), or 'all'.")] = "all",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp16 | bf16 | fp32 for weights, KV and (unless --lora-dtype) slots. Default: the model's torch_dtype.", show_default=False)] = None,
    lora_dtype: Annotated[Optional[str], typer.Option("--lora-dtype", help="auto | fp16 | bf16 | fp32 for the LoRA slots, as mlora serve --lora-dtype (fp32 on a bf16 model: 2x the slot bytes). Default: auto (--dtype).", show_default=False)] = None,
    max_cpu_loras: Annotated[Optional[int], typer.Option("--max-cpu-loras", min=0, help="Adapters cached in CPU memory. Default: 2 x --max-loras, as mlora serve.", show_default=False)] = None,
    adapter: Annotated[Optional[list[Path]], typer.Option("--adapter", help="A PEFT adapter dir: report its true size vs the padded slot (repeatable).")] = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="GPU preset: A100-40GB, A100-80GB, H100-80GB, L4, A10G, RTX-4090. Default: H100-80GB.", show_default=False)] = None,
    gpu_memory: Annotated[Optional[float], typer.Option("--gpu-memory", min=0.001, help="GPU memory in GiB (2^30 bytes), instead of --gpu.", show_default=False)] = None,
    gpu_memory_utilization: Annotated[float, typer.Option("--gpu-memory-utilization", min=0.0, max=1.0, help="Fraction of GPU memory the engine may use.")] = 0.9,
    max_model_len: Annotated[Optional[int], typer.Option("--max-model-len", min=1, help="Context length per sequence. Default: the model's max_position_embeddings, capped at 8192.", show_default=False)] = None,
    block_size: Annotated[int, typer.Option("--block-size", min=1, help="KV-cache block size in tokens.")] = 16,
    trace: Annotated[Optional[Path], typer.Option("--trace", help="JSONL request log ({'timestamp', 'adapter' or 'model'} per line): replay it to size --max-loras.")] = None,
    target_hit_rate: Annotated[float, typer.Option("--target-hit-rate", min=0.0, max=1.0, help="Slot hit rate the recommendation must reach.")] = 0.99,
    served_model_name: Annotated[Optional[list[str]], typer.Option("--served-model-name", help="A name the --trace uses for the base model (repeatable); such lines are base-model requests, like --model as given, its preset or hub name.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (stable keys).")] = False,
) -> None:
    """Exact LoRA slot memory, base weights and KV-cache headroom; with --trace, the max_loras a real workload needs.

    Exits 3 when base weights + slots (or one --max-model-len sequence of KV cache) do not fit the GPU budget.
    """
    from engine.errors import UsageError
    from engine.planning.budget_plan import BudgetConfig, plan_budget

    gpu_bytes = None if gpu_memory is None else gpu_memory * (1 << 30)
    if gpu_bytes is not None and not math.isfinite(gpu_bytes):  # "inf", "1e308": int() would raise OverflowError
        raise UsageError(f"--gpu-memory must be a finite number of GiB, got {gpu_memory}")
    config = BudgetConfig(
        model=model,
        rank=rank,
        max_loras=max_loras,
        target_modules=tuple(target_modules.split(",")),
        dtype=dtype,
        lora_dtype=lora_dtype,
        max_cpu_loras=max_cpu_loras,
        adapters=tuple(str(p) for p in adapter or ()),
        gpu=gpu,
        gpu_memory_bytes=None if gpu_bytes is None else int(gpu_bytes),
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        block_size=block_size,
        trace=None if trace is None else str(trace),
        target_hit_rate=target_hit_rate,
        served_model_names=tuple(served_model_name or ()),
    )
    if trace is not None and not as_json:
        report = _plan_with_progress(config)
    else:
        report = plan_budget(config)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _render(report)
    if not report.fits:
        from mlora_cli._common import err_console

        err_console.print(f"[bold red]does not fit:[/] {_shortfall_text(report)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _shortfall_text(report) -> str:  # noqa: ANN001 - BudgetReport, imported lazily
    short = _fmt_short(report.shortfall_bytes)
    if report.kv_available_bytes < 0:
        return (
            f"base weights + {report.max_loras} LoRA slots exceed the GPU budget "
            f"({_fmt_short(report.gpu_budget_bytes)}) by {short}"
        )
    return (
        f"the KV cache left ({report.kv_tokens:,} tokens) cannot hold one {report.max_model_len:,}-token sequence; "
        f"short by {short} (lower --max-model-len or --max-loras, or use a bigger GPU)"
    )


def _plan_with_progress(config):  # noqa: ANN001, ANN202 - BudgetConfig -> BudgetReport
    """plan_budget with a progress bar on stderr while the trace replays (only on a terminal)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from engine.planning.budget_plan import plan_budget
    from mlora_cli._common import err_console

    columns = (TextColumn("replaying trace"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("trace", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return plan_budget(config, progress=on_progress)


def _render(report) -> None:  # noqa: ANN001 - BudgetReport, imported lazily
    """Rich tables: per-module breakdown, memory summary, adapters, trace replay, notes."""
    from rich.table import Table

    from mlora_cli._common import console

    d = report.model
    console.print(
        f"[bold]{report.model_source}[/]: {d.model_type}, {d.layers} layers, hidden {d.hidden}, "
        f"intermediate {d.intermediate}, heads {d.heads}/{d.kv_heads} kv, head_dim {d.head_dim}, "
        f"vocab {d.vocab}{' (tied)' if d.tie_word_embeddings else ''}; dtype {report.dtype}"
        f"{f', LoRA slots {report.lora_dtype}' if report.lora_dtype != report.dtype else ''}",
        highlight=False,
    )
    mods = Table(title=f"LoRA modules, one layer (slot rank {report.rank}, {report.max_loras} slots)", title_justify="left")
    for col in ("module", "in", "out", "elements / rank", "A stack", "B stack", "bytes / slot / layer"):
        mods.add_column(col, justify="left" if col in ("module", "A stack", "B stack") else "right")
    for r in report.modules:
        mods.add_row(r.module, f"{r.in_features:,}", f"{r.out_features:,}", f"{r.elements_per_rank:,}",
                     str(list(r.a_shape)), str(list(r.b_shape)), f"{r.bytes_per_slot_per_layer:,}")  # fmt: skip
    console.print(mods)

    mem = Table(title="Memory (bytes)", title_justify="left")
    mem.add_column("item")
    mem.add_column("bytes", justify="right")
    mem.add_column("how", style="dim")
    b = report.base_weight_breakdown
    gpu = report.gpu_name or "--gpu-memory"
    rows = [
        ("bytes per adapter slot", report.bytes_per_adapter, f"{d.layers} layers x sum(r x (in + out)) x {report.lora_dtype}"),
        (f"{report.max_loras} slots (GPU)", report.total_slot_bytes, "slot x max_loras"),
        (f"CPU cache ({report.cpu_cache_adapters} adapters)", report.cpu_cache_bytes,
         "slot x max_cpu_loras" if report.cpu_cache_adapters == report.max_cpu_loras
         else "slot x (max_cpu_lora_bytes // slot)"),
        ("base weights", report.base_weight_bytes,
         f"embed {_fmt_bytes(b['embed_tokens'])}, lm_head {_fmt_bytes(b['lm_head']) if b['lm_head'] else 'tied'}, "
         f"linears {_fmt_bytes(b['decoder_linears'])}, norms {b['norms']:,}"),
        ("GPU budget", report.gpu_budget_bytes, f"{gpu} {_fmt_bytes(report.gpu_memory_bytes)} x {report.gpu_memory_utilization}"),
        ("left for KV cache", report.kv_available_bytes, "budget - base weights - slots"),
        ("KV bytes per token", report.kv_bytes_per_token,
         f"2 x {d.layers} layers x {d.kv_heads} kv heads x {d.head_dim} head_dim x {report.dtype}"),
    ]  # fmt: skip
    for name, value, how in rows:
        mem.add_row(name, _fmt_bytes(value), how)
    mem.add_row("KV tokens", f"{report.kv_tokens:,}", f"{report.kv_blocks:,} blocks of {report.block_size}")
    mem.add_row(f"max concurrent sequences", f"{report.max_concurrent_sequences:,}",
                f"at --max-model-len {report.max_model_len:,}")  # fmt: skip
    console.print(mem)

    if report.adapters:
        ad = Table(title="Adapters vs slot", title_justify="left")
        for col in ("adapter", "rank", "modules", "true bytes", "slot bytes", "padding waste", "status"):
            ad.add_column(col, justify="right" if "bytes" in col or col in ("rank", "padding waste") else "left")
        for a in report.adapters:
            status = "[green]fits[/]" if a.fits_slot else "[red]" + "; ".join(a.problems) + "[/]"
            waste = f"{_fmt_bytes(a.padding_waste_bytes)} ({a.padding_waste_fraction:.0%})" if a.fits_slot else "-"
            ad.add_row(Path(a.path).name, str(a.rank), ",".join(m.removesuffix("_proj") for m in a.modules),
                       _fmt_bytes(a.bytes_at_slot_dtype), _fmt_bytes(a.slot_bytes), waste, status)  # fmt: skip
        console.print(ad)

    if report.trace is not None:
        t = report.trace
        span = f", {t.duration_s:,.0f} s" if t.duration_s else ""
        base = f", {t.base_requests:,} base-model requests" if t.base_requests else ""
        tr = Table(title=f"Trace replay: {t.adapter_requests:,} adapter requests, {t.distinct_adapters:,} adapters{base}{span}",
                   title_justify="left", caption=f"hit rate = {t.hit_rate_definition}", caption_justify="left")  # fmt: skip
        for col in ("max_loras", "hit rate", "loads", "loads / s", "slot memory"):
            tr.add_column(col, justify="right")
        for r in t.rows:
            lps = "-" if r.loads_per_second is None else f"{r.loads_per_second:,.2f}"
            tr.add_row(str(r.max_loras), f"{r.hit_rate:.4f}", f"{r.loads:,}", lps, _fmt_bytes(r.slot_bytes))
        console.print(tr)
        if t.recommended_max_loras is not None:
            console.print(
                f"[bold green]recommended --max-loras {t.recommended_max_loras}[/]: smallest with hit rate >= "
                f"{t.target_hit_rate}; slots {_fmt_bytes(t.recommended_slot_bytes)}, "
                f"KV tokens {t.recommended_kv_tokens:,}, max concurrent sequences {t.recommended_max_concurrent_sequences:,}",
                highlight=False,
            )
            if not t.recommended_fits:
                console.print("[bold red]...but that many slots leave no room for one sequence of KV cache on this GPU[/]")
        else:
            upto = f" up to {t.simulated_up_to:,}" if t.simulated_up_to < t.distinct_adapters else ""
            console.print(
                f"[bold yellow]no --max-loras{upto} reaches hit rate {t.target_hit_rate}[/]: the best possible is "
                f"{t.best_hit_rate:.4f} with all {t.distinct_adapters:,} adapters resident (each loads once)",
                highlight=False,
            )
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(
        name="budget",
        help="Exact LoRA slot memory, base weights and KV-cache headroom for a base model; "
        "with --trace, the smallest --max-loras a real workload needs.",
    )(budget)
