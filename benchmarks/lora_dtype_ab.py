"""bf16 model, LoRA stacks in bf16 vs fp32 (`lora_dtype`): `python -m benchmarks.lora_dtype_ab`.

Two engines on the `small` preset (dtype bfloat16; lora_dtype "auto" = bf16 and "float32", PEFT's
default numerics on a bf16 base) serve, in alternating rounds, 32 requests round-robin over N adapters;
prints the median decode-step CPU time of each and the mixed/homogeneous ratio per lora_dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.bench.presets import build_adapters, build_preset_model, quiet_transformers
from engine.llm import LLM
from engine.sampling_params import SamplingParams

LORA_DTYPES = ("auto", "float32")


def _round(engine, names: list[str], n: int, batch: int, steps: int, tag: str) -> float:  # type: ignore[no-untyped-def]
    """CPU ms per decode step of one round: `batch` requests over the first `n` adapters."""
    params = SamplingParams(max_tokens=steps + 3, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", [1] + [(7 * i + j) % 200 + 3 for j in range(15)], params, names[i % n])
    for _ in range(3):  # prefill + warm-up decodes
        engine.step()
    t = time.process_time()
    for _ in range(steps):
        engine.step()
    ms = (time.process_time() - t) / steps * 1e3
    while engine.has_unfinished():
        engine.step()
    return ms


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default="1,16", help="comma-separated N (the first is the homogeneous case)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    quiet_transformers()
    torch.set_num_threads(args.threads)
    ns = [int(n) for n in args.adapters.split(",")]
    model_dir = build_preset_model("small")
    paths = {f"lora-{i:03d}": str(q) for i, q in enumerate(build_adapters(model_dir, rank=args.rank, count=max(ns)))}
    names = list(paths)
    engines = {ld: LLM(str(model_dir), dtype="bfloat16", lora_dtype=ld, max_num_seqs=args.batch, max_model_len=128,
                       max_num_batched_tokens=max(2048, 16 * args.batch), enable_lora=True, max_loras=max(ns),
                       max_lora_rank=args.rank, loras=tuple(paths.items()), cpu_threads=args.threads).engine
               for ld in LORA_DTYPES}  # fmt: skip
    ms: dict[tuple[str, int], list[float]] = {(ld, n): [] for ld in LORA_DTYPES for n in ns}
    for r in range(args.rounds):
        for n in ns:
            for ld in LORA_DTYPES if r % 2 == 0 else LORA_DTYPES[::-1]:
                ms[(ld, n)].append(_round(engines[ld], names, n, args.batch, args.steps, f"{r}-{n}-{ld}"))
    med = {k: statistics.median(v) for k, v in ms.items()}
    for n in ns:
        a, f = med[("auto", n)], med[("float32", n)]
        print(f"N={n} r{args.rank}: step ms, bf16 stacks {a:.1f}  fp32 stacks {f:.1f}  fp32/bf16 {f / a:.3f}"
              f"  (rounds {[round(x, 1) for x in ms[('auto', n)]]} / {[round(x, 1) for x in ms[('float32', n)]]})")
    if len(ns) > 1:
        for ld in LORA_DTYPES:
            print(f"lora_dtype={ld}: mixed-{ns[-1]}/homogeneous (tok/s) {med[(ld, ns[0])] / med[(ld, ns[-1])]:.3f}")
    return {f"{ld}/{n}": v for (ld, n), v in med.items()}


if __name__ == "__main__":
    main()
