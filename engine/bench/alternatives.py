"""The standard-library alternative: transformers + PEFT serving a mixed batch.

PEFT serves several adapters in one batch with `generate(..., adapter_names=[...])` (one
name per row, "__base__" for none). Offline, the whole workload is one static batch. With
Poisson arrivals PEFT has no continuous batching, so the fair simulation is the usual static
server loop: wait for the first waiting request, take every request that has arrived, run
them as one `generate` to the longest output, repeat. Token times come from a logits
processor (called once per generated token), so TTFT and the decode rate are measured the
same way as for mlora.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from engine.bench.stats import RequestTiming, WorkloadResult, summarize
from engine.bench.workloads import BenchRequest, Workload

_TORCH_DTYPES = ("float32", "bfloat16", "float16")


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


class _StepClock:
    """A logits processor that records the wall time of every generation step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.times.append(time.monotonic())
        return scores


def _load(model_dir: Path, adapter_paths: dict[str, str], names: list[str], device: str, dtype: str) -> tuple[Any, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
    model = PeftModel.from_pretrained(base, adapter_paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_paths[name], adapter_name=name)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _generate(model: Any, tok: Any, reqs: list[BenchRequest], device: str) -> list[float]:
    """Run one static batch to its longest output; returns the per-step timestamps."""
    import torch
    from transformers import LogitsProcessorList

    enc = tok([r.prompt for r in reqs], return_tensors="pt", padding=True).to(device)
    steps = max(r.max_tokens for r in reqs)
    clock = _StepClock()
    names = [r.adapter or "__base__" for r in reqs]
    kwargs: dict[str, Any] = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([clock]))  # fmt: skip
    with torch.inference_mode():
        if len(set(names)) > 1:  # PEFT's mixed-batch path: rows grouped per adapter in every LoRA layer
            model.generate(**enc, adapter_names=names, **kwargs)
        elif names[0] == "__base__":
            with model.disable_adapter():
                model.generate(**enc, **kwargs)
        else:  # one adapter: PEFT's plain path
            model.set_adapter(names[0])
            model.generate(**enc, **kwargs)
    return clock.times


def _timings(reqs: list[BenchRequest], arrivals: list[float], steps: list[float], finished: float) -> list[RequestTiming]:
    out = []
    for r, arrival in zip(reqs, arrivals):
        last = steps[min(r.max_tokens, len(steps)) - 1] if steps else None
        out.append(RequestTiming(arrival=arrival, finished=finished, num_tokens=r.max_tokens,
                                 first_token=steps[0] if steps else None, last_token=last))  # fmt: skip
    return out


def run_peft(
    model_dir: Path,
    adapter_paths: dict[str, str],
    workloads: list[Workload],
    *,
    device: str,
    dtype: str,
    max_batch: int,
    poisson: bool = False,
) -> list[WorkloadResult]:
    """Time `workloads` on transformers + PEFT (one model, every needed adapter loaded)."""
    names = list(dict.fromkeys(a for w in workloads for a in w.adapters))
    t = time.monotonic()
    model, tok = _load(model_dir, adapter_paths, names, device, dtype)
    first = workloads[0].requests
    _generate(model, tok, [BenchRequest(r.prompt, r.adapter, 2) for r in first], device)  # warm-up, full batch shape
    startup = time.monotonic() - t
    results = []
    for wl in workloads:
        warm = [BenchRequest(first[0].prompt, a, 2) for a in wl.adapters]
        if warm:
            _generate(model, tok, warm, device)
        gc.collect()
        reqs = list(wl.requests)
        t0 = time.monotonic()
        timings = _run_static_server(model, tok, reqs, device, max_batch, t0) if poisson else None
        if timings is None:
            steps = _generate(model, tok, reqs, device)
            timings = _timings(reqs, [t0] * len(reqs), steps, time.monotonic())
        t1 = time.monotonic()
        note = "static batches (no continuous batching): each batch runs to its longest output" if poisson else ""
        results.append(summarize(wl.name, wl.kind, "peft", wl.num_adapters, timings, start=t0, end=t1,
                                 startup_s=startup, notes=[note] if note else []))  # fmt: skip
    del model
    gc.collect()
    return results


def _run_static_server(model: Any, tok: Any, reqs: list[BenchRequest], device: str, max_batch: int, t0: float) -> list[RequestTiming]:
    """Poisson arrivals served by a static-batching loop (what a plain PEFT server does)."""
    base = min(r.arrival_s for r in reqs)
    order = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
    timings: list[RequestTiming] = []
    i = 0
    while i < len(order):
        nxt = t0 + reqs[order[i]].arrival_s - base
        now = time.monotonic()
        if nxt > now:
            time.sleep(nxt - now)
            now = time.monotonic()
        batch = []
        while i < len(order) and len(batch) < max_batch and t0 + reqs[order[i]].arrival_s - base <= now:
            batch.append(reqs[order[i]])
            i += 1
        steps = _generate(model, tok, batch, device)
        timings.extend(_timings(batch, [t0 + r.arrival_s - base for r in batch], steps, time.monotonic()))
    return timings
