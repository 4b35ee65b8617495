"""Registry at scale (issue 19): register 1,000 PEFT adapters, then serve requests across all of them.

    python -m benchmarks.registry_scale [--adapters 1000] [--few 16] [--requests 1000] [--repeat 3]

Builds (once, cached under $MLORA_BENCH_CACHE) the `tiny` preset model and N seeded PEFT adapters
written by PEFT's save_pretrained (engine.bench.presets), then in one process:
  1. registration as at startup (`LLM(loras=...)`, `mlora serve --lora`): config + safetensors header
     only, timed for all N; and, for reference, a full (eager) registration as at runtime, for 100;
  2. requests: the same R requests (same prompts, greedy, --max-tokens) spread round-robin over
     `--few` names and over all N names, interleaved (few, many, few, many, ...) --repeat times.
     Pass 1 over the N names includes every adapter's first full load (read, hash, value checks);
     later passes find them in the CPU tier (by default it keeps 2 x --max-loras adapters and more
     within 1 GiB: all N small ones), or re-read those it dropped and check the digest only.
By default at most --max-loras requests run at once in both (--max-num-seqs), so the two runs
batch alike and the difference is what the registry costs (first loads, re-reads, slot writes).
Prints one JSON object: registration seconds, per-pass seconds, medians and the many/few ratio
(pass 1 and later passes), the same in process CPU time (all threads), plus the adapter cache
counters. Timings are wall clock on whatever else the machine is running: compare the ratios from
one run (the CPU-time ratio moves less when other processes share the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--few", type=int, default=16)
    ap.add_argument("--requests", type=int, default=1000, help="requests per pass (round-robin over the names)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-loras", type=int, default=16)
    ap.add_argument("--max-cpu-loras", type=int, default=None,
                    help="default: the engine's (2 x --max-loras, and more within --max-cpu-lora-bytes)")
    ap.add_argument("--max-cpu-lora-bytes", type=int, default=None,
                    help="default: the engine's (1 GiB; 0 when --max-cpu-loras is given: a count only)")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="default: --max-loras, so both runs batch alike and the difference is the registry's "
                         "(0: the engine's default; with one adapter per request a batch then still holds at "
                         "most --max-loras distinct adapters, the slot-bound churn of issue 19)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from engine import LLM, SamplingParams
    from engine.bench.presets import build_adapters, build_preset_model

    model = build_preset_model(args.preset)
    paths = build_adapters(model, rank=args.rank, count=args.adapters)
    names = [f"a{i:04d}" for i in range(args.adapters)]

    seqs = args.max_loras if args.max_num_seqs is None else args.max_num_seqs
    kw = dict(enable_lora=True, max_loras=args.max_loras, max_lora_rank=max(16, args.rank), max_cpu_loras=args.max_cpu_loras,
              **({} if args.max_cpu_lora_bytes is None else {"max_cpu_lora_bytes": args.max_cpu_lora_bytes}),
              dtype="float32", device="cpu", **({"max_num_seqs": seqs} if seqs else {}))
    llm = LLM(str(model), **kw)
    lora = llm.engine.lora
    t0 = time.perf_counter()
    for name, path in zip(names, paths):  # what `LLM(loras=...)` / `mlora serve --lora` run at startup
        try:
            lora.add_adapter(name, str(path), eager=False)
        except TypeError:  # a tree before header-only registration (to measure "before")
            lora.add_adapter(name, str(path))
    register_s = time.perf_counter() - t0
    probe = LLM(str(model), **kw).engine.lora
    k = min(100, args.adapters)
    t0 = time.perf_counter()
    for name, path in zip(names[:k], paths[:k]):  # one adapter at runtime: header + full load + values + hash
        probe.add_adapter(name, str(path))
    eager_ms = 1e3 * (time.perf_counter() - t0) / k
    del probe

    prompts = [f"request {i}: the quick brown fox" for i in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    few = [names[i % args.few] for i in range(args.requests)]
    many = [names[i % args.adapters] for i in range(args.requests)]
    llm.generate(prompts[:4], params, adapters=few[:4])  # warm-up (allocations, first kernels)

    cpu: dict[str, list[float]] = {"few": [], "many": []}  # process CPU seconds (all threads): steadier on a shared machine

    def timed(kind: str, adapters: list[str]) -> float:
        t, c = time.perf_counter(), time.process_time()
        out = llm.generate(prompts, params, adapters=adapters)
        assert len(out) == len(prompts) and all(o.outputs[0].token_ids for o in out)
        cpu[kind].append(time.process_time() - c)
        return time.perf_counter() - t

    runs: dict[str, list[float]] = {"few": [], "many": []}
    for _ in range(args.repeat):
        runs["few"].append(timed("few", few))
        runs["many"].append(timed("many", many))
    later = {k: v[1:] or v for k, v in runs.items()}
    later_cpu = {k: v[1:] or v for k, v in cpu.items()}
    st = llm.engine.lora.cache.stats()
    report = {
        "adapters": args.adapters, "few": args.few, "requests": args.requests, "max_tokens": args.max_tokens,
        "max_loras": args.max_loras, "max_num_seqs": llm.config.max_num_seqs, "max_cpu_loras": llm.engine.lora.cache.max_cpu_loras,
        "max_cpu_lora_bytes": getattr(llm.engine.lora.cache, "max_cpu_lora_bytes", 0), "rank": args.rank,
        "preset": args.preset, "threads": args.threads, "cpus": os.cpu_count(),
        "register_s": round(register_s, 3), "register_ms_per_adapter": round(1e3 * register_s / args.adapters, 3),
        "eager_register_ms_per_adapter": round(eager_ms, 3),
        "passes_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "first_pass_many_over_few": round(runs["many"][0] / runs["few"][0], 3),
        "later_passes_median_s": {k: round(statistics.median(v), 3) for k, v in later.items()},
        "later_many_over_few": round(statistics.median(later["many"]) / statistics.median(later["few"]), 3),
        "passes_cpu_s": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
        "later_many_over_few_cpu": round(statistics.median(later_cpu["many"]) / statistics.median(later_cpu["few"]), 3),
        "cache": {"disk_loads": st.disk_loads, "device_loads": st.device_loads, "cpu_evictions": st.cpu_evictions,
                  "load_failures": st.load_failures,
                  "disk_load_ms_median": round(1e3 * statistics.median(st.disk_load_seconds), 3) if st.disk_load_seconds else None},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
