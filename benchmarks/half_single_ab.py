"""One-adapter bf16 decode with its LoRA ops as bf16 GEMMs vs fp32 GEMMs on upcast copies:
`python -m benchmarks.half_single_ab` (the `small` preset, bf16, one engine; `kernels.tuning.
CPU_HALF_SINGLE_FP32_MAX_ROWS` toggled between alternating rounds; decode tok/s of CPU time; the tokens of
both paths are compared)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.bench.presets import build_adapters, build_preset_model, quiet_transformers
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kernels import tuning


def _round(engine, batch: int, tokens: int, tag: str) -> tuple[float, list[list[int]]]:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", [1] + [(7 * i + j) % 200 + 3 for j in range(15)], params, "lora-000")
    engine.step()  # prefill (+ first token)
    outs: dict[str, list[int]] = {}
    t = time.process_time()
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
    return batch * tokens / (time.process_time() - t), [outs[k] for k in sorted(outs)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    quiet_transformers()
    torch.set_num_threads(args.threads)
    model_dir = build_preset_model("small")
    path = str(build_adapters(model_dir, rank=args.rank, count=1)[0])
    engine = LLM(str(model_dir), dtype="bfloat16", max_num_seqs=max(args.batch, 1), max_model_len=128, enable_lora=True,
                 max_loras=1, max_lora_rank=args.rank, loras=(("lora-000", path),), cpu_threads=args.threads).engine
    paths = {"bf16": 0, "fp32": 1 << 20}  # CPU_HALF_SINGLE_FP32_MAX_ROWS per path
    saved = tuning.CPU_HALF_SINGLE_FP32_MAX_ROWS
    rates: dict[str, list[float]] = {k: [] for k in paths}
    tokens: dict[str, list[list[int]]] = {}
    try:
        _round(engine, args.batch, 4, "warm")
        for r in range(args.rounds):
            for name in paths if r % 2 == 0 else list(paths)[::-1]:
                tuning.CPU_HALF_SINGLE_FP32_MAX_ROWS = paths[name]
                rate, toks = _round(engine, args.batch, args.tokens, f"{r}-{name}")
                rates[name].append(rate)
                tokens[name] = toks
    finally:
        tuning.CPU_HALF_SINGLE_FP32_MAX_ROWS = saved
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"bf16 small, one adapter r{args.rank}, batch {args.batch}, {args.threads} thread(s): decode tok/s of CPU time")
    for k, v in rates.items():
        print(f"  LoRA GEMMs in {k}: {med[k]:.1f} (rounds: {', '.join(f'{x:.1f}' for x in v)})")
    print(f"  fp32/bf16 = {med['fp32'] / med['bf16']:.2f}; same tokens: {tokens['bf16'] == tokens['fp32']}")
    return med


if __name__ == "__main__":
    main()
