"""Batch-1 CPU decode under each one-row matmul path: `python -m benchmarks.cpu_choices [--dtype bfloat16]`.

Builds one engine on the seeded `--preset` model and decodes `--tokens` greedy tokens for one
request, alternating the one-row bf16/fp16 path of `engine.model.small_batch_linear` between
"mv" (torch.mv; the choice on AMX CPUs) and "linear" (F.linear; the choice without AMX) round by
round, so both see the same machine load. Prints tok/s per path (median of `--rounds`), their
ratio, what `kernels.tuning` picks on this CPU, and checks both paths give the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.bench.presets import build_preset_model, quiet_transformers
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kernels import tuning


def _decode_tok_s(llm: LLM, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    out = llm.generate([prompt], params)
    elapsed = time.perf_counter() - t0
    return tokens / elapsed, list(out[0].outputs[0].token_ids)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 (the one-row path only differs there)")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds per path, alternated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    quiet_transformers()
    torch.set_num_threads(args.threads)
    llm = LLM(str(build_preset_model(args.preset)), device="cpu", dtype=args.dtype, max_num_seqs=1,
              max_model_len=args.tokens + 32)
    prompt = [1] + [(7 * j) % 200 + 3 for j in range(15)]
    chosen = tuning.half_one_row_mv
    paths = {"mv": lambda: True, "linear": lambda: False}
    rates: dict[str, list[float]] = {k: [] for k in paths}
    outputs: dict[str, list[int]] = {}
    try:
        for _ in range(args.rounds):
            for name, pick in paths.items():
                tuning.half_one_row_mv = pick
                rate, toks = _decode_tok_s(llm, prompt, args.tokens)
                rates[name].append(rate)
                outputs[name] = toks
    finally:
        tuning.half_one_row_mv = chosen
    med = {k: statistics.median(v) for k, v in rates.items()}
    picked = "mv" if chosen() else "linear"
    result = {"preset": args.preset, "dtype": args.dtype, "threads": args.threads, "amx": tuning.cpu_has_amx(),
              "picked": picked, "tok_s": med, "rounds": rates, "linear_over_mv": med["linear"] / med["mv"],
              "same_tokens": outputs["mv"] == outputs["linear"]}  # fmt: skip
    print(f"preset={args.preset} dtype={args.dtype} threads={args.threads} amx={result['amx']} picks={picked}")
    for k, v in med.items():
        print(f"  {k:6s} {v:6.1f} tok/s  (rounds: {', '.join(f'{r:.1f}' for r in rates[k])})")
    print(f"  linear/mv = {result['linear_over_mv']:.2f}; same tokens: {result['same_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
