"""mlora vs the real vLLM (CPU build) on the same model, adapters, prompts and thread count.

    python benchmarks/vs_vllm.py --vllm-python /work/vllm-venv/bin/python \\
        --model /work/benchmodel --adapters /work/benchmodel/adapters [--dtype float32 bfloat16] [--json out.json]

vLLM is never imported here nor in mlora's process: each side runs in its own subprocess (vLLM in the
interpreter given by `--vllm-python`, where `vllm` must be importable; mlora in this interpreter),
started once per phase and driven over stdin, so runs interleave (mlora, vllm, mlora, vllm, ...; the
side that goes first alternates per repeat) without paying either side's startup again. Startup
(imports + engine construction) is reported separately and excluded from tokens/s.

Phases, per dtype:
- base: no LoRA. vLLM with LoRA disabled (it then compiles its model, as it does by default);
  mlora with enable_lora=False.
- lora: homogeneous (every request on a00), mixed-4, mixed-16 (request i on adapter i % N).
  vLLM with enable_lora=True (eager on CPU), both with 16 adapter slots of rank 16.
Every workload: `--requests` prompts (token ids, seeded, 8-24 tokens, the same for both sides),
`--tokens` greedy output tokens each with ignore_eos, all submitted at once (one batch), prefix
caching off on both sides (repeats reuse the prompts: a cache would turn them into hits).
fp32 outputs must be identical token for token (the script exits 1 if not); bf16 agreement is reported.

Threads: both sides use `--threads` compute threads pinned to the CPUs `--cpus` (vLLM through
VLLM_CPU_OMP_THREADS_BIND, mlora through cpu_threads + sched_setaffinity). vLLM's front end and
EngineCore (scheduling, detokenizing) are other processes and run on any CPU unless `--pin-all`
puts them on `--cpus` as well (mlora does all of it in its one process). Preloads: vLLM gets its
documented LD_PRELOAD (tcmalloc + the venv's libiomp5) where the files exist, mlora none, unless
`--vllm-preload` / `--mlora-preload` say otherwise; the report states what was used.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TAG = "@@VSVLLM@@ "
REPO = Path(__file__).resolve().parent.parent
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
LORA_WORKLOADS = ("homogeneous", "mixed-4", "mixed-16")


# -- worker side (runs in either interpreter; imports its engine only here) --------------------------


def _worker(spec: dict) -> None:
    t0 = time.perf_counter()
    here = Path(__file__).resolve().parent  # benchmarks/ holds a kernels.py that would shadow the kernels package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    side, lora = spec["side"], spec["enable_lora"]
    common = dict(dtype=spec["dtype"], max_model_len=256, max_num_seqs=spec["max_num_seqs"],
                  max_num_batched_tokens=2048, enable_prefix_caching=False)  # fmt: skip
    if lora:
        common.update(enable_lora=True, max_loras=16, max_lora_rank=16, max_cpu_loras=16)
    if side == "vllm":
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        t1 = time.perf_counter()
        llm = LLM(model=spec["model"], **common)
    else:
        if spec["cpus"]:
            os.sched_setaffinity(0, spec["cpus"])
        from engine.llm import LLM
        from engine.lora_request import LoRARequest
        from engine.sampling_params import SamplingParams

        t1 = time.perf_counter()
        if not lora:
            common["enable_lora"] = False
        llm = LLM(spec["model"], cpu_threads=spec["threads"], **common)
    reqs = [LoRARequest(f"a{i:02d}", i + 1, p) for i, p in enumerate(spec["adapters"])]
    t2 = time.perf_counter()
    _reply({"import_s": t1 - t0, "init_s": t2 - t1, "version": _version(side), "mode": _mode(llm, side)})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        prompts = [{"prompt_token_ids": p} for p in cmd["prompts"]]
        sp = SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=True)
        lr = [None if a is None else reqs[a] for a in cmd["adapters"]]
        s = time.perf_counter()
        outs = llm.generate(prompts, sp, lora_request=lr, use_tqdm=False)
        secs = time.perf_counter() - s
        _reply({"seconds": secs, "tokens": [list(o.outputs[0].token_ids) for o in outs]})


def _version(side: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (("vllm-cpu", "vllm") if side == "vllm" else ("mlora",)):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return side


def _mode(llm, side: str) -> str:  # type: ignore[no-untyped-def]
    """How the engine runs its model: vLLM's compilation mode and backend; mlora runs eager."""
    if side != "vllm":
        return "eager"
    try:
        cc = llm.llm_engine.vllm_config.compilation_config
        return f"{getattr(cc.mode, 'name', cc.mode)}/{cc.backend or '-'}"
    except Exception:  # noqa: BLE001 - a vLLM version without these attributes
        return "?"


def _reply(obj: dict) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- driver side ------------------------------------------------------------------------------------


class Worker:
    """One engine in a subprocess: `run(...)` sends a workload and waits for its timing and tokens."""

    def __init__(self, name: str, python: list[str], spec: dict, env: dict, log) -> None:  # type: ignore[no-untyped-def]
        self.name = name
        t = time.perf_counter()
        self.proc = subprocess.Popen([*python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True, cwd=env.get("PYTHONPATH", str(REPO)))  # fmt: skip
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(log,), daemon=True).start()
        self.hello = self._get()
        self.hello["startup_s"] = time.perf_counter() - t  # wall time to ready, process start included

    def _pump(self, log) -> None:  # type: ignore[no-untyped-def]
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.replies.put(json.loads(line[len(TAG) :]))
            else:
                log.write(f"[{self.name}] {line}")
                log.flush()
        self.replies.put(None)

    def _get(self) -> dict:
        r = self.replies.get()
        if r is None:
            raise RuntimeError(f"worker {self.name} exited (rc={self.proc.wait()}); see the log")
        return r

    def run(self, prompts: list[list[int]], adapters: list[int | None], max_tokens: int) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "adapters": adapters, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._get()

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except Exception:  # noqa: BLE001 - a stuck worker is killed
            self.proc.kill()
            self.proc.wait()


def make_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    """n prompts of token ids: BOS (1) then 7-23 tokens drawn from [3, vocab)."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(7, 23))] for _ in range(n)]


def assignments(workload: str, n: int) -> list[int | None]:
    """Adapter index per request (None = base model)."""
    if workload == "base":
        return [None] * n
    if workload == "homogeneous":
        return [0] * n
    k = int(workload.split("-")[1])
    return [i % k for i in range(n)]


def _spread(xs: list[float]) -> float:
    """(max - min) / median, the relative spread of the repeats."""
    return (max(xs) - min(xs)) / statistics.median(xs) if xs else 0.0


def _envs(args: argparse.Namespace) -> tuple[dict, dict, str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONPATH")}
    vllm_pre = args.vllm_preload
    if vllm_pre is None:
        iomp = Path(args.vllm_python).parent.parent / "lib" / "libiomp5.so"  # VENV/bin/python -> VENV/lib (not resolved)
        vllm_pre = ":".join(str(p) for p in (Path(TCMALLOC), iomp) if p.exists())
    cpus = args.cpus or ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[: args.threads])
    venv = dict(base, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=cpus, OMP_NUM_THREADS=str(args.threads),
                VLLM_LOGGING_LEVEL=base.get("VLLM_LOGGING_LEVEL", "WARNING"), TOKENIZERS_PARALLELISM="false")  # fmt: skip
    menv = dict(base, PYTHONPATH=str(Path(args.mlora_path).resolve()), OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    if vllm_pre:
        venv["LD_PRELOAD"] = vllm_pre
    if args.mlora_preload:
        menv["LD_PRELOAD"] = args.mlora_preload
    return menv, venv, vllm_pre, args.mlora_preload or ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", required=True, help="an interpreter where `import vllm` works (its own venv)")
    p.add_argument("--mlora-python", default=sys.executable, help="interpreter for mlora (default: this one)")
    p.add_argument("--mlora-path", default=str(REPO), help="the mlora checkout to run (default: this one; another one for before/after)")
    p.add_argument("--model", default="/work/benchmodel", help="make_bench_model.py --model-out (holds float32/, bfloat16/)")
    p.add_argument("--adapters", default="/work/benchmodel/adapters", help="make_bench_model.py --adapters-out (a00..a15)")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--workloads", nargs="+", default=["base", *LORA_WORKLOADS],
                   choices=["base", *LORA_WORKLOADS])  # fmt: skip
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request (greedy, ignore_eos)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side and workload (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpus", default=None, help="CPU list both sides are pinned to (default: the first --threads CPUs)")
    p.add_argument("--pin-all", action="store_true",
                   help="run vLLM's whole process tree (front end, EngineCore, worker) on --cpus too, as mlora's one "
                        "process is; by default only its compute threads are bound there (its documented setup)")  # fmt: skip
    p.add_argument("--vllm-preload", default=None, help="LD_PRELOAD for vLLM (default: tcmalloc + libiomp5 where present; '' = none)")
    p.add_argument("--mlora-preload", default="", help="LD_PRELOAD for mlora (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default="vs_vllm.log", help="the workers' own output goes here")
    p.add_argument("--json", default=None, help="write every run's numbers here")
    args = p.parse_args(argv)

    menv, venv, vllm_pre, mlora_pre = _envs(args)
    cpus = [int(c) for c in venv["VLLM_CPU_OMP_THREADS_BIND"].replace("-", ",").split(",") if c.strip()]
    adapters = [str(Path(args.adapters) / f"a{i:02d}") for i in range(16)]
    prompts = make_prompts(args.requests, 32000, args.seed)
    phases = [(False, [w for w in args.workloads if w == "base"]), (True, [w for w in args.workloads if w != "base"])]
    result: dict = {"config": {"requests": args.requests, "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads,
                               "cpus": cpus, "pin_all": args.pin_all, "vllm_preload": vllm_pre, "mlora_preload": mlora_pre, "nproc": os.cpu_count()},
                    "startup": {}, "runs": {}}  # fmt: skip
    ok = True
    with open(args.log, "a") as log:
        for dtype in args.dtype:
            for lora, names in phases:
                if not names:
                    continue
                spec = {"model": str(Path(args.model) / dtype), "dtype": dtype, "enable_lora": lora, "adapters": adapters,
                        "threads": args.threads, "cpus": cpus, "max_num_seqs": args.requests}  # fmt: skip
                phase = f"{dtype}/{'lora' if lora else 'base'}"
                print(f"[{phase}] starting workers ...", file=sys.stderr, flush=True)
                workers = {}
                try:
                    workers["mlora"] = Worker(f"mlora {phase}", [args.mlora_python], dict(spec, side="mlora"), menv, log)
                    vpy = ["taskset", "-c", ",".join(map(str, cpus)), args.vllm_python] if args.pin_all else [args.vllm_python]
                    workers["vllm"] = Worker(f"vllm {phase}", vpy, dict(spec, side="vllm"), venv, log)
                    for side, w in workers.items():
                        result["startup"][f"{phase}/{side}"] = w.hello
                    for name in names:
                        adapt = assignments(name, args.requests)
                        key = f"{dtype}/{name}"
                        runs: dict = {"mlora": [], "vllm": []}
                        toks = {s: w.run(prompts, adapt, args.tokens)["tokens"] for s, w in workers.items()}  # warm-up
                        for rep in range(args.repeats):
                            order = ["mlora", "vllm"] if rep % 2 == 0 else ["vllm", "mlora"]
                            for side in order:
                                r = workers[side].run(prompts, adapt, args.tokens)
                                n = sum(len(t) for t in r["tokens"])
                                runs[side].append(n / r["seconds"])
                                if r["tokens"] != toks[side]:
                                    print(f"[{key}] {side}: greedy output changed between runs", file=sys.stderr)
                        same = sum(a == b for a, b in zip(toks["mlora"], toks["vllm"]))
                        entry = {"tokens_per_s": runs, "identical": same, "of": args.requests,
                                 "ratio_per_repeat": [m / v for m, v in zip(runs["mlora"], runs["vllm"])]}  # fmt: skip
                        result["runs"][key] = entry
                        _print_row(key, entry)
                        if dtype == "float32" and same != args.requests:
                            ok = False
                finally:
                    for w in workers.values():
                        w.close()
    _print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if not ok:
        print("FAIL: fp32 greedy outputs differ between mlora and vLLM", file=sys.stderr)
    return 0 if ok else 1


def _print_row(key: str, e: dict) -> None:
    m, v = e["tokens_per_s"]["mlora"], e["tokens_per_s"]["vllm"]
    print(f"[{key}] mlora {statistics.median(m):.1f} tok/s, vllm {statistics.median(v):.1f} tok/s, "
          f"ratio {statistics.median(e['ratio_per_repeat']):.2f}, identical {e['identical']}/{e['of']}",
          file=sys.stderr, flush=True)  # fmt: skip


def _print_table(result: dict) -> None:
    c = result["config"]
    print(f"\n{c['requests']} requests x {c['tokens']} tokens, greedy, {c['threads']} thread(s) on CPUs {c['cpus']}, "
          f"{c['repeats']} interleaved repeats{' (vLLM all processes pinned too)' if c['pin_all'] else ''}; preload vLLM: {c['vllm_preload'] or 'none'}; mlora: {c['mlora_preload'] or 'none'}")  # fmt: skip
    print(f"{'workload':22} {'mlora tok/s':>12} {'spread':>7} {'vLLM tok/s':>11} {'spread':>7} {'mlora/vLLM':>11} {'range':>12} {'identical':>9}")
    for key, e in result["runs"].items():
        m, v, r = e["tokens_per_s"]["mlora"], e["tokens_per_s"]["vllm"], e["ratio_per_repeat"]
        print(f"{key:22} {statistics.median(m):12.1f} {_spread(m):7.0%} {statistics.median(v):11.1f} {_spread(v):7.0%} "
              f"{statistics.median(r):11.2f} {min(r):5.2f}-{max(r):<6.2f} {e['identical']:>5}/{e['of']}")  # fmt: skip
    print("startup (imports + engine construction, s; excluded from tok/s):")
    for key, h in result["startup"].items():
        print(f"  {key:22} {h['startup_s']:6.1f}  (imports {h['import_s']:.1f}, engine {h['init_s']:.1f})  {h['version']}, {h['mode']}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
