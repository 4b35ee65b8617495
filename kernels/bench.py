"""Micro-benchmark of the LoRA ops: the chosen path against naive alternatives, and against memory bandwidth.

CPU: the fast torch path (`backend="cpu"`, what `auto` runs) vs a per-adapter Python loop
(boolean-mask rows per distinct slot) and vs per-row weight gather + bmm.
CUDA: the Triton kernels (auto strategy, plus each strategy forced) and the per-adapter loop.
Every row reports microseconds per call, tokens/s, the bytes the op must move (x/h, the weights
of the N distinct adapters, the output) and the achieved GB/s as a fraction of the measured
read bandwidth of the device (`bound_fraction`: 1.0 = at the memory-traffic bound).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kernels.meta import LoraBatchMeta
from kernels.ops import lora_expand, lora_shrink

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _loop_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    h = torch.zeros(x.shape[0], a.shape[1], dtype=x.dtype, device=x.device)
    for s in torch.unique(slots).tolist():
        if s >= 0:
            rows = slots == s
            h[rows] = (x[rows] @ a[s].T) * scales[s]
    return h


def _loop_expand(h: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    for s in torch.unique(slots).tolist():
        if s >= 0:
            rows = slots == s
            out[rows] += h[rows] @ b[s].T
    return out


def _gather_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    s = slots.long().clamp(min=0)
    return torch.bmm(a[s], x.unsqueeze(2)).squeeze(2) * scales[s].unsqueeze(1)  # [T, R, K] weight copy


def _gather_expand(h: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    s = slots.long().clamp(min=0)
    return out.add_(torch.bmm(b[s], h.unsqueeze(2)).squeeze(2))  # [T, N, R] weight copy


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], Any]], float]:
    """Best-of-`repeats` seconds per call (the minimum is the robust estimate on a busy machine)."""

    def measure(fn: Callable[[], Any]) -> float:
        fn()
        inner = 5
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                torch.cuda.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                best = min(best, (time.perf_counter() - t0) / inner)
        return best

    return measure


def read_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Achievable read bandwidth (GB/s): a reduction over a tensor far larger than the caches.

    The LoRA ops are dominated by reading adapter weights, so a streaming read is their bound.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    sec = _timer(device, repeats)(lambda: src.sum())
    return nbytes / sec / 1e9


def decode_slots(T: int, n_adapters: int, *, seed: int = 0) -> list[int]:
    """Interleaved decode layout: T rows over `n_adapters` distinct slots, each used at least once."""
    gen = torch.Generator().manual_seed(seed)
    n = min(n_adapters, T)
    slots = torch.randint(0, n, (T,), generator=gen)
    slots[:n] = torch.arange(n)
    return slots[torch.randperm(T, generator=gen)].tolist()


def run_kernel_bench(*, device: str = "auto", hidden_sizes: Sequence[int] = (768, 4096), rank: int = 16,
                     tokens: Sequence[int] = (1, 16, 64), adapters: Sequence[int] = (1, 4, 16),
                     dtype: str | None = None, num_slots: int = 16, repeats: int = 15,
                     threads: int | None = None, rotate_bytes: int = 96 << 20,
                     bandwidth_bytes: int = 1 << 28) -> dict[str, Any]:
    """Time shrink and expand (out = in = hidden) for each (hidden, T, N distinct adapters) case.

    Returns {"device", "dtype", "threads", "bandwidth_gbs", "rows": [ {op, hidden, rank, T, N, method,
    us, tokens_per_s, bytes, gbs, bound_fraction, speedup_vs_loop} ]}. `threads` sets torch's CPU threads;
    calls rotate over ~`rotate_bytes` of distinct weight stacks so weights come from memory, not cache.
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dt = _DTYPES[dtype or ("bfloat16" if dev.type == "cuda" else "float32")]
    if threads:
        torch.set_num_threads(threads)
    measure = _timer(dev, repeats)
    bw = read_bandwidth_gbs(dev, bandwidth_bytes)
    esize = torch.tensor([], dtype=dt).element_size()
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for hidden in hidden_sizes:
        S = max(num_slots, max(adapters))
        # Like a real step (every layer has its own stacks), rotate through enough weight copies that
        # they do not stay cache-resident between calls: the timing then includes the weight traffic.
        copies = max(1, min(64, -(-rotate_bytes // (2 * S * rank * hidden * esize))))
        a_all = [(torch.randn(S, rank, hidden, generator=gen) / hidden ** 0.5).to(dev, dt) for _ in range(copies)]
        b_all = [(torch.randn(S, hidden, rank, generator=gen) / rank ** 0.5).to(dev, dt) for _ in range(copies)]
        scales = torch.rand(S, generator=gen).to(dev)
        for T in tokens:
            for N in adapters:
                if N > T:
                    continue
                slot_list = decode_slots(T, N)
                slots = torch.tensor(slot_list, dtype=torch.int32, device=dev)
                meta = LoraBatchMeta.from_token_slots(slot_list, device=dev)
                x = torch.randn(T, hidden, generator=gen).to(dev, dt)
                h = lora_shrink(x, a_all[0], slots, scales, meta=meta)
                out = torch.zeros(T, hidden, dtype=dt, device=dev)
                weights = N * rank * hidden * esize
                io = {"shrink": (T * hidden + T * rank) * esize + weights,
                      "expand": (T * rank + 2 * T * hidden) * esize + weights}
                rot = itertools.cycle(range(copies))
                shrink_fns: dict[str, Callable[[int], Any]] = {}
                expand_fns: dict[str, Callable[[int], Any]] = {}
                if dev.type == "cuda":
                    for strat in ("auto", "segment", "gather"):
                        name = "triton" if strat == "auto" else f"triton-{strat}"
                        shrink_fns[name] = lambda i, s=strat: lora_shrink(x, a_all[i], slots, scales, meta=meta,
                                                                           backend="triton", strategy=s)
                        expand_fns[name] = lambda i, s=strat: lora_expand(h, b_all[i], slots, out, meta=meta,
                                                                          backend="triton", strategy=s)
                else:
                    shrink_fns["chosen"] = lambda i: lora_shrink(x, a_all[i], slots, scales, meta=meta, backend="cpu")
                    expand_fns["chosen"] = lambda i: lora_expand(h, b_all[i], slots, out, meta=meta, backend="cpu")
                    shrink_fns["row-gather"] = lambda i: _gather_shrink(x, a_all[i], slots, scales)
                    expand_fns["row-gather"] = lambda i: _gather_expand(h, b_all[i], slots, out)
                shrink_fns["adapter-loop"] = lambda i: _loop_shrink(x, a_all[i], slots, scales)
                expand_fns["adapter-loop"] = lambda i: _loop_expand(h, b_all[i], slots, out)
                for op, fns in (("shrink", shrink_fns), ("expand", expand_fns)):
                    timings = {name: measure(lambda fn=fn: fn(next(rot))) for name, fn in fns.items()}
                    for name, sec in timings.items():
                        gbs = io[op] / sec / 1e9
                        rows.append({"op": op, "hidden": hidden, "rank": rank, "T": T, "N": N, "method": name,
                                     "us": sec * 1e6, "tokens_per_s": T / sec, "bytes": io[op], "gbs": gbs,
                                     "bound_fraction": gbs / bw,
                                     "speedup_vs_loop": timings["adapter-loop"] / sec})
    return {"device": str(dev), "dtype": str(dt).removeprefix("torch."), "threads": torch.get_num_threads(),
            "bandwidth_gbs": bw, "rows": rows}


def format_kernel_bench(result: dict[str, Any]) -> str:
    """Plain-text table of `run_kernel_bench` rows (one line per op/case/method)."""
    lines = [f"device={result['device']} dtype={result['dtype']} threads={result['threads']} "
             f"read bandwidth={result['bandwidth_gbs']:.1f} GB/s",
             f"{'op':<7}{'hidden':>7}{'T':>5}{'N':>4}  {'method':<16}{'us':>10}{'tok/s':>12}{'GB/s':>8}"
             f"{'of bw':>7}{'vs loop':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['op']:<7}{r['hidden']:>7}{r['T']:>5}{r['N']:>4}  {r['method']:<16}{r['us']:>10.1f}"
                     f"{r['tokens_per_s']:>12.0f}{r['gbs']:>8.2f}{r['bound_fraction']:>7.0%}{r['speedup_vs_loop']:>8.1f}x")
    return "\n".join(lines)
