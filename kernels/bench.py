"""Micro-benchmark of the LoRA ops: the chosen path against naive alternatives, and against memory bandwidth.

CPU: the fast torch path (`backend="cpu"`, what `auto` runs) vs a per-adapter Python loop
(boolean-mask rows per distinct slot) and vs per-row weight gather + bmm.
CUDA: the Triton kernels (auto strategy, plus each strategy forced) timed as GPU time (CUDA-graph
replay, no Python launch cost), the auto path timed eagerly as the engine calls it
(`triton-eager`: Python + launch included), and the per-adapter loop.
Both devices: `bmm` is a plain batched matmul over the same bytes (rows pre-grouped into N equal
groups, one [N, T/N, K] x [N, K, R] bmm): what a dense library op achieves on this traffic.
Every row reports microseconds per call, tokens/s, the bytes the op must move (x/h, the weights
of the N distinct adapters, the output), the achieved GB/s as a fraction of the measured read
bandwidth of the device (`bound_fraction`: 1.0 = at the memory-traffic bound) and of its copy
bandwidth (`copy_fraction`, bytes read + written by a device-to-device copy), and the time
relative to the same-bytes bmm (`vs_bmm`: < 1 is faster than the bmm).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kernels.dtypes import TORCH_DTYPES
from kernels.meta import LoraBatchMeta
from kernels.ops import lora_expand, lora_shrink



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


def _graph_timer(repeats: int, calls: int) -> Callable[[Callable[[int], Any]], float]:
    """CUDA: seconds per call of `fn(i)`, i = 0..calls-1 captured in one CUDA graph, best of `repeats` replays.

    GPU time only: the graph replays the kernels without Python or launch cost, as a captured
    decode step would. Rotating `i` over distinct weight copies keeps the weights out of L2.
    """

    def measure(fn: Callable[[int], Any]) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles) outside the capture
            for i in range(min(calls, 3)):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(i)
        graph.replay()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / calls)
        del graph
        return best

    return measure


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth (GB/s), counting the bytes read plus the bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sec = _timer(device, repeats)(lambda: dst.copy_(src))
    return 2 * nbytes / sec / 1e9


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


def run_kernel_bench(*, device: str = "auto", hidden_sizes: Sequence[int] | None = None, rank: int = 16,
                     tokens: Sequence[int] = (1, 16, 64), adapters: Sequence[int] = (1, 4, 16),
                     dtype: str | None = None, num_slots: int = 16, repeats: int = 15,
                     threads: int | None = None, rotate_bytes: int | None = None,
                     bandwidth_bytes: int | None = None) -> dict[str, Any]:
    """Time shrink and expand (out = in = hidden) for each (hidden, T, N distinct adapters) case.

    Returns {"device", "dtype", "threads", "bandwidth_gbs", "copy_gbs", "rows": [ {op, hidden, rank, T, N,
    method, us, tokens_per_s, bytes, gbs, bound_fraction, copy_fraction, speedup_vs_loop, vs_bmm} ]}.
    `threads` sets torch's CPU threads; calls rotate over ~`rotate_bytes` of distinct weight stacks
    so weights come from memory, not cache (default 96 MiB on CPU, 512 MiB on CUDA: H100/H200 L2 is 50-60 MB).
    `hidden_sizes` defaults to (768, 4096) on CPU and (768, 2048, 4096) on CUDA.
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    cuda = dev.type == "cuda"
    dt = TORCH_DTYPES[dtype or ("bfloat16" if cuda else "float32")]
    if threads:
        torch.set_num_threads(threads)
    hidden_sizes = hidden_sizes or ((768, 2048, 4096) if cuda else (768, 4096))
    rotate_bytes = rotate_bytes or ((512 << 20) if cuda else (96 << 20))
    bandwidth_bytes = bandwidth_bytes or ((1 << 30) if cuda else (1 << 28))
    measure = _timer(dev, repeats)
    bw = read_bandwidth_gbs(dev, bandwidth_bytes)
    copy_bw = copy_bandwidth_gbs(dev, bandwidth_bytes)
    esize = torch.tensor([], dtype=dt).element_size()
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for hidden in hidden_sizes:
        S = max(num_slots, max(adapters))
        # Like a real step (every layer has its own stacks), rotate through enough weight copies that
        # they do not stay cache-resident between calls: the timing then includes the weight traffic.
        copies = max(1, min(256 if cuda else 64, -(-rotate_bytes // (2 * S * rank * hidden * esize))))
        a_all = [(torch.randn(S, rank, hidden, generator=gen, device=dev) / hidden ** 0.5).to(dt) for _ in range(copies)]
        b_all = [(torch.randn(S, hidden, rank, generator=gen, device=dev) / rank ** 0.5).to(dt) for _ in range(copies)]
        scales = torch.rand(S, generator=gen, device=dev)
        graph_measure = _graph_timer(repeats, copies) if cuda else None
        for T in tokens:
            for N in adapters:
                if N > T:
                    continue
                slot_list = decode_slots(T, N)
                slots = torch.tensor(slot_list, dtype=torch.int32, device=dev)
                meta = LoraBatchMeta.from_token_lora_slots(slot_list, device=dev)
                x = torch.randn(T, hidden, generator=gen, device=dev).to(dt)
                h = lora_shrink(x, a_all[0], slots, scales, meta=meta)
                out = torch.zeros(T, hidden, dtype=dt, device=dev)
                g = -(-T // N)  # the same-bytes bmm: rows in N equal groups (T padded up to N * g)
                xg = torch.zeros(N, g, hidden, dtype=dt, device=dev)
                hg = torch.zeros(N, g, rank, dtype=dt, device=dev)
                outg = torch.zeros(N, g, hidden, dtype=dt, device=dev)
                weights = N * rank * hidden * esize
                io = {"shrink": (T * hidden + T * rank) * esize + weights,
                      "expand": (T * rank + 2 * T * hidden) * esize + weights}
                rot = itertools.cycle(range(copies))
                shrink_fns: dict[str, Callable[[int], Any]] = {}
                expand_fns: dict[str, Callable[[int], Any]] = {}
                if cuda:
                    for strat in ("auto", "segment", "gather"):
                        name = "triton" if strat == "auto" else f"triton-{strat}"
                        shrink_fns[name] = lambda i, s=strat: lora_shrink(x, a_all[i], slots, scales, meta=meta,
                                                                           backend="triton", strategy=s)
                        expand_fns[name] = lambda i, s=strat: lora_expand(h, b_all[i], slots, out, meta=meta,
                                                                          backend="triton", strategy=s)
                    shrink_fns["triton-eager"] = lambda i: lora_shrink(x, a_all[i], slots, scales, meta=meta,
                                                                       check=False)
                    expand_fns["triton-eager"] = lambda i: lora_expand(h, b_all[i], slots, out, meta=meta,
                                                                       check=False)
                else:
                    shrink_fns["chosen"] = lambda i: lora_shrink(x, a_all[i], slots, scales, meta=meta, backend="cpu")
                    expand_fns["chosen"] = lambda i: lora_expand(h, b_all[i], slots, out, meta=meta, backend="cpu")
                    shrink_fns["row-gather"] = lambda i: _gather_shrink(x, a_all[i], slots, scales)
                    expand_fns["row-gather"] = lambda i: _gather_expand(h, b_all[i], slots, out)
                shrink_fns["bmm"] = lambda i: torch.bmm(xg, a_all[i][:N].transpose(1, 2))
                expand_fns["bmm"] = lambda i: torch.baddbmm(outg, hg, b_all[i][:N].transpose(1, 2))
                shrink_fns["adapter-loop"] = lambda i: _loop_shrink(x, a_all[i], slots, scales)
                expand_fns["adapter-loop"] = lambda i: _loop_expand(h, b_all[i], slots, out)
                for op, fns in (("shrink", shrink_fns), ("expand", expand_fns)):
                    timings = {}
                    for name, fn in fns.items():
                        if graph_measure is not None and name not in ("adapter-loop", "triton-eager"):
                            timings[name] = graph_measure(fn)  # GPU time; the loop syncs (unique) and cannot be captured
                        else:
                            timings[name] = measure(lambda fn=fn: fn(next(rot)))
                    for name, sec in timings.items():
                        gbs = io[op] / sec / 1e9
                        rows.append({"op": op, "hidden": hidden, "rank": rank, "T": T, "N": N, "method": name,
                                     "us": sec * 1e6, "tokens_per_s": T / sec, "bytes": io[op], "gbs": gbs,
                                     "bound_fraction": gbs / bw, "copy_fraction": gbs / copy_bw,
                                     "speedup_vs_loop": timings["adapter-loop"] / sec,
                                     "vs_bmm": sec / timings["bmm"]})
        del a_all, b_all
    return {"device": str(dev), "dtype": str(dt).removeprefix("torch."), "threads": torch.get_num_threads(),
            "bandwidth_gbs": bw, "copy_gbs": copy_bw, "timing": "cuda-graph" if cuda else "wall",
            "gpu": torch.cuda.get_device_name(dev) if cuda else None, "rows": rows}


def format_kernel_bench(result: dict[str, Any]) -> str:
    """Plain-text table of `run_kernel_bench` rows (one line per op/case/method)."""
    lines = [f"device={result['device']} dtype={result['dtype']} threads={result['threads']} "
             f"read bandwidth={result['bandwidth_gbs']:.1f} GB/s copy bandwidth={result['copy_gbs']:.1f} GB/s",
             f"{'op':<7}{'hidden':>7}{'T':>5}{'N':>4}  {'method':<16}{'us':>10}{'tok/s':>12}{'GB/s':>9}"
             f"{'of bw':>7}{'of copy':>8}{'vs bmm':>8}{'vs loop':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['op']:<7}{r['hidden']:>7}{r['T']:>5}{r['N']:>4}  {r['method']:<16}{r['us']:>10.1f}"
                     f"{r['tokens_per_s']:>12.0f}{r['gbs']:>9.2f}{r['bound_fraction']:>7.0%}{r['copy_fraction']:>8.0%}"
                     f"{r['vs_bmm']:>7.2f}x{r['speedup_vs_loop']:>8.1f}x")
    return "\n".join(lines)
