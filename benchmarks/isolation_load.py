"""Tenant isolation under load: hostile and disconnecting clients among well-formed ones (issue 15).

    python -m benchmarks.isolation_load                       # 2,000 requests, 64 concurrent
    python -m benchmarks.isolation_load --requests 200        # the CI size (tests/server/test_isolation_load.py)

Starts `mlora serve` (the built-in demo model and its adapters upper, rot13, reverse) on a free port,
records every well-formed request's output alone (one at a time), then sends `--requests` requests,
`--concurrency` at a time, mixed over the base model and the adapters, completions and chat, streamed
and not, greedy and seeded-sampled: `--hostile` of them are hostile (overflowing and non-finite
numbers, lone surrogates, client chat templates, huge fan-out, oversized prompts and bodies, too many
stop strings, a body that never finishes) and `--disconnects` close a stream mid-way. It then checks:

- every well-formed request's output equals its solo run;
- no response is a 5xx (hostile ones get a 4xx; a 429 from a full queue would be allowed, none is expected);
- the engine returns to idle: /metrics shows KV-cache usage 0 and no running or waiting requests;
- the server's RSS grew by less than `--max-rss-growth-mb` (after a warm-up) over the run;
- the server stops cleanly (exit 0) on SIGINT.

Prints a summary and exits 1 if any check fails. Linux only (RSS from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

MODELS = ["mlora-demo", "upper", "rot13", "reverse"]
WORDS = ["hello", "world", "tenant", "isolation", "adapter", "stream", "batch", "kv", "cache", "quiet", "loud"]


@dataclass(frozen=True)
class Spec:
    """One well-formed request; its expected output is its solo run."""

    route: str  # "completions" or "chat/completions"
    body: str  # JSON, without "stream"
    stream: bool


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(msg)
        else:
            self.failures[-1] = f"... and more (last: {msg})"


# -- the workload ------------------------------------------------------------------------------------


def well_formed_pool(rng: random.Random, size: int) -> list[Spec]:
    pool = []
    for i in range(size):
        model = MODELS[i % len(MODELS)]
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(4, 24), "temperature": 0}
        if i % 5 == 3:  # seeded sampling is reproducible alone and in a batch
            body.update(temperature=0.8, top_p=0.9, seed=1000 + i)
        if i % 3 == 0:
            body["messages"] = [{"role": "user", "content": text}]
            route = "chat/completions"
            if i % 7 == 5:
                body.update(logprobs=True, top_logprobs=2)
        else:
            if i % 7 == 5:
                body.update(logprobs=2)
            body["prompt"] = [text, text[::-1]] if i % 11 == 4 else text
            if i % 13 == 6:
                body["n"] = 3
            route = "completions"
        if i % 9 == 2:
            body["stop"] = ["o"]
        pool.append(Spec(route, json.dumps(body), stream=i % 2 == 1))
    return pool


BIG = "1" + "0" * 400
HOSTILE: list[tuple[str, str, str]] = [  # (name, route, raw body)
    ("huge temperature", "completions", '{"prompt": "hi", "temperature": %s}' % BIG),
    ("huge top_p", "completions", '{"prompt": "hi", "top_p": %s}' % BIG),
    ("inf temperature", "completions", '{"prompt": "hi", "temperature": 1e999}'),
    ("NaN top_p", "completions", '{"prompt": "hi", "top_p": NaN}'),
    ("huge max_tokens", "completions", '{"prompt": "hi", "max_tokens": %s}' % BIG),
    ("lone surrogate prompt", "completions", '{"prompt": "hi \\ud800 there"}'),
    ("lone surrogate chat", "chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("client template (kwargs)", "chat/completions",
     json.dumps({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"chat_template":
                 "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"}})),
    ("client template (top level)", "chat/completions",
     json.dumps({"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 'x' * 20000000 }}"})),
    ("fan-out", "completions", json.dumps({"prompt": ["hello"] * 2000, "n": 16})),
    ("oversized prompt", "completions", json.dumps({"prompt": "x" * 3_000_000})),
    ("oversized body", "completions", json.dumps({"prompt": "y" * 6_000_000})),
    ("too many stops", "completions", json.dumps({"prompt": "hi", "stop": [str(i) for i in range(1000)]})),
    ("token id out of range", "completions", json.dumps({"prompt": [1, 10**12]})),
    ("unknown model", "completions", json.dumps({"prompt": "hi", "model": "no-such-adapter"})),
    ("not an object", "chat/completions", "[1, 2, 3]"),
    ("slow body", "completions", ""),  # sent by hand: headers, then a body that never finishes
]


# -- the server --------------------------------------------------------------------------------------


def start_server(extra: list[str], log: Any) -> tuple[subprocess.Popen[str], str]:
    """`mlora serve` on a free port; its log (stderr: one access-log line per request) goes to `log`, a file,
    so a full pipe never blocks it; stdout is drained by a thread once the server is ready."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    env.pop("MLORA_API_KEY", None)
    cmd = [sys.executable, "-m", "mlora_cli.main", "serve", "--port", "0", "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith("adapters:"):
            break
    m = re.search(r"(http://127\.0\.0\.1:\d+) ", "".join(lines))
    if not m:
        proc.kill()
        log.seek(0)
        raise SystemExit("the server did not start:\n" + "".join(lines) + log.read())
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
    return proc, m.group(1)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def metrics(s: aiohttp.ClientSession, url: str) -> dict[str, float]:
    text = await (await s.get(f"{url}/metrics")).text()
    out: dict[str, float] = {}
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"):
        vals = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        out[name] = sum(vals)
    return out


# -- requests ----------------------------------------------------------------------------------------


async def run_spec(s: aiohttp.ClientSession, url: str, spec: Spec) -> tuple[int, Any]:
    """(status, outputs): outputs = [(index, text, finish_reason)] sorted, or the error body."""
    body = json.loads(spec.body)
    if spec.stream:
        body["stream"] = True
    async with s.post(f"{url}/v1/{spec.route}", json=body) as r:
        if r.status != 200:
            return r.status, await r.text()
        if not spec.stream:
            data = json.loads(await r.text(), parse_constant=_no_nan)
            key = "text" if spec.route == "completions" else "message"
            return 200, sorted((c["index"], c[key] if key == "text" else c[key]["content"], c["finish_reason"])
                               for c in data["choices"])
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        raw = await r.text()
    if not raw.endswith("data: [DONE]\n\n"):
        return 599, "stream did not end with [DONE]"
    for event in raw.strip().split("\n\n"):
        payload = event.removeprefix("data: ")
        if payload == "[DONE]":
            continue
        data = json.loads(payload, parse_constant=_no_nan)
        if "error" in data:
            return int(data["error"].get("code") or 599), payload
        for c in data["choices"]:
            piece = c.get("text") if spec.route == "completions" else c["delta"].get("content")
            texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
            if c.get("finish_reason"):
                reasons[c["index"]] = c["finish_reason"]
    return 200, sorted((i, texts[i], reasons.get(i)) for i in texts)


def _no_nan(c: str) -> Any:
    raise ValueError(f"invalid JSON constant {c}")


async def run_hostile(s: aiohttp.ClientSession, url: str, name: str, route: str, raw: str) -> int:
    if name == "slow body":
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\":")
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), 120)
        writer.close()
        return int(head.split()[1]) if head else 599
    async with s.post(f"{url}/v1/{route}", data=raw.encode("utf-8", "surrogatepass"),
                      headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        if r.status < 500:
            json.loads(text, parse_constant=_no_nan)  # every error is strict JSON
        return r.status


async def run_disconnect(s: aiohttp.ClientSession, url: str, spec: Spec) -> int:
    body = {**json.loads(spec.body), "stream": True, "max_tokens": 64, "ignore_eos": True}
    r = await s.post(f"{url}/v1/{spec.route}", json=body)
    status = r.status
    if status == 200:
        await r.content.readline()  # the first event, then go away mid-stream
    r.close()  # drops the connection
    return status


# -- main --------------------------------------------------------------------------------------------


async def load(url: str, args: argparse.Namespace, pid: int) -> tuple[Tally, dict[str, Any]]:
    rng = random.Random(args.seed)
    pool = well_formed_pool(rng, args.pool)
    tally = Tally()
    info: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        t0 = time.monotonic()
        solo: dict[Spec, Any] = {}
        for spec in pool:
            status, out = await run_spec(s, url, spec)
            if status != 200:
                raise SystemExit(f"a well-formed request failed alone ({status}): {spec.body} -> {out}")
            solo[spec] = out
        # warm-up: every path once more, concurrently, so the RSS baseline is after lazy allocations
        # (batch-sized buffers, allocator arenas, the access log's first lines)
        await asyncio.gather(*(run_spec(s, url, spec) for spec in pool + pool[: args.concurrency - len(pool)]))
        await asyncio.gather(*(run_hostile(s, url, *h) for h in HOSTILE))
        info["solo_s"] = time.monotonic() - t0
        rss0 = rss_mb(pid)
        kinds = ["hostile"] * round(args.requests * args.hostile) + ["disconnect"] * round(args.requests * args.disconnects)
        kinds += ["ok"] * (args.requests - len(kinds))
        rng.shuffle(kinds)
        jobs = [(k, rng.randrange(len(pool)), rng.randrange(len(HOSTILE))) for k in kinds]
        sem = asyncio.Semaphore(args.concurrency)

        async def one(kind: str, p: int, h: int) -> None:
            async with sem:
                t = time.monotonic()
                try:
                    if kind == "ok":
                        status, out = await run_spec(s, url, pool[p])
                        if status == 200 and out != solo[pool[p]]:
                            tally.fail(f"output differs from its solo run: {pool[p].body} stream={pool[p].stream}: "
                                       f"{out} != {solo[pool[p]]}")
                        elif status not in (200, 429):
                            tally.fail(f"well-formed request got {status}: {pool[p].body}: {str(out)[:200]}")
                        tally.latencies.append(time.monotonic() - t)
                    elif kind == "hostile":
                        name, route, raw = HOSTILE[h]
                        status = await run_hostile(s, url, name, route, raw)
                        kind = f"hostile: {name}"
                        if not 400 <= status < 500:
                            tally.fail(f"hostile request '{name}' got {status}, want a 4xx")
                    else:
                        status = await run_disconnect(s, url, pool[p])
                except Exception as exc:  # noqa: BLE001 - a broken connection or invalid JSON is a failure
                    status = 599
                    tally.fail(f"{kind} request raised {type(exc).__name__}: {exc}"[:300])
                tally.statuses[status] += 1
                tally.kinds[kind] += 1
                if status >= 500:
                    tally.fail(f"{kind} request got {status}")

        t1 = time.monotonic()
        await asyncio.gather(*(one(*j) for j in jobs))
        info["load_s"] = time.monotonic() - t1
        deadline = time.monotonic() + 60
        while True:  # the engine returns to idle: aborted and finished requests freed their KV blocks
            m = await metrics(s, url)
            if all(v == 0 for v in m.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        info["idle_metrics"] = m
        if any(v != 0 for v in m.values()):
            tally.fail(f"the engine did not return to idle: {m}")
        info["rss_before_mb"], info["rss_after_mb"] = rss0, rss_mb(pid)
        if info["rss_after_mb"] - rss0 > args.max_rss_growth_mb:
            tally.fail(f"server RSS grew by {info['rss_after_mb'] - rss0:.1f} MB (limit {args.max_rss_growth_mb} MB)")
    return tally, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--hostile", type=float, default=0.10, help="fraction of hostile requests")
    ap.add_argument("--disconnects", type=float, default=0.10, help="fraction of streams the client drops mid-way")
    ap.add_argument("--pool", type=int, default=40, help="distinct well-formed requests (each run alone first)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `mlora serve` argument (repeatable), e.g. --server-arg=--max-num-seqs=32")
    args = ap.parse_args(argv)
    extra = ["--body-timeout", "2", "--header-timeout", "5", *args.server_arg]
    t0 = time.monotonic()
    log = tempfile.TemporaryFile("w+")
    proc, url = start_server(extra, log)
    try:
        tally, info = asyncio.run(load(url, args, proc.pid))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
    log.seek(0)
    stderr = log.read()
    if rc != 0:
        tally.fail(f"the server exited with {rc} on SIGINT")
    if "Traceback" in stderr:
        tally.fail("the server logged a traceback:\n" + stderr[stderr.index("Traceback"):][:2000])
    lat = sorted(tally.latencies) or [0.0]
    print(f"isolation load: {args.requests} requests, {args.concurrency} concurrent, "
          f"{args.hostile:.0%} hostile, {args.disconnects:.0%} disconnects, {args.pool} distinct well-formed")
    print(f"  solo runs + warm-up {info['solo_s']:.1f}s; load {info['load_s']:.1f}s "
          f"({args.requests / info['load_s']:.1f} req/s); total {time.monotonic() - t0:.1f}s")
    print(f"  well-formed latency p50 {lat[len(lat) // 2]:.2f}s p99 {lat[int(len(lat) * 0.99)]:.2f}s")
    print("  statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses.items())))
    print("  kinds: " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.kinds.items())))
    print(f"  idle after: {info['idle_metrics']}")
    print(f"  server RSS {info['rss_before_mb']:.1f} -> {info['rss_after_mb']:.1f} MB "
          f"(+{info['rss_after_mb'] - info['rss_before_mb']:.1f}, limit {args.max_rss_growth_mb:g})")
    if tally.failures:
        print(f"FAILED ({len(tally.failures)}):")
        for f in tally.failures:
            print("  - " + f)
        return 1
    print("OK: every well-formed output equals its solo run; no 5xx; KV usage back to 0; RSS growth within limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
