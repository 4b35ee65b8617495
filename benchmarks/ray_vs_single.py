"""The cost of the Ray layer: `mlora serve` (one process) vs `mlora serve --ray --replicas N` on one machine.

    python -m benchmarks.ray_vs_single --requests 200 --concurrency 16 --max-tokens 32

Each server is the real CLI in a subprocess over the built-in demo model, run one after the
other (never both at once). Workload: `--requests` completions kept `--concurrency` in flight by
an aiohttp client, adapters round-robin over the base model, upper, reverse and rot13, held-out
demo prompts (3-20 characters), greedy, `--max-tokens` new tokens each with EOS ignored (so every
request does the same work). After a warm-up of 2 requests per model, reports requests/s (wall
clock of the whole run) and p50/p90 end-to-end latency, and checks every answer has max_tokens
tokens. A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

MODELS = ["mlora-demo", "upper", "reverse", "rot13"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ray: bool, replicas: int) -> tuple[subprocess.Popen[str], str]:
    """`mlora serve` (or `--ray`) in a subprocess; returns it and its URL once it prints the ready line."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlora_cli.main", "serve", "--device", "cpu", "--port", str(port)]
    if ray:
        cmd += ["--ray", "--replicas", str(replicas)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:  # type: ignore[union-attr]
        seen.append(line)
        m = re.search(r"mlora serving .* at (http://\S+) ", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError("server did not start:\n" + "".join(seen))


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run_load(url: str, n: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    import aiohttp

    from engine.demo.tasks import heldout_strings

    prompts = heldout_strings(64, seed=3)
    jobs = [(MODELS[i % len(MODELS)], prompts[i % len(prompts)]) for i in range(n)]
    latencies: list[float] = []
    replicas: dict[str, int] = {}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def one(model: str, prompt: str) -> float:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            t = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json=body) as r:
                out = await r.json()
                if r.status != 200 or out["usage"]["completion_tokens"] != max_tokens:
                    raise RuntimeError(f"bad answer {r.status}: {out}")
                rid = r.headers.get("x-mlora-replica", "-")
                replicas[rid] = replicas.get(rid, 0) + 1
            return time.perf_counter() - t

        for model in MODELS * 2:  # warm-up: adapters registered, first-step costs paid
            await one(model, prompts[0])
        replicas.clear()
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)

        async def worker() -> None:
            while not queue.empty():
                latencies.append(await one(*queue.get_nowait()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=10)
    return {"requests": n, "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 2),
            "p50_ms": round(statistics.median(latencies) * 1000, 1), "p90_ms": round(q[8] * 1000, 1),
            "by_replica": replicas}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--only", choices=["single", "ray"], default=None, help="run one of the two")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    results = {}
    for name in ("single", "ray"):
        if args.only not in (None, name):
            continue
        proc, url = start_server(ray=name == "ray", replicas=args.replicas)
        try:
            results[name] = asyncio.run(run_load(url, args.requests, args.concurrency, args.max_tokens))
        finally:
            stop_server(proc)
        label = "mlora serve" if name == "single" else f"mlora serve --ray --replicas {args.replicas}"
        r = results[name]
        print(f"{label:34s} {r['requests_per_s']:7.2f} req/s   p50 {r['p50_ms']:7.1f} ms   p90 {r['p90_ms']:7.1f} ms"
              f"   ({r['requests']} requests in {r['wall_s']} s; by replica {r['by_replica']})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
