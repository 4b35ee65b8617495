"""The bench report: ratios, traffic bounds, efficiency, the JSON document, table and plot.

The bound: a decode step reads the base linears once (W bytes) plus the A/B weights of
every distinct adapter in the batch (a bytes each), so when decode is memory-bound
    bound(mixed-N / homogeneous) = (W + a) / (W + N*a)
    bound(homogeneous / base)    = W / (W + a)
With adapters of different ranks (`mlora bench --rank 8,64`), N*a is the sum of the N adapters' own
bytes at their true ranks (what a rank-aware step reads), a the homogeneous adapter's.
W and a come from engine.planning.budget (linear_weight_bytes, adapter_slot_bytes), the same
functions the slot allocator uses. Efficiency = measured ratio / bound.
`bench_warnings` says when the numbers should not be trusted: an efficiency far above 100% (the
run was not memory-bound, or noise slowed the reference run) or repeated rounds that disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.bench.stats import WorkloadResult
from engine.errors import ConfigError

SCHEMA_VERSION = 1
RATIO_KEYS = ("mixed_over_homogeneous", "homogeneous_over_base", "mlora_over_peft", "mlora_over_separate")
BOUND_KEYS = ("mixed_over_homogeneous", "homogeneous_over_base")
EFFICIENCY_WARN_ABOVE = 1.5  # 150% of a traffic bound is no longer memory-bound decode: noise or another bottleneck
ROUND_SPREAD_WARN_ABOVE = 0.25  # rounds of one workload 25% apart: the machine was busy; ratios are unreliable


def metric_label(metric: str) -> str:
    """'decode_tokens_per_s' -> 'decode tok/s', 'output_tokens_per_s' -> 'e2e tok/s' (tables and notes)."""
    return metric.replace("_tokens_per_s", " tok/s").replace("output", "e2e")


def traffic_bytes(hf_config: Any, *, rank: int, dtype: str) -> tuple[int, int]:
    """(W, a): bytes of base decoder linears read per decode step, bytes of one adapter's A and B."""
    from engine.planning.budget import ModelDims, adapter_slot_bytes, linear_weight_bytes

    dims = ModelDims.from_hf_config(hf_config)
    return linear_weight_bytes(dims, dtype), adapter_slot_bytes(dims, rank=rank, dtype=dtype)


def bound_mixed_over_homogeneous(w: int, a: int, n: int) -> float:
    """Traffic bound of mixed-N throughput over homogeneous throughput: (W + a) / (W + N a)."""
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    return (w + a) / (w + n * a)


def bound_mixed_bytes(w: int, a: int, a_total: int) -> float:
    """Traffic bound of mixed throughput over homogeneous when the mixed batch's distinct adapters
    hold `a_total` bytes together (their own ranks): (W + a) / (W + a_total)."""
    if a_total <= 0:
        raise ValueError(f"a_total must be > 0, got {a_total}")
    return (w + a) / (w + a_total)


def bound_homogeneous_over_base(w: int, a: int) -> float:
    """Traffic bound of single-adapter throughput over base-model throughput: W / (W + a)."""
    return w / (w + a)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _eff(measured: float | None, bound: float | None) -> float | None:
    return None if measured is None or not bound else measured / bound


def throughput(r: WorkloadResult | None, metric: str) -> float | None:
    """`metric` ("decode_tokens_per_s" | "output_tokens_per_s") of `r`, None when absent."""
    if r is None:
        return None
    return getattr(r, metric)


def compute_ratios(results: list[WorkloadResult], *, w: int, a: int, metric: str,
                   mixed_bytes: dict[str, int] | None = None) -> dict[str, Any]:
    """ratios, bounds, efficiency, and the per-N mixed table, from the workload results.

    `metric` is the throughput the two bounded ratios compare (decode tokens/s offline, since
    the bound is about decode steps; output tokens/s under Poisson arrivals). mlora vs the
    alternatives always compares end-to-end output tokens/s on the largest mixed workload.
    `mixed_bytes`: per mixed workload name, the bytes of its distinct adapters at their own ranks
    (adapters of several ranks); None: N * a.
    """
    mlora = {r.name: r for r in results if r.system == "mlora"}
    base, homog = mlora.get("base"), mlora.get("homogeneous")
    mixed = sorted((r for r in mlora.values() if r.kind == "mixed"), key=lambda r: r.num_adapters)
    largest = mixed[-1] if mixed else None
    per_n = []
    for r in mixed:
        ratio = _ratio(throughput(r, metric), throughput(homog, metric))
        if mixed_bytes is not None and r.name in mixed_bytes:
            bound = bound_mixed_bytes(w, a, mixed_bytes[r.name])
        else:
            bound = bound_mixed_over_homogeneous(w, a, r.num_adapters)
        per_n.append({"n": r.num_adapters, "workload": r.name, "ratio": ratio, "bound": bound, "efficiency": _eff(ratio, bound)})

    def alt(system: str) -> WorkloadResult | None:
        if largest is None:
            return None
        return next((r for r in results if r.system == system and r.kind == "mixed" and r.num_adapters == largest.num_adapters), None)

    e2e = "output_tokens_per_s"
    ratios = {
        "mixed_over_homogeneous": per_n[-1]["ratio"] if per_n else None,
        "homogeneous_over_base": _ratio(throughput(homog, metric), throughput(base, metric)),
        "mlora_over_peft": _ratio(throughput(largest, e2e), throughput(alt("peft"), e2e)),
        "mlora_over_separate": _ratio(throughput(largest, e2e), throughput(alt("separate"), e2e)),
    }
    metrics = {"mixed_over_homogeneous": metric, "homogeneous_over_base": metric, "mlora_over_peft": e2e,
               "mlora_over_separate": e2e}
    if "composed-2" in mlora:  # bench --composed: every request 0.7 * lora-000 + 0.5 * lora-001 vs one of them each
        ratios["composed_over_single"] = _ratio(throughput(mlora["composed-2"], metric), throughput(mlora.get("mixed-2"), metric))
        metrics["composed_over_single"] = metric
    bounds = {
        "mixed_over_homogeneous": per_n[-1]["bound"] if per_n else None,
        "homogeneous_over_base": bound_homogeneous_over_base(w, a),
    }
    return {
        "ratios": ratios,
        "bounds": bounds,
        "efficiency": {k: _eff(ratios[k], bounds[k]) for k in BOUND_KEYS},
        "mixed": per_n,
        "largest_n": largest.num_adapters if largest else None,
        "ratio_metrics": metrics,
    }


def build_report(
    *,
    config: dict[str, Any],
    machine: dict[str, Any],
    model: dict[str, Any],
    results: list[WorkloadResult],
    w: int,
    a: int,
    metric: str,
    notes: list[str],
    mixed_bytes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The whole bench result as one JSON-serialisable dict (the `--json` document)."""
    ratios = compute_ratios(results, w=w, a=a, metric=metric, mixed_bytes=mixed_bytes)
    traffic: dict[str, Any] = {"W_bytes": w, "a_bytes": a}
    if mixed_bytes is not None:
        traffic["mixed_adapter_bytes"] = dict(mixed_bytes)
    return {
        "schema_version": SCHEMA_VERSION,
        "config": config,
        "machine": machine,
        "model": model,
        "traffic": traffic,
        "workloads": [r.to_json() for r in results],
        **ratios,
        "notes": notes,
        "warnings": bench_warnings(ratios, results),
    }


def bench_warnings(ratios: dict[str, Any], results: list[WorkloadResult]) -> list[str]:
    """Why the printed ratios may not mean what they say (empty when the run looks sound)."""
    out = []
    rows = [(f"mixed-{m['n']} / homogeneous", m["efficiency"]) for m in ratios["mixed"]]
    rows.append(("homogeneous / base", ratios["efficiency"]["homogeneous_over_base"]))
    for label, eff in rows:
        if eff is not None and eff > EFFICIENCY_WARN_ABOVE:
            out.append(f"{label}: efficiency {eff:.0%} is far above its memory-traffic bound (> {EFFICIENCY_WARN_ABOVE:.0%}): "
                       "this run was not memory-bound or its reference run was slowed by noise; do not read it as a "
                       "speed-up (rerun with --repeat 3 on an idle machine)")  # fmt: skip
    for r in results:
        vals = r.round_values
        if len(vals) > 1 and max(vals) > 0 and (max(vals) - min(vals)) / max(vals) > ROUND_SPREAD_WARN_ABOVE:
            out.append(f"{r.name} ({r.system}): rounds disagree by {(max(vals) - min(vals)) / max(vals):.0%} "
                       f"({metric_label(r.round_metric or '')}: {', '.join(f'{v:.1f}' for v in vals)}); the machine was "
                       "busy, so the ratios are unreliable")  # fmt: skip
    return out


def check_min_mixed_ratio(report: dict[str, Any], threshold: float | None) -> str | None:
    """A failure message when mixed/homogeneous is below `threshold` (or not measured), else None."""
    if threshold is None:
        return None
    ratio = report["ratios"]["mixed_over_homogeneous"]
    if ratio is None:
        return f"--min-mixed-ratio {threshold}: no mixed workload was measured"
    if ratio < threshold:
        return (
            f"mixed-{report['largest_n']}/homogeneous ratio {ratio:.3f} is below --min-mixed-ratio {threshold} "
            f"(bound {report['bounds']['mixed_over_homogeneous']:.3f})"
        )
    return None


# ---------------------------------------------------------------- rendering (rich)


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def render(report: dict[str, Any], console: Any) -> None:
    """Print the workload table and the ratio/bound table to a rich console."""
    from rich import box
    from rich.table import Table

    wl = Table(title="mlora bench: workloads (times in ms)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("workload", "system", "N", "tok/s", "decode tok/s", "batch", "req/s", "TTFT p50/p99", "ITL p50/p99", "loads/evict"):
        wl.add_column(col, justify="left" if col in ("workload", "system") else "right", no_wrap=col in ("workload", "system"))
    for r in report["workloads"]:
        le = "-" if r["adapter_loads"] is None else f"{r['adapter_loads']}/{r['adapter_evictions']}"
        wl.add_row(
            r["name"], r["system"], str(r["num_adapters"]), _f(r["output_tokens_per_s"]), _f(r["decode_tokens_per_s"]),
            _f(r.get("mean_decode_batch")), _f(r["requests_per_s"], "{:.2f}"),
            f"{_ms(r['ttft_s']['p50'])}/{_ms(r['ttft_s']['p99'])}", f"{_ms(r['itl_s']['p50'])}/{_ms(r['itl_s']['p99'])}", le,
        )
    console.print(wl)

    rt = Table(title="ratios (measured vs traffic bound)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("ratio", "measured", "bound", "efficiency", "from"):
        rt.add_column(col, justify="left" if col in ("ratio", "metric") else "right")
    metrics = {k: metric_label(v) for k, v in report["ratio_metrics"].items()}
    for m in report["mixed"]:
        rt.add_row(f"mixed-{m['n']} / homogeneous", _f(m["ratio"], "{:.3f}"), _f(m["bound"], "{:.3f}"),
                   _f(m["efficiency"], "{:.0%}"), metrics["mixed_over_homogeneous"])
    rt.add_row("homogeneous / base", _f(report["ratios"]["homogeneous_over_base"], "{:.3f}"),
               _f(report["bounds"]["homogeneous_over_base"], "{:.3f}"),
               _f(report["efficiency"]["homogeneous_over_base"], "{:.0%}"), metrics["homogeneous_over_base"])
    n = report["largest_n"]
    for key, label in (("mlora_over_peft", f"mlora / peft, mixed-{n}"), ("mlora_over_separate", f"mlora / separate, mixed-{n}")):
        rt.add_row(label, _f(report["ratios"][key], "{:.2f}x"), "-", "-", metrics[key])
    if report["ratios"].get("composed_over_single") is not None:
        rt.add_row("composed-2 / mixed-2", _f(report["ratios"]["composed_over_single"], "{:.3f}"), "-", "-",
                   metrics["composed_over_single"])
    console.print(rt)
    traffic = report["traffic"]
    console.print(f"[dim]W = {traffic['W_bytes'] / 1e6:.1f} MB base linears per decode step, "
                  f"a = {traffic['a_bytes'] / 1e6:.2f} MB per adapter (engine.planning.budget)[/]")
    for name, nbytes in traffic.get("mixed_adapter_bytes", {}).items():
        console.print(f"[dim]{name}: its adapters at their own ranks hold {nbytes / 1e6:.2f} MB[/]")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    for warning in report.get("warnings", ()):
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Throughput vs number of distinct adapters, one line per system, plus the bound."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib, which is not installed", hint="pip install 'mlora[plot]'") from e
    metric = "output_tokens_per_s"
    series: dict[str, dict[int, float]] = {}
    for r in report["workloads"]:
        if r["kind"] in ("homogeneous", "mixed"):
            series.setdefault(r["system"], {})[r["num_adapters"]] = r[metric]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=system)
    homog = series.get("mlora", {}).get(1)
    if homog:
        w, a = report["traffic"]["W_bytes"], report["traffic"]["a_bytes"]
        xs = sorted(series["mlora"])
        ax.plot(xs, [homog * bound_mixed_over_homogeneous(w, a, x) for x in xs], ls="--", color="gray",
                label="mlora homogeneous x traffic bound")
    ax.set_xscale("log", base=2)
    ticks = sorted({x for pts in series.values() for x in pts})
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.set_xlabel("distinct adapters in the batch")
    ax.set_ylabel("output tokens/s")
    ax.set_title("mlora bench: throughput vs adapters per batch")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(str(path), dpi=120)
    except OSError as e:
        raise ConfigError(f"cannot write plot {path}: {e}") from e
    finally:
        plt.close(fig)
