"""A/B of decode attention in one process: `python -m benchmarks.decode_attention_ab [--preset small]`.

Two engines over the same model and requests (a mixed-N decode batch, as `benchmarks.profile_decode`
builds it), one attending the decode rows in one whole-batch gather + SDPA per layer ("whole"), the other
in cache-sized chunks through a reused scratch buffer ("chunked", the CPU default, `kernels.tuning.
DECODE_CHUNK_BYTES`). Blocks of `--block` decode steps alternate between them; each block records the
step time, the time inside paged attention and inside SDPA (CPU time of this thread, so that other
processes on a shared machine count less), and the script prints medians and the per-block ratios
chunked / whole. Both engines must produce the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import engine.attention as attention
import engine.model as model
from engine.bench.presets import build_adapters, build_preset_model, quiet_transformers
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kernels import tuning

_spent = {"attention": 0.0, "sdpa": 0.0}


def _timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
    def wrapper(*a: Any, **k: Any) -> Any:
        t = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            _spent[key] += time.thread_time() - t

    return wrapper


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=60, help="decode steps per engine")
    p.add_argument("--block", type=int, default=5, help="steps per alternation")
    p.add_argument("--chunk-bytes", type=int, default=None, help="override tuning.DECODE_CHUNK_BYTES for 'chunked'")
    p.add_argument("--min-rows", type=int, default=None, help="override tuning.DECODE_CHUNK_MIN_ROWS for 'chunked'")
    args = p.parse_args(argv)
    if args.chunk_bytes is not None:
        tuning.DECODE_CHUNK_BYTES = args.chunk_bytes
    if args.min_rows is not None:
        tuning.DECODE_CHUNK_MIN_ROWS = args.min_rows
    quiet_transformers()
    torch.set_num_threads(args.threads)
    model_dir = build_preset_model(args.preset)
    n = max(args.adapters, 1)
    paths = {f"lora-{i:03d}": str(q) for i, q in enumerate(build_adapters(model_dir, rank=16, count=n))}
    names = list(paths) if args.adapters else [None]

    def make(chunked: bool) -> Any:
        llm = LLM(str(model_dir), device="cpu", dtype=args.dtype, max_num_seqs=args.batch, cpu_threads=args.threads,
                  max_num_batched_tokens=max(2048, args.batch * (args.prompt_len + 8)),
                  max_model_len=args.prompt_len + args.steps + 16, enable_lora=True, max_loras=n, max_lora_rank=16,
                  loras=tuple(paths.items()))  # fmt: skip
        engine = llm.engine
        if not chunked:
            engine.runner.attn_meta._kv_numel = 0  # no chunks, no scratch: one gather + SDPA per layer
        params = SamplingParams(max_tokens=args.steps + 4, temperature=0.0, ignore_eos=True)
        for i in range(args.batch):
            prompt = [1] + [(7 * i + j) % 200 + 3 for j in range(args.prompt_len - 1 + i % 5)]
            engine.add_request(f"r{i}", prompt, params, names[i % len(names)])
        engine.step()  # prefill
        engine.step()
        return engine

    engines = {"whole": make(False), "chunked": make(True)}
    model.paged_attention = _timed(attention.paged_attention, "attention")
    attention.F = _FunctionalWithTimedSdpa()
    rows: dict[str, dict[str, list[float]]] = {k: {"step": [], "attention": [], "sdpa": []} for k in engines}
    for _ in range(args.steps // args.block):
        for name, engine in engines.items():
            _spent["attention"] = _spent["sdpa"] = 0.0
            t = time.thread_time()
            for _ in range(args.block):
                engine.step()
            rows[name]["step"].append((time.thread_time() - t) / args.block * 1e3)
            rows[name]["attention"].append(_spent["attention"] / args.block * 1e3)
            rows[name]["sdpa"].append(_spent["sdpa"] / args.block * 1e3)
    print(f"preset={args.preset} dtype={args.dtype} batch={args.batch} adapters={args.adapters} threads={args.threads} "
          f"prompt={args.prompt_len} chunk={tuning.DECODE_CHUNK_BYTES} B, >= {tuning.DECODE_CHUNK_MIN_ROWS} rows "
          f"blocks={args.steps // args.block}x{args.block} steps (ms per decode step, CPU time of this thread)")
    for name, r in rows.items():
        gather = [a - s for a, s in zip(r["attention"], r["sdpa"])]
        print(f"{name:8s} step {statistics.median(r['step']):7.1f}  attention {statistics.median(r['attention']):6.2f}"
              f"  (sdpa {statistics.median(r['sdpa']):6.2f}, write + gather {statistics.median(gather):6.2f})")
    for part in ("step", "attention", "sdpa"):
        ratios = [c / w for c, w in zip(rows["chunked"][part], rows["whole"][part])]
        q = statistics.quantiles(ratios, n=4)
        print(f"chunked / whole {part:9s}: median {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    tokens = {k: sorted((s.request_id, list(s.token_ids)) for s in e.scheduler.running) for k, e in engines.items()}
    print("same tokens:", tokens["whole"] == tokens["chunked"])


class _FunctionalWithTimedSdpa:
    """torch.nn.functional as engine.attention sees it, with scaled_dot_product_attention timed."""

    def __init__(self) -> None:
        import torch.nn.functional as F

        self._f = F
        self.scaled_dot_product_attention = _timed(F.scaled_dot_product_attention, "sdpa")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


if __name__ == "__main__":
    main()
