"""The CPU choices of kernels.tuning, measured: `python -m benchmarks.cpu_choices {decode,linear,lora,argmax}`.

`decode`: batch-1 decode tok/s under each one-row bf16/fp16 matmul path. `linear`: per-step ms of a
preset's base linears for each row count and matmul form (F.linear / W @ x.T / mv). `lora`: shrink +
expand us of each CPU LoRA path (kernels.meta) on given segment layouts. `argmax`: us per greedy pick,
`max(dim).indices` against engine.sampler's blocked pass. The tables of
benchmarks/README.md come from these. Every mode times the alternatives interleaved in one run.

Times are CPU time of this process (`time.process_time`; the compute runs on the calling thread with
`--threads 1`), so time slices lost to other jobs on a shared machine do not count; memory-bandwidth
contention still does. Wall time is reported beside it for `decode`.

`decode` builds one engine on the seeded `--preset` model (weights plain) and decodes `--tokens` greedy
tokens for `--batch` requests, alternating round by round (after one warm-up round) the base-linear
path: for one bf16/fp16 row "mv" (torch.mv; the old choice) and "linear" (F.linear), else "plain" (the
small-batch choice of kernels.tuning), and "packed" (a oneDNN-prepacked copy of every weight
`LlamaModel.prepack_cpu_linears` would pack swapped in), so all see the same machine load. Prints
tok/s per path (median of `--rounds`), their ratios, what kernels.tuning picks on this CPU, and checks
every path gives the same tokens. `linear` has a "packed" form too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from engine.bench.presets import build_preset_model, quiet_transformers
from engine.llm import LLM
from engine.model import packed_linear, prepack_weight
from engine.sampling_params import SamplingParams
from kernels import tuning


def _decode_tok_s(llm: LLM, prompt: list[int], tokens: int, batch: int, tag: str) -> tuple[float, float, list[list[int]]]:
    """Decode tokens/s (CPU time, wall) of `batch` requests decoded together: the prefill step (and
    the first tokens) is not timed."""
    engine = llm.engine
    for b in range(batch):
        p = prompt[:1] + [(t + 13 * b) % 200 + 3 for t in prompt[1:]]  # distinct prompts of one length
        engine.add_request(f"{tag}-{b}", p, SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True), None)
    done: dict[str, list[int]] = {}
    engine.step()  # the prefill of every request (prompts fit max_num_batched_tokens) and first tokens
    c0, t0 = time.process_time(), time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return batch * tokens / cpu, batch * tokens / wall, [done[f"{tag}-{b}"] for b in range(batch)]


def _base_linears(model) -> list[tuple[object, str]]:  # type: ignore[no-untyped-def]
    """(owner, attribute) of every weight `LlamaModel.prepack_cpu_linears` packs."""
    owners = [(getattr(layer, n), "weight") for layer in model.layers for n in ("qkv", "o_proj", "gate_up", "down_proj")]
    return owners + ([(model, "lm_head")] if model.lm_head is not None else [])


def decode(args: argparse.Namespace) -> dict:
    """Decode tok/s per base-linear path, alternated round by round on one engine: "mv" / "linear" (one
    bf16/fp16 row as torch.mv or F.linear, plain weights; batch 1 only), "plain" (plain weights, the
    small-batch choice of kernels.tuning; other batches) and "packed" (oneDNN-prepacked weights, what
    `LlamaModel.prepack_cpu_linears` does). The engine is built unpacked; a packed copy of each weight is
    swapped in for the "packed" rounds (so this process holds both; the engine never does)."""
    saved_env = os.environ.get(tuning.PREPACK_ENV)
    os.environ[tuning.PREPACK_ENV] = "0"
    try:
        llm = LLM(str(build_preset_model(args.preset)), device="cpu", dtype=args.dtype, max_num_seqs=args.batch,
                  max_model_len=args.tokens + 32, enable_lora=False)
    finally:
        if saved_env is None:
            os.environ.pop(tuning.PREPACK_ENV, None)
        else:
            os.environ[tuning.PREPACK_ENV] = saved_env
    model = llm.engine.runner.model
    owners = _base_linears(model)
    plain = [getattr(o, a) for o, a in owners]
    dt = plain[0].dtype
    can_pack = tuning.mkldnn_prepack_available(dt)
    packed = [torch.nn.Parameter(prepack_weight(w), requires_grad=False) for w in plain] if can_pack else []
    prompt = [1] + [(7 * j) % 200 + 3 for j in range(15)]
    chosen = tuning.half_one_row_mv
    half = dt in (torch.bfloat16, torch.float16)
    paths = {"mv": (plain, lambda: True), "linear": (plain, lambda: False)} if half and args.batch == 1 \
        else {"plain": (plain, chosen)}
    if can_pack:
        paths["packed"] = (packed, chosen)
    rates: dict[str, list[float]] = {k: [] for k in paths}
    walls: dict[str, list[float]] = {k: [] for k in paths}
    outputs: dict[str, list[list[int]]] = {}
    try:
        for r in range(-1, args.rounds):  # round -1: warm-up (oneDNN builds its kernels on first use), not kept
            for name, (weights, pick) in paths.items():
                tuning.half_one_row_mv = pick
                for (o, a), w in zip(owners, weights):
                    setattr(o, a, w)
                rate, wall_rate, toks = _decode_tok_s(llm, prompt, args.tokens if r >= 0 else 2, args.batch, f"{name}-{r}")
                if r < 0:
                    continue
                rates[name].append(rate)
                walls[name].append(wall_rate)
                outputs[name] = toks
    finally:
        tuning.half_one_row_mv = chosen
        for (o, a), w in zip(owners, plain):
            setattr(o, a, w)
    med = {k: statistics.median(v) for k, v in rates.items()}
    picked = "packed" if tuning.cpu_prepack(dt, plain[0].numel()) else ("mv" if chosen() else "linear") if half and args.batch == 1 else "plain"
    first = next(iter(outputs.values()))
    result = {"preset": args.preset, "dtype": args.dtype, "batch": args.batch, "threads": args.threads,
              "amx": tuning.cpu_has_amx(), "picked": picked, "tok_s": med, "rounds": rates, "wall_rounds": walls,
              "ratios": {f"{a}/{b}": med[a] / med[b] for a in med for b in med if a != b},
              "same_tokens": all(v == first for v in outputs.values())}  # fmt: skip
    print(f"preset={args.preset} dtype={args.dtype} batch={args.batch} threads={args.threads} amx={result['amx']} "
          f"picks={picked}")
    for k, v in med.items():
        print(f"  {k:6s} {v:7.1f} tok/s of CPU time (rounds: {', '.join(f'{r:.1f}' for r in rates[k])}; "
              f"wall: {', '.join(f'{r:.1f}' for r in walls[k])})")
    if "packed" in med:
        print("  " + "; ".join(f"packed/{k} = {med['packed'] / v:.2f}" for k, v in med.items() if k != "packed")
              + f"; same tokens: {result['same_tokens']}")
    else:
        print(f"  same tokens: {result['same_tokens']}")
    return result


def _best_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best * 1e3


def linear(args: argparse.Namespace) -> dict:
    """ms per step of one preset's base linears (all layers, lm_head excluded) per row count and form."""
    from engine.bench.presets import preset_config_dict

    c = preset_config_dict(args.preset)
    H, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    dt = getattr(torch, args.dtype)
    shapes = [(3 * H, H), (H, H), (2 * inter, H), (H, inter)] * layers  # qkv, o, gate_up, down per layer
    ws = [torch.randn(o, i).to(dt) for o, i in shapes]  # distinct weights: streamed from memory, as in a step
    forms = {"linear": lambda x, w: F.linear(x, w), "wxt": lambda x, w: torch.mm(w, x.t()).t().contiguous(),
             "mv": lambda x, w: torch.mv(w, x[0]).unsqueeze(0)}
    packed = {}  # id(w) -> the oneDNN-prepacked copy (engine.model.prepack_cpu_linears packs like this)
    if tuning.mkldnn_prepack_available(dt):
        packed = {id(w): prepack_weight(w) for w in ws}
        forms["packed"] = lambda x, w: packed_linear(x, packed[id(w)], None)
    result: dict = {"preset": args.preset, "dtype": args.dtype, "ms": {}}
    print(f"preset={args.preset} dtype={args.dtype} threads={args.threads}: ms per step of the base linears")
    for T in args.rows:
        xs = {i: torch.randn(T, i).to(dt) for i in {i for _, i in shapes}}
        row = {}
        for name, f in forms.items():
            if name == "mv" and T != 1:
                continue
            row[name] = _best_ms(lambda: [f(xs[w.shape[1]], w) for w in ws], args.rounds)
        result["ms"][T] = row
        print(f"  T={T:4d}  " + "  ".join(f"{k} {v:6.2f}" for k, v in row.items()))
    return result


def _layout(spec: str, seed: int) -> list[int]:
    """"16x8" = 16 adapters of 8 contiguous rows; "16x7-9" = lengths drawn from 7..9."""
    n, _, lens = spec.partition("x")
    lo, _, hi = lens.partition("-")
    g = torch.Generator().manual_seed(seed)
    sizes = [int(torch.randint(int(lo), int(hi or lo) + 1, (1,), generator=g)) for _ in range(int(n))]
    return [s for s, k in enumerate(sizes) for _ in range(k)]


def lora(args: argparse.Namespace) -> dict:
    """us of shrink + expand (hidden -> out, rank R) for each CPU path of kernels.meta on each layout."""
    from dataclasses import replace

    from kernels import LoraBatchMeta, lora_expand, lora_shrink, tuning

    dt = getattr(torch, args.dtype)
    K, N, R = args.hidden, args.out, args.rank
    result: dict = {"dtype": args.dtype, "us": {}}
    print(f"dtype={args.dtype} threads={args.threads} {K} -> {N} rank {R}: us per shrink + expand")
    for spec in args.layouts:
        slots = _layout(spec, 0)
        S, T = max(slots) + 1, len(slots)
        a, b = torch.randn(S, R, K).to(dt), torch.randn(S, R, N).to(dt).transpose(1, 2)  # B rank-major, as in slots
        x, out, sc = torch.randn(T, K).to(dt), torch.zeros(T, N, dtype=dt), torch.ones(S)
        saved = (tuning.CPU_BMM_MIN_SEGMENTS, tuning.CPU_BMM_MAX_PAD_FACTOR)
        tuning.CPU_BMM_MIN_SEGMENTS, tuning.CPU_BMM_MAX_PAD_FACTOR = 1, float("inf")  # build pad_rows for "bmm"
        try:
            meta = LoraBatchMeta.from_token_lora_slots(slots)
        finally:
            tuning.CPU_BMM_MIN_SEGMENTS, tuning.CPU_BMM_MAX_PAD_FACTOR = saved
        chosen = LoraBatchMeta.from_token_lora_slots(slots).path_for(dt)
        row = {}
        for path in ("runs", "segments", "bmm", "dense", "native"):
            m = replace(meta, cpu_path=path, cpu_path_half=path, dense_fallback="segments") if path != "native" else meta
            ts = m.token_lora_slots

            def step(m=m, ts=ts) -> None:  # type: ignore[no-untyped-def]
                h = lora_shrink(x, a, ts, sc, meta=m, check=False)
                lora_expand(h, b, ts, out, meta=m, check=False)

            if path != "dense" or dt != torch.float32:
                os.environ[tuning.CPU_NATIVE_ENV] = "1" if path == "native" else "0"  # kernels.native: forced / off
                try:
                    row[path] = _best_ms(step, args.rounds) * 1e3
                finally:
                    os.environ.pop(tuning.CPU_NATIVE_ENV)
        result["us"][spec] = {"paths": row, "chosen": chosen}
        print(f"  {spec:10s} T={T:4d} " + "  ".join(f"{k} {v:7.0f}" for k, v in row.items()) + f"   (picks {chosen})")
    return result


def argmax(args: argparse.Namespace) -> dict:
    """us per greedy pick over [rows, vocab] fp32 logits: `max(dim).indices` vs the blocked pass of
    engine.sampler.greedy_tokens (tuning.ARGMAX_BLOCK), interleaved; checks both pick the same ids."""
    from engine.sampler import greedy_tokens

    result: dict = {"us": {}}
    print(f"threads={args.threads} block={tuning.ARGMAX_BLOCK}: us per greedy pick (max.indices vs blocked)")
    for vocab in args.vocab:
        for rows in args.rows:
            logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows))
            assert torch.equal(greedy_tokens(logits), logits.max(dim=-1).indices)
            plain = _best_ms(lambda: logits.max(dim=-1).indices, args.rounds) * 1e3
            blocked = _best_ms(lambda: greedy_tokens(logits), args.rounds) * 1e3
            result["us"][f"{rows}x{vocab}"] = {"max": plain, "blocked": blocked}
            print(f"  {rows:4d} x {vocab:6d}  max.indices {plain:8.0f}  blocked {blocked:8.0f}  ({plain / blocked:.2f}x)")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("decode", "linear", "lora", "argmax"))
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16")
    p.add_argument("--tokens", type=int, default=32, help="decode: tokens per round")
    p.add_argument("--batch", type=int, default=1, help="decode: requests decoded together")
    p.add_argument("--rounds", type=int, default=5, help="decode: rounds per path, alternated; else repeats")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 48, 64, 100], help="linear, argmax: T")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="argmax: vocabulary sizes")
    p.add_argument("--layouts", nargs="+", default=["16x8", "16x7-9", "16x140-180", "8x12", "4x40", "10x30-38",
                                                   "8x60-70", "3x100-130", "16x1-3"], help="lora: NxROWS[-MAX]")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--out", type=int, default=2304)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    quiet_transformers()
    torch.set_num_threads(args.threads)
    result = {"decode": decode, "linear": linear, "lora": lora, "argmax": argmax}[args.mode](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
