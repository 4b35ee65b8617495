"""Base-model CPU throughput of the mlora engine at batch 1 and batch 32 (issue: engine core).

    python -m benchmarks.engine_throughput --threads 2

Model: `mlora bench`'s seeded `small` preset (Llama, hidden 768, 12 layers, intermediate 2048,
vocab 32000, ~110M parameters), fp32. Prompts of 33 tokens, 32 new tokens, EOS ignored. Reports
steady-state decode tokens/s (16 steps after prefill) and end-to-end `LLM.generate` tokens/s,
best of two rounds. A benchmark, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from engine import LLM, SamplingParams
from engine.bench.presets import build_preset_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(str(build_preset_model("small")), dtype="float32", device="cpu", max_num_seqs=64, enable_lora=False)
    core = llm.engine
    for bs in args.batches:
        prompts = [[1] + [(i * 31 + j * 7) % 250 + 3 for j in range(32)] for i in range(bs)]
        best_e2e = best_dec = 0.0
        for rep in range(2):
            params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            best_e2e = max(best_e2e, sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t))
            for i, p in enumerate(prompts):  # steady-state decode: 16 steps after the prefill step
                core.add_request(f"d{bs}-{rep}-{i}", p, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
            core.step()
            core.step()
            t = time.perf_counter()
            for _ in range(16):
                core.step()
            best_dec = max(best_dec, bs * 16 / (time.perf_counter() - t))
            while core.has_unfinished():
                core.step()
        print(f"threads {torch.get_num_threads()} batch {bs:2d}: decode {best_dec:6.1f} tok/s | "
              f"end-to-end generate {best_e2e:6.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
