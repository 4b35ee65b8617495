"""torch's matmuls vs kernels.native's loops for the CPU LoRA ops of a decode step: `python -m benchmarks.native_ab`.

For each case (distinct adapters N, rank, dtype) one engine serves, in alternating rounds, a homogeneous
batch (every request on lora-000) and a mixed-N batch, each round once with `MLORA_CPU_NATIVE=0` (torch)
and once with the loops forced on (`=1`), the order alternating round by round, so both see the same
machine state. Times are CPU time of the engine thread (benchmarks.lora_floor's timer). Prints, per case
and mode, the median step ms and LoRA-op ms of the homogeneous and the mixed batch, their ratio
(homogeneous step / mixed step), and the native/torch LoRA-op ratio. Numerics are the tests' business
(tests/kernels/test_native.py and the CPU path grids run on both).
"""

from __future__ import annotations

import os
import statistics

import torch

from benchmarks.lora_floor import _round, _Timer, case_engine, case_parser
from engine.bench.presets import quiet_transformers
from kernels import tuning

CASES = ("16:16:bfloat16", "1:16:bfloat16", "16:16:float32", "32:16:float32", "1:16:float32", "16:64:float32")
MODES = {"torch": "0", "native": "1"}


def run_case(n: int, rank: int, dtype: str, *, preset: str, batch: int, steps: int, rounds: int) -> dict:
    llm, names = case_engine(n, rank, dtype, preset=preset, batch=batch)
    timer = _Timer()
    timer.install()
    got: dict[tuple[str, str], list[tuple[float, float]]] = {(m, k): [] for m in MODES for k in ("homog", "mixed")}
    saved = os.environ.get(tuning.CPU_NATIVE_ENV)
    try:
        for r in range(rounds):
            order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
            for mode in order:
                os.environ[tuning.CPU_NATIVE_ENV] = MODES[mode]
                for kind, use in (("homog", names[:1]), ("mixed", names[:n])):
                    s, lo, _ = _round(llm, use, batch, steps, timer, f"{mode}{kind}{r}")
                    got[(mode, kind)].append((statistics.median(s), statistics.median(lo)))
    finally:
        timer.uninstall()
        if saved is None:
            os.environ.pop(tuning.CPU_NATIVE_ENV, None)
        else:
            os.environ[tuning.CPU_NATIVE_ENV] = saved
    med = lambda mode, kind, i: statistics.median(x[i] for x in got[(mode, kind)])  # noqa: E731
    row = {"case": f"{dtype} N={n} r{rank}"}
    for mode in MODES:
        row[mode] = {"homog_ms": med(mode, "homog", 0), "homog_lora_ms": med(mode, "homog", 1),
                     "mixed_ms": med(mode, "mixed", 0), "mixed_lora_ms": med(mode, "mixed", 1)}
        row[mode]["ratio"] = row[mode]["homog_ms"] / row[mode]["mixed_ms"]
    row["lora_native_over_torch"] = row["native"]["mixed_lora_ms"] / row["torch"]["mixed_lora_ms"]
    row["homog_lora_native_over_torch"] = row["native"]["homog_lora_ms"] / row["torch"]["homog_lora_ms"]
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    args = case_parser(__doc__, CASES, "rounds, each timing both modes in alternating order").parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    print(f"preset={args.preset} batch={args.batch} threads={args.threads}; CPU ms of the engine thread, medians")
    print(f"{'case':<22} {'mode':<7} {'homog ms':>9} {'(lora)':>7} {'mixed ms':>9} {'(lora)':>7} {'ratio':>6}")
    rows = []
    for spec in args.cases:
        n, rank, dtype = spec.split(":")
        r = run_case(int(n), int(rank), dtype, preset=args.preset, batch=args.batch, steps=args.steps, rounds=args.rounds)
        rows.append(r)
        for mode in MODES:
            m = r[mode]
            print(f"{r['case']:<22} {mode:<7} {m['homog_ms']:9.1f} {m['homog_lora_ms']:7.1f} {m['mixed_ms']:9.1f} "
                  f"{m['mixed_lora_ms']:7.1f} {m['ratio']:6.3f}")
        print(f"{'':<22} native/torch LoRA ms: mixed {r['lora_native_over_torch']:.2f}, "
              f"homogeneous {r['homog_lora_native_over_torch']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
