"""Run the LoRA kernel micro-benchmark: `python -m benchmarks.kernels [--device cpu] [--json out.json]`.

CPU: the fast torch path vs a per-adapter Python loop and per-row weight gather.
CUDA: Triton kernels' achieved GB/s against the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json

from kernels.bench import format_kernel_bench, run_kernel_bench


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--hidden", type=int, nargs="+", default=[768, 4096], help="in = out features")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64], help="decode rows T")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16], help="distinct adapters N")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: fp32 CPU, bf16 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rotate-mb", type=int, default=96, help="weight stacks rotated per call (defeats caches)")
    p.add_argument("--bandwidth-mb", type=int, default=256, help="buffer for the read-bandwidth probe")
    p.add_argument("--json", default=None, help="also write the result dict here")
    args = p.parse_args(argv)
    result = run_kernel_bench(device=args.device, hidden_sizes=args.hidden, rank=args.rank, tokens=args.tokens,
                              adapters=args.adapters, dtype=args.dtype, repeats=args.repeats, threads=args.threads,
                              rotate_bytes=args.rotate_mb << 20, bandwidth_bytes=args.bandwidth_mb << 20)
    print(format_kernel_bench(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
