"""`mlora bench --workload flood|trace`: per-tenant latency under each scheduling policy, side by side.

- flood: a heavy tenant (the first adapter) queues `heavy_requests` at once (saturation); after
  `light_delay_s`, each light tenant (the next adapters) sends `light_requests`, all at once or as a
  seeded Poisson process at `light_rate` requests/s.
- trace: replays a JSONL trace's arrivals (engine/planning/trace.py's format: `timestamp` + `adapter` or
  `model`; optional `max_tokens`, `priority`, `tenant`). Adapter names the engine does not serve are
  mapped onto its adapters by first appearance, so any production trace replays on the bench model.
Each policy runs the same requests on a fresh AsyncLLM (streaming, timed on the client side, as
runner.run_poisson does); the report has per-tenant TTFT p50/p99 and total output tokens/s. With
`repeat` > 1 the policies run in interleaved rounds and each keeps its fastest round (noise on a
shared machine only slows a run down), as the standard bench does.
The requests and the numbers are pure Python (tested); only `run_fairness` needs the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.bench.config import check_positive_ints
from engine.bench.stats import percentile
from engine.bench.workloads import make_prompts, poisson_arrivals
from engine.errors import ConfigError, UsageError

WORKLOADS = ("flood", "trace")
BASE_TENANT = "base"  # label of requests without adapter or tenant


@dataclass(frozen=True)
class FairnessConfig:
    """One fairness bench run. `model` None = the built-in demo model and its adapters; `preset`
    = a bench preset with seeded adapters of rank `rank`."""

    workload: str = "flood"
    trace: str | None = None
    model: str | None = None
    preset: str | None = None
    rank: int = 8
    policies: tuple[str, ...] = ("fcfs", "fair")
    max_num_seqs: int = 4
    heavy_requests: int = 60
    light_requests: int = 4
    light_tenants: int = 1
    light_delay_s: float = 1.0
    light_rate: float | None = None
    max_tokens: int = 40
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    repeat: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        from engine.config import SCHEDULING_POLICIES

        if self.workload not in WORKLOADS:
            raise UsageError(f"--workload must be one of {', '.join(WORKLOADS)} here, got {self.workload!r}")
        if (self.workload == "trace") != (self.trace is not None):
            raise UsageError("--trace FILE and --workload trace go together")
        if self.model is not None and self.preset is not None:
            raise UsageError("give either --preset or --model, not both")
        bad = [p for p in self.policies if p not in SCHEDULING_POLICIES]
        if bad or not self.policies:
            raise UsageError(f"policies must be among {', '.join(SCHEDULING_POLICIES)}, got {', '.join(self.policies) or 'none'}")
        check_positive_ints(self, ("max_num_seqs", "heavy_requests", "light_requests", "light_tenants", "max_tokens", "rank", "repeat"))
        if self.light_delay_s < 0:
            raise UsageError(f"the light tenants' delay must be >= 0 s, got {self.light_delay_s}")
        if self.light_rate is not None and not self.light_rate > 0:
            raise UsageError(f"--rate must be > 0 requests/s, got {self.light_rate}")


@dataclass(frozen=True)
class TimedRequest:
    """One request of a fairness run: when it arrives (s from the start) and whose it is."""

    prompt: str
    adapter: str | None
    max_tokens: int
    arrival_s: float
    priority: int = 0
    tenant: str | None = None

    @property
    def label(self) -> str:
        return self.tenant or self.adapter or BASE_TENANT


def flood_requests(cfg: FairnessConfig, adapters: list[str]) -> list[TimedRequest]:
    """The heavy tenant's requests at 0 s, then each light tenant's after `light_delay_s`."""
    if len(adapters) < 1 + cfg.light_tenants:
        raise ConfigError(f"the flood needs {1 + cfg.light_tenants} adapters (1 heavy + {cfg.light_tenants} light), "
                          f"the model has {len(adapters)}")
    prompts = make_prompts(cfg.heavy_requests + cfg.light_tenants * cfg.light_requests, length_chars=16, seed=cfg.seed)
    out = [TimedRequest(prompts[i], adapters[0], cfg.max_tokens, 0.0) for i in range(cfg.heavy_requests)]
    for k in range(cfg.light_tenants):
        offsets = ([0.0] * cfg.light_requests if cfg.light_rate is None
                   else poisson_arrivals(cfg.light_requests, rate=cfg.light_rate, seed=cfg.seed + k))
        for j, dt in enumerate(offsets):
            out.append(TimedRequest(prompts[len(out)], adapters[1 + k], cfg.max_tokens, cfg.light_delay_s + dt))
    return out


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def trace_requests(path: str | Path, adapters: list[str], *, max_tokens: int, seed: int = 0) -> list[TimedRequest]:
    """A JSONL trace's requests with arrivals relative to its first timestamp (a line without one arrives
    with the line before it); adapter names not in `adapters` are mapped onto them by first appearance."""
    from engine.planning.trace import TraceError, _parse_timestamp

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path.name} is not UTF-8 text (byte {exc.start}): is it a JSONL trace?") from None
    mapping: dict[str, str] = {}
    rows: list[tuple[float | None, dict[str, Any]]] = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            raise TraceError(f"{path.name} line {lineno}: malformed JSON") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{path.name} line {lineno}: expected a JSON object")
        ts = obj.get("timestamp")
        if ts is not None:  # finite seconds (NaN/Infinity would make the replay wait forever)
            ts = _parse_timestamp(ts, path.name, lineno)
        priority = obj.get("priority")
        if priority is not None and (type(priority) is not int or abs(priority) > 2**62):
            raise TraceError(f"{path.name} line {lineno}: priority must be an integer, got {_short(priority)}")
        tenant = obj.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise TraceError(f"{path.name} line {lineno}: tenant must be a string, got {_short(tenant)}")
        rows.append((ts, obj))
    if not rows:
        raise TraceError(f"{path.name}: the trace has no requests")
    known = [t for t, _ in rows if t is not None]
    t0, last = (min(known) if known else 0.0), 0.0
    prompts = make_prompts(len(rows), length_chars=16, seed=seed)
    out = []
    for i, (ts, obj) in enumerate(rows):
        last = last if ts is None else ts - t0
        name = obj.get("adapter", obj.get("model"))
        adapter = None
        if name:
            adapter = str(name) if str(name) in adapters else mapping.setdefault(str(name), adapters[len(mapping) % len(adapters)])
        n = obj.get("max_tokens")
        out.append(TimedRequest(prompts[i], adapter, n if isinstance(n, int) and n > 0 else max_tokens, last,
                                int(obj.get("priority") or 0), obj.get("tenant") or None))
    return sorted(out, key=lambda r: r.arrival_s)


@dataclass
class Timing:
    label: str
    arrival: float
    first_token: float | None
    finished: float
    tokens: int


@dataclass
class PolicyResult:
    """One policy's numbers: per tenant {requests, ttft_p50_s, ttft_p99_s}, plus totals."""

    policy: str
    tenants: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    output_tokens: int = 0
    duration_s: float = 0.0
    output_tokens_per_s: float = 0.0
    engine_steps: int | None = None
    rounds_tokens_per_s: list[float] = field(default_factory=list)  # every round's, when repeated


def summarize_policy(policy: str, timings: list[Timing], engine_steps: int | None = None) -> PolicyResult:
    """Per-tenant TTFT percentiles (stats.percentile) and output tokens / (first arrival to last finish)."""
    res = PolicyResult(policy, engine_steps=engine_steps)
    for label in dict.fromkeys(t.label for t in timings):
        ttft = [t.first_token - t.arrival for t in timings if t.label == label and t.first_token is not None]
        res.tenants[label] = {"requests": sum(1 for t in timings if t.label == label),
                              "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99)}
    if timings:
        res.output_tokens = sum(t.tokens for t in timings)
        res.duration_s = max(t.finished for t in timings) - min(t.arrival for t in timings)
        res.output_tokens_per_s = res.output_tokens / res.duration_s if res.duration_s > 0 else 0.0
    return res


def build_fairness_report(cfg: FairnessConfig, results: list[PolicyResult]) -> dict[str, Any]:
    """The report: config, each policy's numbers, and tokens/s of each policy relative to the first."""
    ref = results[0].output_tokens_per_s if results else 0.0
    return {"config": asdict(cfg), "policies": [asdict(r) for r in results],
            "throughput_vs_first": {r.policy: (r.output_tokens_per_s / ref if ref else None) for r in results}}


# ---------------------------------------------------------------- running (needs the engine)


async def _one(engine: Any, req: TimedRequest, rid: str, t0: float, out: list[Timing]) -> None:
    from engine.sampling_params import SamplingParams

    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
    arrival, first, n = time.monotonic(), None, 0
    params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
    # the trace's priorities only mean something to the priority policy (others refuse them, as vLLM)
    priority = req.priority if engine.config.scheduling_policy == "priority" else 0
    async for o in engine.generate(req.prompt, params, request_id=rid, adapter=req.adapter, priority=priority,
                                   tenant=req.tenant):
        if first is None and o.delta_token_ids:
            first = time.monotonic()
        n = len(o.token_ids)
    out.append(Timing(req.label, arrival, first, time.monotonic(), n))


async def _run_policy(kw: dict[str, Any], policy: str, reqs: list[TimedRequest]) -> PolicyResult:
    from engine.config import EngineConfig
    from engine.llm import AsyncLLM

    engine = AsyncLLM(EngineConfig.from_kwargs(**kw, scheduling_policy=policy))
    await engine.start()
    try:
        adapters = list(dict.fromkeys(r.adapter for r in reqs))
        await asyncio.gather(*[_one(engine, TimedRequest(reqs[0].prompt, a, 2, 0.0), f"warm-{i}", time.monotonic(), [])
                               for i, a in enumerate(adapters)])  # fmt: skip
        steps0 = engine.core.scheduler.step_no
        timings: list[Timing] = []
        t0 = time.monotonic()
        await asyncio.gather(*[_one(engine, r, f"{policy}-{i}", t0, timings) for i, r in enumerate(reqs)])
        return summarize_policy(policy, timings, engine.core.scheduler.step_no - steps0)
    finally:
        await engine.stop()


def run_fairness(cfg: FairnessConfig, *, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the model and requests, run every policy of `cfg` in turn, return the report dict."""
    from engine.bench.runner import resolve_device_dtype

    step = on_step or (lambda name: None)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    kw: dict[str, Any] = dict(device=device, dtype=dtype, max_num_seqs=cfg.max_num_seqs, seed=cfg.seed)
    step("model")
    if cfg.model is None and cfg.preset is None:
        from engine.loader import demo_adapters

        adapters = list(demo_adapters())
    else:
        from engine.bench.presets import build_adapters, build_preset_model
        from engine.loader import resolve_model_path

        model_dir = build_preset_model(cfg.preset) if cfg.preset is not None else resolve_model_path(cfg.model)
        paths = build_adapters(model_dir, rank=cfg.rank, count=1 + cfg.light_tenants, seed=cfg.seed)
        adapters = [f"lora-{i:03d}" for i in range(len(paths))]
        kw.update(model=str(model_dir), max_lora_rank=cfg.rank, loras=tuple(zip(adapters, map(str, paths))))
    reqs = (trace_requests(cfg.trace, adapters, max_tokens=cfg.max_tokens, seed=cfg.seed) if cfg.trace is not None
            else flood_requests(cfg, adapters))
    rounds: dict[str, list[PolicyResult]] = {p: [] for p in cfg.policies}
    for i in range(cfg.repeat):
        for policy in cfg.policies:
            step(policy + (f" ({i + 1}/{cfg.repeat})" if cfg.repeat > 1 else ""))
            rounds[policy].append(asyncio.run(_run_policy(kw, policy, reqs)))
    results = []
    for policy, runs in rounds.items():
        best = max(runs, key=lambda r: r.output_tokens_per_s)
        best.rounds_tokens_per_s = [round(r.output_tokens_per_s, 1) for r in runs]
        results.append(best)
    return build_fairness_report(cfg, results)


def render_fairness(report: dict[str, Any], console: Any) -> None:
    """Per-tenant TTFT p50/p99 and total tokens/s, one column pair per policy."""
    from rich import box
    from rich.table import Table

    policies = report["policies"]
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    table = Table(title=f"mlora bench --workload {report['config']['workload']}: TTFT per tenant (ms), "
                        f"max_num_seqs={report['config']['max_num_seqs']}",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("tenant")
    table.add_column("requests", justify="right")
    for p in policies:
        table.add_column(f"{p['policy']} p50", justify="right")
        table.add_column(f"{p['policy']} p99", justify="right")
    labels = list(dict.fromkeys(label for p in policies for label in p["tenants"]))
    for label in labels:
        row = [label, str(policies[0]["tenants"].get(label, {}).get("requests", "-"))]
        for p in policies:
            t = p["tenants"].get(label, {})
            row += [ms(t.get("ttft_p50_s")), ms(t.get("ttft_p99_s"))]
        table.add_row(*row)
    console.print(table)
    for p in policies:
        rel = report["throughput_vs_first"].get(p["policy"])
        console.print(f"{p['policy']}: {p['output_tokens_per_s']:.1f} output tokens/s "
                      f"({p['output_tokens']} tokens in {p['duration_s']:.2f} s, {p['engine_steps']} engine steps)"
                      + (f", {rel:.2f}x {policies[0]['policy']}" if rel is not None and p is not policies[0] else ""),
                      highlight=False)
