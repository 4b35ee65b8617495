"""Run the bench: every workload on one mlora engine, then the alternatives; return the report.

Offline runs hand the whole workload to `LLM.generate` at once and read the per-request
timestamps the engine records (RequestOutput.metrics). Poisson runs (`rate`) drive
`AsyncLLM` from asyncio, submitting each request at its arrival time and timing every
streamed token on the client side. Before each timed run the workload runs once with 2 output
tokens (adapters resident, kernels compiled), so a mixed run measures steady-state batching, not loading;
the churn workload is the one that measures loads and evictions.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.bench.config import BenchConfig
from engine.bench.report import build_report, metric_label, traffic_bytes
from engine.bench.stats import RequestTiming, WorkloadResult, combine_sequential, summarize
from engine.bench.workloads import BenchRequest, Workload, adapter_ranks, build_workloads
from engine.errors import ConfigError
from engine.sampling_params import SamplingParams

StepCallback = Callable[[str], None]


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """Concrete (device, dtype) names shared by mlora and the alternatives."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available", hint="use --device cpu")
    if dtype == "auto":
        from kernels.tuning import cpu_auto_dtype

        dtype = str(cpu_auto_dtype()).removeprefix("torch.") if device == "cpu" else "bfloat16"
    return device, dtype


def _params(req: BenchRequest) -> SamplingParams:
    # Greedy, ignore_eos, fixed max_tokens: every workload produces the same token count.
    return SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)


def _decode_counters(llm: Any) -> tuple[int, int]:
    """(decode steps, decoding sequences in them) so far: their ratio over a run is its mean decode batch."""
    scheduler = llm.engine.scheduler
    return scheduler.decode_steps, scheduler.decode_seqs


def _lora_counters(engine: Any) -> tuple[int, int]:
    stats = engine.stats()
    return int(getattr(stats, "lora_loads", 0) or 0), int(getattr(stats, "lora_evictions", 0) or 0)


# ---------------------------------------------------------------- offline (LLM)


def run_offline(llm: Any, wl: Workload, *, system: str = "mlora", warm: bool = True, startup_s: float | None = None) -> WorkloadResult:
    """Time one workload submitted all at once to an `LLM`."""
    reqs = list(wl.requests)
    if warm and wl.adapters:
        # The workload itself with 2 output tokens: the timed run then finds its adapters resident and
        # its prefill and decode batch layouts already run once (on CUDA the Triton kernels compile per
        # layout: ~1 s inside a timed run, seen on an H200 as homogeneous decode at half its rate).
        llm.generate([r.prompt for r in reqs], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                     adapters=[r.engine_adapters for r in reqs])  # fmt: skip
    loads0, ev0 = _lora_counters(llm)
    steps0, seqs0 = _decode_counters(llm)
    gc.collect()
    t0 = time.monotonic()
    outs = llm.generate([r.prompt for r in reqs], [_params(r) for r in reqs], adapters=[r.engine_adapters for r in reqs])
    t1 = time.monotonic()
    loads1, ev1 = _lora_counters(llm)
    steps1, seqs1 = _decode_counters(llm)
    notes, timings = [], []
    for r, out in zip(reqs, outs):
        m = out.metrics
        n = len(out.token_ids)
        if n != r.max_tokens:
            notes.append(f"a request produced {n} tokens, expected {r.max_tokens} (finish_reason {out.finish_reason})")
        if m is None:
            timings.append(RequestTiming(arrival=t0, finished=t1, num_tokens=n))
        else:
            timings.append(RequestTiming(arrival=m.arrival_time, finished=m.finished_time or t1, num_tokens=n,
                                         first_token=m.first_token_time, last_token=m.last_token_time))  # fmt: skip
    result = summarize(wl.name, wl.kind, system, wl.num_adapters, timings, start=t0, end=t1,
                       adapter_loads=loads1 - loads0, adapter_evictions=ev1 - ev0, startup_s=startup_s,
                       notes=sorted(set(notes))[:3])  # fmt: skip
    result.mean_decode_batch = (seqs1 - seqs0) / (steps1 - steps0) if steps1 > steps0 else None
    return result


# ---------------------------------------------------------------- Poisson arrivals (AsyncLLM)


async def _one_request(engine: Any, req: BenchRequest, rid: str, t0: float, out: list[RequestTiming]) -> None:
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
    arrival = time.monotonic()
    first = last = None
    gaps: list[float] = []
    n = 0
    kw = {"adapters": req.composition} if req.composition is not None else {}
    async for o in engine.generate(req.prompt, _params(req), request_id=rid, adapter=req.adapter, **kw):
        now = time.monotonic()
        k = len(o.delta_token_ids)
        if k:
            if first is None:
                first = now
            else:
                gaps.extend([(now - last) / k] * k)  # type: ignore[operator]
            last = now
        n = len(o.token_ids)
    out.append(RequestTiming(arrival=arrival, finished=time.monotonic(), num_tokens=n, first_token=first,
                             last_token=last, token_gaps=gaps))  # fmt: skip


async def run_poisson(engine: Any, wl: Workload, *, system: str = "mlora", warm: bool = True, startup_s: float | None = None) -> WorkloadResult:
    """Time one workload whose requests arrive at their `arrival_s` offsets on a started AsyncLLM."""
    reqs = list(wl.requests)
    if warm and wl.adapters:
        await asyncio.gather(*[
            _one_request(engine, BenchRequest(reqs[0].prompt, a, 2), f"{wl.name}-{system}-warm-{i}", time.monotonic(), [])
            for i, a in enumerate(wl.adapters)
        ])  # fmt: skip
    loads0, ev0 = _lora_counters(engine)
    gc.collect()
    base = min(r.arrival_s for r in reqs)
    timings: list[RequestTiming] = []
    t0 = time.monotonic()
    shifted = [BenchRequest(r.prompt, r.adapter, r.max_tokens, r.arrival_s - base, r.composition) for r in reqs]
    await asyncio.gather(*[_one_request(engine, r, f"{wl.name}-{system}-{i}", t0, timings) for i, r in enumerate(shifted)])
    t1 = time.monotonic()
    loads1, ev1 = _lora_counters(engine)
    return summarize(wl.name, wl.kind, system, wl.num_adapters, timings, start=t0, end=t1,
                     adapter_loads=loads1 - loads0, adapter_evictions=ev1 - ev0, startup_s=startup_s)  # fmt: skip


# ---------------------------------------------------------------- the whole bench


class _Plan:
    """Knows the steps ahead of time so the CLI can draw a progress bar."""

    def __init__(self, cfg: BenchConfig, workloads: list[Workload]) -> None:
        rounds = [_round_label(i, cfg.repeat) for i in range(cfg.repeat)]
        self.steps = ["build model + adapters", "start engine + warm up"] + [w.name + r for r in rounds for w in workloads]
        if cfg.alternatives:
            self.steps += (["separate engines"] if cfg.separate else []) + ["transformers + peft"]


def plan_steps(cfg: BenchConfig) -> list[str]:
    """The step names `run_bench` will report, in order (for a progress bar)."""
    return _Plan(cfg, _workloads(cfg)).steps


def _workloads(cfg: BenchConfig) -> list[Workload]:
    return build_workloads(
        num_requests=cfg.num_requests, max_tokens=cfg.max_tokens, max_loras=cfg.max_loras,
        prompt_chars=cfg.prompt_chars, zipf=cfg.zipf, rate=cfg.rate, churn=cfg.churn, composed=cfg.composed, seed=cfg.seed,
        adapters=cfg.adapters, num_churn=cfg.churn_adapters,
    )  # fmt: skip


def _model_dir(cfg: BenchConfig) -> Path:
    if cfg.preset is not None:
        from engine.bench.presets import build_preset_model

        return build_preset_model(cfg.preset)
    from engine.loader import resolve_model_path

    return resolve_model_path(cfg.model)


def _engine_kwargs(cfg: BenchConfig, model_dir: Path, device: str, dtype: str, prompt_tokens: int, num_seqs: int) -> dict[str, Any]:
    return dict(
        model=str(model_dir), dtype=dtype, device=device, seed=cfg.seed,
        max_num_seqs=max(num_seqs, 1),
        # The whole batch's prompts fit one step: decode steps then hold every request.
        max_num_batched_tokens=max(2048, num_seqs * (prompt_tokens + 1)),
        max_model_len=prompt_tokens + cfg.max_tokens + 8,
        enable_lora=True, max_lora_rank=cfg.rank,
    )  # fmt: skip


def run_bench(cfg: BenchConfig, *, on_step: StepCallback | None = None) -> dict[str, Any]:
    """Run every workload and alternative of `cfg`; return the report dict (see report.py)."""
    from engine.bench.presets import quiet_transformers

    quiet_transformers()
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    step = on_step or (lambda name: None)
    workloads = _workloads(cfg)
    plan = _Plan(cfg, workloads)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    notes: list[str] = []

    step(plan.steps[0])
    model_dir = _model_dir(cfg)
    from engine.bench.presets import build_adapters
    from engine.loader import load_hf_config, load_tokenizer

    hf_config = load_hf_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompt_tokens = max(len(tokenizer(r.prompt).input_ids) for r in workloads[0].requests)
    n_adapters = max(w.num_adapters for w in workloads)
    ranks = adapter_ranks(n_adapters, cfg.ranks, cfg.rank)  # adapter i's rank (all cfg.rank unless --rank 8,64)
    by_rank = {r: build_adapters(model_dir, rank=r, count=n_adapters) for r in sorted(set(ranks))}
    adapter_paths = {f"lora-{i:03d}": str(by_rank[r][i]) for i, r in enumerate(ranks)}
    w_bytes, a_bytes = traffic_bytes(hf_config, rank=ranks[0], dtype=dtype)  # a: the homogeneous adapter (lora-000)
    a_of = {r: traffic_bytes(hf_config, rank=r, dtype=dtype)[1] for r in set(ranks)}
    rank_of = dict(zip(adapter_paths, ranks))
    mixed_bytes = {w.name: sum(a_of[rank_of[n]] for n in w.adapters) for w in workloads if w.kind == "mixed"}

    step(plan.steps[1])
    kw = _engine_kwargs(cfg, model_dir, device, dtype, prompt_tokens, cfg.num_requests)
    kw.update(max_loras=cfg.max_loras, max_cpu_loras=max(n_adapters, cfg.max_loras), loras=tuple(adapter_paths.items()))
    results = (asyncio.run(_run_async_all(cfg, kw, workloads, step)) if cfg.rate is not None
               else _run_offline_all(cfg, kw, workloads, step))  # fmt: skip

    if cfg.alternatives:
        largest = max((w for w in workloads if w.kind == "mixed"), key=lambda w: w.num_adapters, default=None)
        homog = next(w for w in workloads if w.kind == "homogeneous")
        if cfg.separate and largest is not None:
            step(plan.steps[-2])
            results.append(run_separate(cfg, model_dir, device, dtype, prompt_tokens, largest, adapter_paths))
        step(plan.steps[-1])
        from engine.bench.alternatives import peft_available, run_peft

        if not peft_available():
            notes.append("peft is not installed: the transformers+PEFT comparison was skipped (pip install peft)")
        else:
            peft_wls = [homog] + ([largest] if largest is not None else [])
            peft_dtype = dtype if cfg.peft_dtype is None else resolve_device_dtype(device, cfg.peft_dtype)[1]
            if peft_dtype != dtype:
                notes.append(f"transformers + PEFT ran in {peft_dtype}, mlora and separate in {dtype} (--peft-dtype)")
            results.extend(run_peft(model_dir, adapter_paths, peft_wls, device=device, dtype=peft_dtype,
                                    max_batch=cfg.num_requests, poisson=cfg.rate is not None))  # fmt: skip

    if cfg.rate is not None:
        notes.append(f"Poisson arrivals at {cfg.rate} req/s: throughput follows the offered load while a system keeps "
                     "up, so compare TTFT/ITL here and take the bound ratios from an offline run")  # fmt: skip
    metric = ratio_metric(cfg.rate)
    if any(r.decode_tokens_per_s is None for r in results if r.system == "mlora") and metric == "decode_tokens_per_s":
        metric = "output_tokens_per_s"
        notes.append("the engine reported no per-token timestamps: ratios use end-to-end output tokens/s")
    for r in results:
        notes.extend(f"{r.name} ({r.system}): {n}" for n in r.notes)
    return build_report(
        config=cfg.to_json(), machine=machine_info(device, dtype), model=model_info(model_dir, hf_config, cfg),
        results=results, w=w_bytes, a=a_bytes, metric=metric, notes=notes,
        mixed_bytes=mixed_bytes if cfg.ranks else None,
    )  # fmt: skip


def ratio_metric(rate: float | None) -> str:
    """The throughput the bounded ratios compare: decode tokens/s offline (the bound is about decode
    steps), output tokens/s under Poisson arrivals. Rounds are picked by the same metric."""
    return "output_tokens_per_s" if rate is not None else "decode_tokens_per_s"


def _best(runs: list[WorkloadResult], metric: str) -> WorkloadResult:
    """The fastest of repeated runs of one workload by `metric` (noise on a shared machine only slows
    runs down); with several rounds it records that metric per round and says so in a note."""
    if any(getattr(r, metric) is None for r in runs):
        metric = "output_tokens_per_s"
    best = max(runs, key=lambda r: (getattr(r, metric), r.output_tokens_per_s))
    if len(runs) > 1:
        values = [getattr(r, metric) for r in runs]
        best.round_metric, best.round_values = metric, values
        label = metric_label(metric)
        best.notes.append(f"best of {len(runs)} rounds by {label}; {label} per round: " + ", ".join(f"{v:.1f}" for v in values))
    return best


def _round_label(i: int, repeat: int) -> str:
    return f" ({i + 1}/{repeat})" if repeat > 1 else ""


def _run_offline_all(cfg: BenchConfig, kw: dict[str, Any], workloads: list[Workload], step: StepCallback) -> list[WorkloadResult]:
    from engine.llm import LLM

    t = time.monotonic()
    llm = LLM(**kw)
    # Warm up with the full batch shape (first calls allocate and pick kernels).
    base = workloads[0]
    llm.generate([r.prompt for r in base.requests], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    startup = time.monotonic() - t
    runs: dict[str, list[WorkloadResult]] = {w.name: [] for w in workloads}
    for i in range(cfg.repeat):
        for wl in workloads:
            step(wl.name + _round_label(i, cfg.repeat))
            runs[wl.name].append(run_offline(llm, wl, warm=wl.kind != "churn", startup_s=startup))
    del llm
    gc.collect()
    return [_best(runs[w.name], ratio_metric(cfg.rate)) for w in workloads]


async def _run_async_all(cfg: BenchConfig, kw: dict[str, Any], workloads: list[Workload], step: StepCallback) -> list[WorkloadResult]:
    from engine.config import EngineConfig
    from engine.llm import AsyncLLM

    t = time.monotonic()
    engine = AsyncLLM(EngineConfig.from_kwargs(**kw))
    await engine.start()
    try:
        base = workloads[0]
        warm = Workload("warm", "base", tuple(BenchRequest(r.prompt, None, 3) for r in base.requests), 0)
        await run_poisson(engine, warm, warm=False)
        startup = time.monotonic() - t
        runs: dict[str, list[WorkloadResult]] = {w.name: [] for w in workloads}
        for i in range(cfg.repeat):
            for wl in workloads:
                step(wl.name + _round_label(i, cfg.repeat))
                runs[wl.name].append(await run_poisson(engine, wl, warm=wl.kind != "churn", startup_s=startup))
    finally:
        await engine.stop()
    return [_best(runs[w.name], ratio_metric(cfg.rate)) for w in workloads]


def run_separate(
    cfg: BenchConfig, model_dir: Path, device: str, dtype: str, prompt_tokens: int, wl: Workload, adapter_paths: dict[str, str]
) -> WorkloadResult:
    """One engine per adapter, each serving only its adapter's requests, run one after another."""
    parts = []
    for name in wl.adapters:
        sub = tuple(r for r in wl.requests if r.adapter == name)
        sub_wl = Workload(f"{wl.name}:{name}", wl.kind, sub, 1)
        kw = _engine_kwargs(cfg, model_dir, device, dtype, prompt_tokens, len(sub))
        kw.update(max_loras=1, max_cpu_loras=1, loras=((name, adapter_paths[name]),))
        t = time.monotonic()
        if cfg.rate is None:
            from engine.llm import LLM

            llm = LLM(**kw)
            llm.generate([sub[0].prompt], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
            parts.append(run_offline(llm, sub_wl, system="separate", startup_s=time.monotonic() - t))
            del llm
        else:
            parts.append(asyncio.run(_separate_async(kw, sub_wl, t)))
        gc.collect()
    return combine_sequential(wl.name, wl.kind, "separate", parts,
                              notes=[f"{len(parts)} engines run one after another; time excludes engine start-up"])  # fmt: skip


async def _separate_async(kw: dict[str, Any], wl: Workload, t: float) -> WorkloadResult:
    from engine.config import EngineConfig
    from engine.llm import AsyncLLM

    engine = AsyncLLM(EngineConfig.from_kwargs(**kw))
    await engine.start()
    try:
        return await run_poisson(engine, wl, system="separate", startup_s=time.monotonic() - t)
    finally:
        await engine.stop()


def machine_info(device: str, dtype: str) -> dict[str, Any]:
    import torch

    from engine.version import __version__

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "mlora": __version__,
        "device": device, "dtype": dtype,
    }  # fmt: skip
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def model_info(model_dir: Path, hf_config: Any, cfg: BenchConfig) -> dict[str, Any]:
    from engine.planning.budget import ModelDims

    dims = ModelDims.from_hf_config(hf_config)
    return {
        "path": str(model_dir), "preset": cfg.preset, "hidden": dims.hidden, "intermediate": dims.intermediate,
        "layers": dims.layers, "heads": dims.heads, "kv_heads": dims.kv_heads, "vocab": dims.vocab, "rank": cfg.rank,
    }  # fmt: skip
