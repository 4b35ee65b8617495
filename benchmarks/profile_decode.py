"""Profile mlora decode steps: `python -m benchmarks.profile_decode [--preset llama-1b] [--device cuda]`.

On CPU: `python -m benchmarks.profile_decode --preset small --device cpu --dtype float32 --batch 32 --threads 1`.

Queues `--batch` requests over `--adapters` distinct adapters (round-robin: a mixed-N decode
batch), runs the prefill and a few warm-up decode steps, times `--steps` plain decode steps
(wall and, on CUDA, GPU-synchronised), then records the same number of steps with
torch.profiler and prints the top ops by device time and by CPU time, plus how busy the
device was: GPU time / wall time near 1 means the kernels limit the step, far below 1 means
Python and launches do (the GPU waits for the host).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from engine.bench.presets import build_adapters, build_preset_model, quiet_transformers
from engine.llm import LLM
from engine.sampling_params import SamplingParams


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _table(prof: torch.profiler.profile, sort: str, rows: int) -> str:
    try:
        return prof.key_averages().table(sort_by=sort, row_limit=rows)
    except Exception:  # noqa: BLE001 - older/newer torch name the device columns differently
        return prof.key_averages().table(sort_by=sort.replace("device", "cuda"), row_limit=rows)


def _device_total_ms(table: str) -> float:
    """The table's own "Self CUDA time total" (summing the rows would count op and kernel rows twice)."""
    m = re.search(r"Self (?:CUDA|Device|XPU) time total: ([0-9.]+)(ms|us|s)", table)
    if m is None:
        return 0.0
    return float(m.group(1)) * {"s": 1e3, "ms": 1.0, "us": 1e-3}[m.group(2)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adapters", type=int, default=16, help="distinct adapters in the batch (0 = base model)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="CPU compute threads (default: torch's)")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed and profiled")
    p.add_argument("--rows", type=int, default=30, help="rows of each top-ops table")
    p.add_argument("--out", default=None, help="write the tables here")
    p.add_argument("--json", default=None, help="write the step timings here")
    args = p.parse_args(argv)
    quiet_transformers()

    model_dir = build_preset_model(args.preset)
    n = max(args.adapters, 1)
    paths = {f"lora-{i:03d}": str(q) for i, q in enumerate(build_adapters(model_dir, rank=args.rank, count=n))}
    prompt_len, warm = 16, 3
    llm = LLM(str(model_dir), device=args.device, dtype=args.dtype, max_num_seqs=args.batch,
              max_num_batched_tokens=max(2048, args.batch * (prompt_len + 1)),
              max_model_len=prompt_len + 2 * args.steps + warm + 16, enable_lora=True, max_loras=n,
              max_lora_rank=args.rank, loras=tuple(paths.items()), cpu_threads=args.threads)  # fmt: skip
    engine = llm.engine
    names = list(paths) if args.adapters else [None]
    total = 1 + warm + 2 * args.steps + 4
    params = SamplingParams(max_tokens=total, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [1] + [(7 * i + j) % 200 + 3 for j in range(prompt_len - 1)], params, names[i % len(names)])
    for _ in range(1 + warm):  # prefill, then warm-up decodes (first calls compile/allocate)
        engine.step()
    _sync(args.device)

    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    _sync(args.device)
    step_ms = (time.perf_counter() - t0) / args.steps * 1e3

    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            engine.step()
        _sync(args.device)
    device_table = _table(prof, "self_device_time_total", args.rows) if args.device == "cuda" else ""
    gpu_ms = _device_total_ms(device_table) / args.steps
    head = (f"preset={args.preset} device={args.device} dtype={args.dtype} batch={args.batch} "
            f"adapters={args.adapters} rank={args.rank}\n"
            f"decode step: {step_ms:.2f} ms wall ({args.batch / step_ms * 1e3:.0f} tokens/s); "
            f"device time {gpu_ms:.2f} ms/step (busy {gpu_ms / step_ms:.0%} of the unprofiled wall time)\n")
    parts = [head]
    if args.device == "cuda":
        parts += ["== top ops by self device time ==", device_table]
    parts += ["== top ops by CPU time (incl. children) ==", _table(prof, "cpu_time_total", args.rows)]
    text = "\n".join(parts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    result = {"preset": args.preset, "device": args.device, "dtype": args.dtype, "batch": args.batch,
              "adapters": args.adapters, "step_ms": step_ms, "device_ms_per_step": gpu_ms,
              "tokens_per_s": args.batch / step_ms * 1e3}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
