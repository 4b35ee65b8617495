"""`mlora bench --workload shared-prefix`: multi-tenant chat traffic with prefix caching on and off.

Each tenant has its own adapter and its own system prompt (`system_tokens` tokens); its requests
are that system prompt plus a short user turn (`user_tokens` tokens, distinct per request), and
the tenants' requests are interleaved. The same requests run, all submitted at once, on a fresh
engine with prefix caching off and on (greedy, EOS ignored, so both produce the same number of
tokens); the report has median/p99 TTFT, output tokens/s, the prefix-cache hit rate and whether
the two runs produced identical tokens. Requests are token ids (seeded), so prompt lengths are
exact for any tokenizer. The requests and the numbers are pure Python; `run_prefix` needs the engine.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from engine.bench.config import check_positive_ints
from engine.bench.stats import RequestTiming, WorkloadResult, summarize
from engine.errors import UsageError

MAX_NUM_BATCHED_TOKENS = 2048  # the engine's default token budget per step (prefills are chunked to it)


@dataclass(frozen=True)
class PrefixConfig:
    """One shared-prefix bench run (`preset` or `model`, as the standard bench)."""

    preset: str | None = "small"
    model: str | None = None
    rank: int = 16
    tenants: int = 8
    system_tokens: int = 512
    user_tokens: int = 16
    num_requests: int = 64
    max_tokens: int = 32
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    repeat: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.model is None):
            raise UsageError("give exactly one of --preset and --model")
        check_positive_ints(self, ("rank", "tenants", "system_tokens", "user_tokens", "num_requests", "max_tokens", "repeat"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PrefixRequest:
    tenant: int
    adapter: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


def shared_prefix_requests(cfg: PrefixConfig, vocab_size: int) -> list[PrefixRequest]:
    """Request i belongs to tenant i % tenants: its system prompt + a user turn of its own (seeded)."""
    rng = random.Random(cfg.seed)
    lo, hi = min(16, vocab_size - 1), vocab_size - 1  # skip the special ids at the start of most vocabularies
    draw = lambda n: tuple(rng.randint(lo, hi) for _ in range(n))  # noqa: E731
    systems = [draw(cfg.system_tokens) for _ in range(cfg.tenants)]
    return [PrefixRequest(i % cfg.tenants, f"lora-{i % cfg.tenants:03d}", systems[i % cfg.tenants] + draw(cfg.user_tokens),
                          cfg.max_tokens) for i in range(cfg.num_requests)]  # fmt: skip


def hit_rate(queries: int, hits: int) -> float | None:
    """Prefix-cache hit rate in tokens (vLLM's definition: hits / queries); None before any query."""
    return hits / queries if queries else None


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def compare(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios: TTFT off/on (> 1 = caching helps) and tokens/s on/off."""
    return {
        "ttft_p50_speedup": ratio(off["result"]["ttft_s"]["p50"], on["result"]["ttft_s"]["p50"]),
        "tokens_per_s_ratio": ratio(on["result"]["output_tokens_per_s"], off["result"]["output_tokens_per_s"]),
    }


def run_prefix(cfg: PrefixConfig, *, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the requests with prefix caching off and on (interleaved rounds with `repeat`, each mode
    keeps its fastest round by tokens/s); return the report dict."""
    from engine.bench.presets import build_adapters, build_preset_model, quiet_transformers
    from engine.bench.runner import machine_info, resolve_device_dtype
    from engine.loader import load_hf_config, resolve_model_path

    quiet_transformers()
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    step = on_step or (lambda name: None)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    step("building the model and adapters")
    model_dir = build_preset_model(cfg.preset) if cfg.preset is not None else resolve_model_path(cfg.model)
    hf = load_hf_config(model_dir)
    adapters = {f"lora-{i:03d}": str(p) for i, p in enumerate(build_adapters(model_dir, rank=cfg.rank, count=cfg.tenants))}
    reqs = shared_prefix_requests(cfg, int(hf.vocab_size))
    kw = dict(model=str(model_dir), dtype=dtype, device=device, seed=cfg.seed, max_num_seqs=cfg.num_requests,
              max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, max_model_len=cfg.system_tokens + cfg.user_tokens + cfg.max_tokens + 8,
              enable_lora=True, max_lora_rank=cfg.rank, max_loras=cfg.tenants, loras=tuple(adapters.items()))  # fmt: skip
    runs: dict[str, list[tuple[WorkloadResult, list[list[int]], float | None]]] = {"off": [], "on": []}
    for r in range(cfg.repeat):
        for mode in ("off", "on"):
            step(f"prefix caching {mode}" + (f" (round {r + 1}/{cfg.repeat})" if cfg.repeat > 1 else ""))
            runs[mode].append(_run_once(kw, reqs, caching=mode == "on"))
    report: dict[str, Any] = {"config": cfg.to_json(), "machine": machine_info(device, dtype),
                              "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS}  # fmt: skip
    for mode, results in runs.items():
        best = max(results, key=lambda x: x[0].output_tokens_per_s)
        report[mode] = {"result": best[0].to_json(), "hit_rate": best[2]}
    report["ratios"] = compare(report["off"], report["on"])
    tokens = {mode: results[0][1] for mode, results in runs.items()}
    report["outputs_identical"] = tokens["off"] == tokens["on"]
    return report


def _run_once(kw: dict[str, Any], reqs: list[PrefixRequest], *, caching: bool) -> tuple[WorkloadResult, list[list[int]], float | None]:
    """One fresh engine: warm every adapter (prompts that share nothing with the timed ones), then time."""
    from engine import LLM, SamplingParams

    llm = LLM(enable_prefix_caching=caching, **kw)
    names = sorted({r.adapter for r in reqs})
    llm.generate([[7 + i] * 3 for i in range(len(names))], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                 adapters=names)  # fmt: skip
    stats0 = llm.engine.stats()
    gc.collect()
    t0 = time.monotonic()
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs]
    outs = llm.generate([list(r.prompt_token_ids) for r in reqs], params, adapters=[r.adapter for r in reqs])
    t1 = time.monotonic()
    stats1 = llm.engine.stats()
    timings = []
    for out in outs:
        m = out.metrics
        timings.append(RequestTiming(arrival=m.arrival_time, finished=m.finished_time or t1, num_tokens=len(out.token_ids),
                                     first_token=m.first_token_time, last_token=m.last_token_time))  # fmt: skip
    name = "shared-prefix " + ("cached" if caching else "uncached")
    result = summarize(name, "shared-prefix", "mlora", len(names), timings, start=t0, end=t1)
    rate = hit_rate(stats1.prefix_cache_queries - stats0.prefix_cache_queries, stats1.prefix_cache_hits - stats0.prefix_cache_hits)
    tokens = [list(o.token_ids) for o in outs]
    del llm
    gc.collect()
    return result, tokens, rate


def render_prefix(report: dict[str, Any], console: Any) -> None:
    """The on/off table and the two headline ratios."""
    from rich.table import Table

    c = report["config"]
    table = Table(title=f"shared prefix: {c['tenants']} tenants x {c['system_tokens']}-token system prompt, "
                        f"{c['num_requests']} requests x ({c['user_tokens']} user + {c['max_tokens']} output tokens)")  # fmt: skip
    for col in ("prefix caching", "TTFT p50 (s)", "TTFT p99 (s)", "output tok/s", "duration (s)", "hit rate"):
        table.add_column(col, justify="right")
    fmt = lambda x, spec=".3f": "-" if x is None else format(x, spec)  # noqa: E731
    for mode in ("off", "on"):
        r, rate = report[mode]["result"], report[mode]["hit_rate"]
        table.add_row(mode, fmt(r["ttft_s"]["p50"]), fmt(r["ttft_s"]["p99"]), fmt(r["output_tokens_per_s"], ".1f"),
                      fmt(r["duration_s"], ".2f"), "-" if rate is None else f"{rate:.1%}")  # fmt: skip
    console.print(table)
    ratios = report["ratios"]
    console.print(f"TTFT p50 off/on: {fmt(ratios['ttft_p50_speedup'], '.2f')}x   tokens/s on/off: "
                  f"{fmt(ratios['tokens_per_s_ratio'], '.2f')}x   outputs identical: "
                  f"{'yes' if report['outputs_identical'] else 'NO'}", highlight=False)  # fmt: skip
