"""`mlora bench`: mixed-adapter batches vs homogeneous ones, the base model and the alternatives.

Thin: parse flags -> one frozen `BenchConfig` -> `run_bench` -> rich tables (+ `--json`, `--plot`).
Exit 1 when `--min-mixed-ratio` is not met (CI gate).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer


class Preset(str, Enum):
    tiny = "tiny"
    small = "small"
    llama_1b = "llama-1b"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class BenchWorkload(str, Enum):
    standard = "standard"
    flood = "flood"
    trace = "trace"
    shared_prefix = "shared-prefix"


class Policy(str, Enum):
    fair = "fair"
    fcfs = "fcfs"
    priority = "priority"


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def bench(
    preset: Annotated[Optional[Preset], typer.Option("--preset", help="Built-in seeded model: tiny (CI), small (~100M params) or llama-1b (Llama-3.2-1B's shape, for GPUs). (default: small; tiny with --quick)", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A local HF model dir (or hub id) instead of --preset; seeded adapters are built for it.", show_default=False)] = None,
    rank: Annotated[str, typer.Option("--rank", "-r", metavar="R[,R...]", help="LoRA rank of the seeded adapters (and of the engine's slots); several (e.g. 8,64) are cycled across the adapters (lora-000 the first) in slots of the largest.")] = "16",
    max_loras: Annotated[Optional[int], typer.Option("--max-loras", min=1, help="Device adapter slots; mixed-N runs N = 2, 4, 8, ... up to this. (default: 16, or the largest --adapters; 4 with --quick)", show_default=False)] = None,
    adapters: Annotated[Optional[str], typer.Option("--adapters", metavar="N[,N...]", help="Distinct adapters of each mixed workload, e.g. 16,32,64, instead of 2, 4, 8, ... up to --max-loras; --num-requests and --max-loras grow to fit unless given.", show_default=False)] = None,
    zipf: Annotated[Optional[float], typer.Option("--zipf", min=0.0, help="Zipf-popular adapters with this alpha instead of round-robin.", show_default=False)] = None,
    rate: Annotated[Optional[float], typer.Option("--rate", min=0.0, help="Poisson arrivals at this many requests/s (varied output lengths) instead of all at once.", show_default=False)] = None,
    num_requests: Annotated[Optional[int], typer.Option("--num-requests", "-n", min=1, help="Requests per workload. (default: 32; 16 with --quick)", show_default=False)] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Output tokens per request (EOS ignored). (default: 32; 12 with --quick)", show_default=False)] = None,
    device: Annotated[Device, typer.Option("--device", help="Where mlora and the alternatives run.")] = Device.auto,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Weights dtype (auto: on CPU bfloat16 with AMX, else float32; bfloat16 on CUDA).")] = Dtype.auto,
    peft_dtype: Annotated[Optional[Dtype], typer.Option("--peft-dtype", help="dtype of the transformers + PEFT alternative (default: --dtype), e.g. float32 where transformers is slower in bf16.", show_default=False)] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write every number to this JSON file (stable `ratios` and `bounds` keys).", show_default=False)] = None,
    plot_file: Annotated[Optional[Path], typer.Option("--plot", help="Write throughput vs distinct adapters to this PNG (needs matplotlib).", show_default=False)] = None,
    repeat: Annotated[Optional[int], typer.Option("--repeat", min=1, help="Rounds of the engine workloads; each keeps its best round. (default: 1; 3 with --quick)", show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads for every system. (default: torch's, one per core)", show_default=False)] = None,
    quick: Annotated[bool, typer.Option("--quick", help="CI mode: tiny preset, few short requests, N up to 4; about a minute on 2 CPU cores.")] = False,
    min_mixed_ratio: Annotated[Optional[float], typer.Option("--min-mixed-ratio", min=0.0, help="Exit 1 when mixed-N/homogeneous (largest N) is below this.", show_default=False)] = None,
    no_alternatives: Annotated[bool, typer.Option("--no-alternatives", help="Skip the separate-engines and transformers+PEFT comparisons.")] = False,
    no_separate: Annotated[bool, typer.Option("--no-separate", help="Skip the separate-engines alternative (one engine start per adapter: slow on big models).")] = False,
    no_churn: Annotated[bool, typer.Option("--no-churn", help="Skip the churn workload (more adapters than slots).")] = False,
    churn_adapters: Annotated[Optional[int], typer.Option("--churn-adapters", min=2, help="Adapters the churn workload cycles through (more than --max-loras); --num-requests grows to fit unless given. (default: 2 x --max-loras)", show_default=False)] = None,
    composed: Annotated[bool, typer.Option("--composed", help="Add the composed-2 workload (every request composes 2 adapters, weights 0.7 and 0.5) and its ratio to mixed-2, the same batch with one adapter per request.")] = False,
    kernels: Annotated[bool, typer.Option("--kernels", help="Run the LoRA kernel micro-benchmark (shrink/expand) instead.")] = False,
    workload: Annotated[BenchWorkload, typer.Option("--workload", help="standard: the workloads above; flood: one adapter floods the queue (--num-requests, default 60), light tenants arrive --light-delay s later (--rate: Poisson); trace: replay --trace's arrivals. flood/trace report per-tenant TTFT and tokens/s for each --policy. shared-prefix: 8 tenants (adapters) each with a 512-token system prompt, --num-requests (default 64) 16-token user turns, --max-tokens (default 32): TTFT and tokens/s with prefix caching off and on.")] = BenchWorkload.standard,
    trace: Annotated[Optional[Path], typer.Option("--trace", help="JSONL trace to replay with --workload trace (timestamp + adapter or model; optional max_tokens, priority, tenant).", show_default=False)] = None,
    policy: Annotated[Optional[list[Policy]], typer.Option("--policy", help="Scheduling policies to compare with flood/trace (repeatable). (default: fcfs and fair)", show_default=False)] = None,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", min=1, help="Running batch size with flood/trace.")] = 4,
    light_requests: Annotated[int, typer.Option("--light-requests", min=1, help="Requests per light tenant with flood.")] = 4,
    light_tenants: Annotated[int, typer.Option("--light-tenants", min=1, help="Light tenants (adapters after the flooder's) with flood.")] = 1,
    light_delay: Annotated[float, typer.Option("--light-delay", min=0.0, help="Seconds after the flood that the light tenants start.")] = 1.0,
) -> None:
    """Benchmark mixed-adapter batches against homogeneous ones, the base model and the alternatives.

    Workloads share prompts and output lengths: base, homogeneous, mixed-N (N distinct adapters per
    batch), churn (more adapters than slots); alternatives: one engine per adapter run one after
    another (separate) and transformers + PEFT. Every ratio is shown beside its memory-traffic bound.
    """
    from engine.errors import UsageError
    from mlora_cli._common import console

    ranks = _int_list("--rank", rank)
    mixed_ns = _int_list("--adapters", adapters) if adapters is not None else ()
    if len(ranks) > 1 and (kernels or workload is not BenchWorkload.standard or trace is not None):
        raise UsageError("several --rank values apply to the standard workload only")
    rank = max(ranks)  # type: ignore[assignment]  # the slot rank from here on
    if kernels:
        _run_kernels(device=device.value, dtype=dtype.value, rank=rank, threads=threads, quick=quick, json_file=json_file)
        return
    if workload is BenchWorkload.shared_prefix:
        from engine.bench.prefix import PrefixConfig

        if preset is not None and model is not None:
            raise UsageError("give either --preset or --model, not both")
        pcfg = PrefixConfig(preset=None if model is not None else (preset.value if preset else ("tiny" if quick else "small")),
                            model=model, rank=rank, num_requests=num_requests or 64, max_tokens=max_tokens or 32,
                            device=device.value, dtype=dtype.value, threads=threads, repeat=repeat or 1)  # fmt: skip
        _run_prefix(pcfg, json_file)
        return
    if workload is not BenchWorkload.standard or trace is not None:
        from engine.bench.fairness import FairnessConfig

        fcfg = FairnessConfig(
            workload="trace" if trace is not None else workload.value, trace=str(trace) if trace is not None else None,
            model=model, preset=preset.value if preset is not None else None, rank=rank,
            policies=tuple(p.value for p in policy) if policy else ("fcfs", "fair"), max_num_seqs=max_num_seqs,
            heavy_requests=num_requests or 60, light_requests=light_requests, light_tenants=light_tenants,
            light_delay_s=light_delay, light_rate=rate, max_tokens=max_tokens or 40, device=device.value,
            dtype=dtype.value, threads=threads, repeat=repeat or 1,
        )  # fmt: skip
        _run_fairness(fcfg, json_file)
        return
    from engine.bench.config import FULL_DEFAULTS, QUICK_DEFAULTS, BenchConfig

    if plot_file is not None:
        _check_matplotlib()
    defaults = QUICK_DEFAULTS if quick else FULL_DEFAULTS
    if preset is not None and model is not None:
        raise UsageError("give either --preset or --model, not both")
    most = max(mixed_ns, default=0)
    config = BenchConfig(
        preset=None if model is not None else (preset.value if preset else ("tiny" if quick else "small")),
        model=model,
        rank=rank,
        max_loras=max_loras or max(defaults["max_loras"], most),
        num_requests=num_requests or max(defaults["num_requests"], most, churn_adapters or 0),
        max_tokens=max_tokens or defaults["max_tokens"],
        zipf=zipf,
        rate=rate,
        device=device.value,
        dtype=dtype.value,
        peft_dtype=peft_dtype.value if peft_dtype is not None else None,
        alternatives=not no_alternatives,
        separate=not no_separate,
        churn=not no_churn,
        churn_adapters=churn_adapters,
        composed=composed,
        repeat=repeat or defaults["repeat"],
        threads=threads,
        quick=quick,
        adapters=mixed_ns,
        ranks=ranks if len(ranks) > 1 else (),
    )
    report = _run_with_progress(config)

    from engine.bench.report import check_min_mixed_ratio, plot, render

    render(report, console)
    _write_json(report, json_file)
    if plot_file is not None:
        plot(report, plot_file)
        console.print(f"[dim]wrote {plot_file}[/]", highlight=False)
    failure = check_min_mixed_ratio(report, min_mixed_ratio)
    if failure is not None:
        from mlora_cli._common import err_console

        err_console.print(f"[bold red]bench gate failed:[/] {failure}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    """"8,64" -> (8, 64): positive integers, comma-separated (UsageError naming `flag` otherwise)."""
    from engine.errors import UsageError

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UsageError(f"{flag} must be positive integers separated by commas, got {text!r}")
    return values


def _write_json(report: dict[str, Any], json_file: Optional[Path]) -> None:
    """`--json FILE`: the report as JSON (a file that cannot be written is a one-line error)."""
    if json_file is None:
        return
    from engine.errors import ConfigError
    from mlora_cli._common import console

    try:
        json_file.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write {json_file}: {e}") from e
    console.print(f"[dim]wrote {json_file}[/]", highlight=False)


def _run_side_by_side(label: str, run: Any, render: Any, json_file: Optional[Path]) -> None:
    """A bench that runs one request set under several settings (`--workload flood|trace`: each
    policy; `--workload shared-prefix`: prefix caching off and on) and renders them side by side."""
    from mlora_cli._common import console, err_console

    with err_console.status(label) as status:
        report = run(on_step=lambda name: status.update(f"{label}: {name}"))
    render(report, console)
    _write_json(report, json_file)


def _run_fairness(config, json_file: Optional[Path]) -> None:  # noqa: ANN001 - FairnessConfig
    """`--workload flood|trace`: each policy on the same requests, per-tenant TTFT side by side."""
    from engine.bench.fairness import render_fairness, run_fairness

    _run_side_by_side("fairness bench", lambda on_step: run_fairness(config, on_step=on_step), render_fairness, json_file)


def _run_prefix(config, json_file: Optional[Path]) -> None:  # noqa: ANN001 - PrefixConfig
    """`--workload shared-prefix`: the same requests with prefix caching off and on."""
    from engine.bench.prefix import render_prefix, run_prefix

    _run_side_by_side("shared-prefix bench", lambda on_step: run_prefix(config, on_step=on_step), render_prefix, json_file)


def _check_matplotlib() -> None:
    """Fail before a long run, not after it, when --plot cannot be honoured."""
    import importlib.util

    from engine.errors import ConfigError

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib, which is not installed", hint="pip install 'mlora[plot]'")


def _run_with_progress(config):  # noqa: ANN001, ANN202 - BenchConfig -> report dict
    """run_bench with a progress bar on stderr (one tick per workload / alternative)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.bench.runner import plan_steps, run_bench
    from mlora_cli._common import err_console

    steps = plan_steps(config)
    columns = (TextColumn("[bold]bench[/] {task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(steps[0], total=len(steps))
        seen = [0]

        def on_step(name: str) -> None:
            if seen[0]:
                bar.advance(task)
            seen[0] += 1
            bar.update(task, description=name)

        report = run_bench(config, on_step=on_step)
        bar.update(task, completed=len(steps))
    return report


def _run_kernels(*, device: str, dtype: str, rank: int, threads: Optional[int], quick: bool, json_file: Optional[Path]) -> None:
    """The shrink/expand micro-benchmark of `kernels.bench` (its own table; --json writes its rows)."""
    from engine.errors import ConfigError, NotBuiltError
    from mlora_cli._common import console

    try:
        from kernels.bench import format_kernel_bench, run_kernel_bench
    except ImportError as e:
        raise NotBuiltError("the kernel benchmark is not available (kernels.bench.run_kernel_bench is missing)") from e
    kwargs = dict(device=device, rank=rank, dtype=None if dtype == "auto" else dtype, threads=threads)
    if quick:
        kwargs.update(hidden_sizes=(768,), repeats=5)
    with console.status("benchmarking LoRA kernels"):
        result = run_kernel_bench(**kwargs)
    console.print(format_kernel_bench(result), highlight=False, soft_wrap=True)
    if json_file is not None:
        try:
            json_file.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise ConfigError(f"cannot write {json_file}: {e}") from e


def register(app: typer.Typer) -> None:
    app.command(name="bench", help="Benchmark mixed-adapter batches against homogeneous ones and the alternatives.")(bench)
