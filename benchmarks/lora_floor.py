"""LoRA cost of a decode step against its memory-traffic floor: `python -m benchmarks.lora_floor`.

For each case (distinct adapters N, rank, dtype) one engine serves, in alternating rounds, a
homogeneous batch (every request on lora-000) and a mixed-N batch (round-robin over N adapters), and
times each decode step and the LoRA ops inside it (`lora_shrink_slices` + `lora_expand_slices`, wrapped
with a timer) in CPU time of the engine thread, so other processes on a shared machine inflate the
numbers less than wall time would. Per case it prints:

    ratio      homogeneous step / mixed step (= mixed tok/s / homogeneous tok/s), median over rounds
    lora ms    LoRA op time per mixed step (and per homogeneous step)
    MB         adapter bytes the mixed step must read: each distinct adapter's A and B rows up to
               its rank, once per linear (what the ops would read at best)
    floor ms   MB / the single-thread streaming read bandwidth measured here (the faster of a torch sum
               and a matrix-vector product over a 512 MB tensor, interleaved with the rounds)
    best       the implied best ratio (base + homog floor) / (base + floor), base = homog step - its LoRA
               ops: with both steps' LoRA ops at their floors, each step adds its adapters' bytes at
               streaming bandwidth to the same base step (one thread: the LoRA reads do not overlap
               the base matmuls)

The measurements and the command are in benchmarks/README.md ("LoRA cost vs its traffic floor").
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

import engine.model as model_mod
from engine.bench.presets import build_adapters, build_preset_model, quiet_transformers
from engine.llm import LLM
from engine.sampling_params import SamplingParams

CASES = ("16:16:float32", "32:16:float32", "64:16:float32", "16:64:float32", "16:16:bfloat16")


@dataclass
class _Timer:
    """Accumulates CPU time spent in the wrapped LoRA ops and (when `count`) the adapter bytes they need."""

    lora_s: float = 0.0
    count: bool = False
    bytes: int = 0
    calls: int = 0
    originals: dict[str, Callable] = field(default_factory=dict)

    def install(self) -> None:
        for name, kind in (("lora_shrink_slices", "shrink"), ("lora_expand_slices", "expand")):
            fn = getattr(model_mod, name)
            self.originals[name] = fn
            setattr(model_mod, name, self._wrap(fn, kind))

    def uninstall(self) -> None:
        for name, fn in self.originals.items():
            setattr(model_mod, name, fn)

    def _wrap(self, fn: Callable, kind: str) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.thread_time()
            out = fn(*args, **kwargs)
            self.lora_s += time.thread_time() - t0
            if self.count:
                self.bytes += _bytes_read(kind, args, kwargs)
                self.calls += 1
            return out
        return timed


def _bytes_read(kind: str, args: tuple, kwargs: dict) -> int:
    """Adapter bytes one shrink/expand-slices call needs: each distinct slot's rows up to its rank, once."""
    meta, ranks = kwargs["meta"], kwargs.get("slot_ranks")
    slices = args[1]
    slots = [meta.single_slot] if meta.single_slot is not None else list(meta.distinct_slots)
    total = 0
    for i, sl in enumerate(slices):
        w = sl[0]  # shrink: A [S, R, K]; expand: B [S, N, R]
        R = w.shape[1] if kind == "shrink" else w.shape[2]
        width = w.shape[2] if kind == "shrink" else w.shape[1]
        rk = ranks[i] if ranks is not None and ranks[i] is not None else None
        for s in slots:
            r = R if rk is None else max(1, min(R, rk[s]))
            total += r * width * w.element_size()
    return total


def stream_gbps(mb: int = 512, reps: int = 3) -> float:
    """Single-thread read bandwidth (GB/s): the best of `reps` passes of two streaming reads over an `mb` MB fp32
    tensor, a torch sum and a matrix-vector product (MKL's mv streams faster than the sum on some CPUs: 13.4 vs
    9.9 GB/s on the AMX Xeon), so the floor is the tighter of the two."""
    t = torch.ones(mb * (1 << 20) // 4)
    w, v = t.view(-1, 4096), torch.ones(4096)
    best = float("inf")
    for _ in range(reps):
        for read in (t.sum, lambda: torch.mv(w, v)):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best / 1e9


def _round(llm: LLM, names: Sequence[str], batch: int, steps: int, timer: _Timer, tag: str) -> tuple[list[float], list[float], int]:
    """Queue `batch` requests over `names`, prefill, warm up, then time `steps` decode steps (CPU ms)."""
    engine = llm.engine
    warm = 2
    params = SamplingParams(max_tokens=1 + warm + steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", [1] + [(7 * i + j) % 200 + 3 for j in range(15)], params, names[i % len(names)])
    engine.step()  # prefill (one chunk: max_num_batched_tokens fits the batch)
    timer.count, timer.bytes, timer.calls = True, 0, 0
    engine.step()  # warm-up decode, also counts the bytes
    timer.count = False
    nbytes = timer.bytes
    for _ in range(warm - 1):
        engine.step()
    step_ms, lora_ms = [], []
    for _ in range(steps):
        timer.lora_s = 0.0
        t0 = time.thread_time()
        engine.step()
        step_ms.append((time.thread_time() - t0) * 1e3)
        lora_ms.append(timer.lora_s * 1e3)
    while engine.has_unfinished():
        engine.step()
    return step_ms, lora_ms, nbytes


def case_engine(n: int, rank: int, dtype: str, *, preset: str, batch: int) -> tuple[LLM, list[str]]:
    """One engine on the seeded `preset` with `n` PEFT adapters of `rank` registered (lora-000...), and their names."""
    model_dir = build_preset_model(preset)
    paths = {f"lora-{i:03d}": str(p) for i, p in enumerate(build_adapters(model_dir, rank=rank, count=max(n, 1)))}
    llm = LLM(str(model_dir), device="cpu", dtype=dtype, max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * 17),
              max_model_len=64, enable_lora=True, max_loras=max(n, 1), max_lora_rank=rank, loras=tuple(paths.items()))
    return llm, list(paths)


def case_parser(doc: str, cases: Sequence[str], rounds_help: str) -> argparse.ArgumentParser:
    """The command line both case benchmarks take (this one and benchmarks.native_ab)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(cases), help="N:rank:dtype per case (default: %(default)s)")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="decode steps timed per round")
    p.add_argument("--rounds", type=int, default=4, help=rounds_help)
    p.add_argument("--threads", type=int, default=1)
    return p


def run_case(n: int, rank: int, dtype: str, *, preset: str, batch: int, steps: int, rounds: int) -> dict:
    llm, names = case_engine(n, rank, dtype, preset=preset, batch=batch)
    timer = _Timer()
    timer.install()
    try:
        homog, mixed, bw = [], [], []
        for k in range(rounds):
            bw.append(stream_gbps())
            for kind, use in (("homog", names[:1]), ("mixed", names)) if k % 2 == 0 else (("mixed", names), ("homog", names[:1])):
                s, lo, b = _round(llm, use, batch, steps, timer, f"{kind}{k}")
                (homog if kind == "homog" else mixed).append((statistics.median(s), statistics.median(lo), b))
    finally:
        timer.uninstall()
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    ratios = [h[0] / m[0] for h, m in zip(homog, mixed)]  # paired rounds
    gbps = statistics.median(bw)
    h_step, h_lora, m_step, m_lora = med(homog, 0), med(homog, 1), med(mixed, 0), med(mixed, 1)
    m_bytes = mixed[0][2]
    floor_ms, h_floor = m_bytes / gbps / 1e6, homog[0][2] / gbps / 1e6
    base = h_step - h_lora
    return {"case": f"{dtype} N={n} r{rank}", "ratio": statistics.median(ratios), "ratios": ratios,
            "homog_ms": h_step, "homog_lora_ms": h_lora, "mixed_ms": m_step, "lora_ms": m_lora,
            "mb": m_bytes / 1e6, "homog_mb": homog[0][2] / 1e6, "gbps": gbps, "floor_ms": floor_ms,
            "homog_floor_ms": h_floor, "best": (base + h_floor) / (base + floor_ms), "lora_over_floor": m_lora / floor_ms}


def main(argv: list[str] | None = None) -> list[dict]:
    args = case_parser(__doc__, CASES, "homogeneous/mixed round pairs, alternating order").parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    rows = []
    print(f"preset={args.preset} batch={args.batch} threads={args.threads}; CPU ms of the engine thread, medians")
    print(f"{'case':<22} {'ratio':>6} {'homog ms':>9} {'mixed ms':>9} {'lora ms':>8} {'(homog)':>8} "
          f"{'MB':>7} {'GB/s':>5} {'floor ms':>8} {'lora/floor':>10} {'best':>5}")
    for spec in args.cases:
        n, rank, dtype = spec.split(":")
        r = run_case(int(n), int(rank), dtype, preset=args.preset, batch=args.batch, steps=args.steps, rounds=args.rounds)
        rows.append(r)
        print(f"{r['case']:<22} {r['ratio']:6.3f} {r['homog_ms']:9.1f} {r['mixed_ms']:9.1f} {r['lora_ms']:8.1f} "
              f"{r['homog_lora_ms']:8.1f} {r['mb']:7.1f} {r['gbps']:5.1f} {r['floor_ms']:8.1f} {r['lora_over_floor']:10.2f} "
              f"{r['best']:5.3f}   (ratio per round: {', '.join(f'{x:.3f}' for x in r['ratios'])})", flush=True)
    return rows


if __name__ == "__main__":
    main()
