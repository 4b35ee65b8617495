"""Test grid for the LoRA ops: cases, inputs, tolerances and a naive float64 oracle.

Axes (DESIGN.md's op test grid, after punica and vLLM's lora/ops): dtype x rank x feature size
(real + odd) x T x adapter popularity x -1 rows,
plus zero-padded smaller-rank adapters, per-rank scales, and sliced/strided outputs. The default
grid is a deterministic pairwise (all-pairs) covering selection of these axes, so the interpreter
stays fast; `full_grid()` is the cartesian product (marked slow).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RANKS = (1, 8, 16, 64, 128)
SIZES = (4096, 1024, 14336, 3, 257)
TOKENS = (1, 3, 7, 133)
POPULARITY = ("distinct", "uniform", "zipf", "identical", "grouped")
# per output dtype: (atol, rtol) against the fp32 reference rounded to that dtype
TOL = {"fp32": (2e-5, 2e-5), "fp16": (4e-3, 4e-3), "bf16": (3e-2, 3e-2)}
MAX_STACK_ELEMS = 1 << 24  # keep S * R * size within 64 MB of fp32
# default grid: T * R * size bounded, so the interpreter's per-row (BGMV) weight reads stay quick;
# the pairs (T=133, size=14336), (rank=128, size=14336), (T=133, rank=128) are still all covered
MAX_DEFAULT_WORK = 1 << 25


@dataclass(frozen=True)
class Case:
    dtype: str
    rank: int
    size: int  # in features for shrink, out features for expand
    T: int
    popularity: str
    no_lora_rows: bool  # some rows use slot -1
    padded: bool  # adapters of smaller ranks zero-padded in the stack
    variant: bool  # shrink: per-rank scales [S, R]; expand: out column offset + strided h

    @property
    def id(self) -> str:
        return (f"{self.dtype}-r{self.rank}-n{self.size}-T{self.T}-{self.popularity}"
                f"{'-neg' if self.no_lora_rows else ''}{'-pad' if self.padded else ''}{'-var' if self.variant else ''}")

    def num_slots(self) -> int:
        return {"distinct": max(self.T, 1), "identical": 3}.get(self.popularity, 5)

    def feasible(self) -> bool:
        return self.num_slots() * self.rank * self.size <= MAX_STACK_ELEMS

    def cheap(self) -> bool:
        return self.feasible() and self.T * self.rank * self.size <= MAX_DEFAULT_WORK


AXES = {
    "dtype": tuple(DTYPES), "rank": RANKS, "size": SIZES, "T": TOKENS, "popularity": POPULARITY,
    "no_lora_rows": (False, True), "padded": (False, True), "variant": (False, True),
}


def _pairs(row: dict) -> set:
    items = sorted(row.items())
    return {(a, b) for a, b in itertools.combinations(items, 2)}


def pairwise_grid(dtypes: tuple[str, ...], seed: int = 3) -> list[Case]:
    """A small deterministic set of feasible cases covering every feasible pair of axis values."""
    axes = dict(AXES, dtype=dtypes)
    rng = random.Random(seed)
    keys = list(axes)
    wanted: set = set()
    for (ka, kb) in itertools.combinations(sorted(keys), 2):
        for va in axes[ka]:
            for vb in axes[kb]:
                wanted.add(((ka, va), (kb, vb)))
    cases: list[Case] = []
    stale = 0
    while wanted and stale < 5:
        best, best_gain = None, 0
        for _ in range(300):
            row = {k: rng.choice(axes[k]) for k in keys}
            if not Case(**row).cheap():
                continue
            gain = len(_pairs(row) & wanted)
            if gain > best_gain:
                best, best_gain = row, gain
        if best is None:
            stale += 1
            continue
        stale = 0
        wanted -= _pairs(best)
        cases.append(Case(**best))
    return cases


def full_grid(dtypes: tuple[str, ...]) -> list[Case]:
    """Cartesian product of the main axes (padded/variant alternate), feasible cases only."""
    out = []
    for i, (dt, r, n, T, pop, neg) in enumerate(itertools.product(
            dtypes, RANKS, SIZES, TOKENS, POPULARITY, (False, True))):
        c = Case(dt, r, n, T, pop, neg, padded=bool(i % 2), variant=bool((i // 2) % 2))
        if c.feasible():
            out.append(c)
    return out


def make_slots(case: Case, gen: torch.Generator) -> torch.Tensor:
    """token_lora_slots [T] int32 following the case's popularity, with ~1/3 rows -1 when asked."""
    T, S = case.T, case.num_slots()
    if case.popularity == "distinct":
        slots = torch.randperm(S, generator=gen)[:T]
    elif case.popularity == "uniform":
        slots = torch.randint(0, S, (T,), generator=gen)
    elif case.popularity == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64) ** 1.2
        slots = torch.multinomial(p, T, replacement=True, generator=gen)
    elif case.popularity == "identical":
        slots = torch.full((T,), 1)
    else:  # grouped: contiguous runs per adapter (prefill layout)
        slots = torch.sort(torch.randint(0, S, (T,), generator=gen)).values
    if case.no_lora_rows:
        neg = torch.rand(T, generator=gen) < 1 / 3
        neg[torch.randint(0, T, (1,), generator=gen)] = True  # at least one
        slots = torch.where(neg, torch.full_like(slots, -1), slots)
    return slots.to(torch.int32)


def _ranks(case: Case, gen: torch.Generator) -> list[int]:
    S, R = case.num_slots(), case.rank
    if not case.padded:
        return [R] * S
    return [int(torch.randint(1, R + 1, (1,), generator=gen)) for _ in range(S)]


def shrink_inputs(case: Case, device: str = "cpu", seed: int = 0) -> dict:
    """x [T, K], lora_a [S, R, K] (zero-padded ranks), token_lora_slots [T], scales [S] or [S, R]."""
    gen = torch.Generator().manual_seed(seed)
    dt, S, R, K, T = DTYPES[case.dtype], case.num_slots(), case.rank, case.size, case.T
    x = torch.randn(T, K, generator=gen)
    a = torch.randn(S, R, K, generator=gen) / K ** 0.5
    for s, r in enumerate(_ranks(case, gen)):
        a[s, r:] = 0
    scales = torch.rand((S, R) if case.variant else (S,), generator=gen) * 2 + 0.25
    slots = make_slots(case, gen)
    return {"x": x.to(device, dt), "lora_a": a.to(device, dt), "token_lora_slots": slots.to(device),
            "scales": scales.to(device)}


def expand_inputs(case: Case, device: str = "cpu", seed: int = 0) -> dict:
    """h [T, R] (a strided column slice when case.variant), lora_b [S, N, R], out [T, N (+ margins)]."""
    gen = torch.Generator().manual_seed(seed)
    dt, S, R, N, T = DTYPES[case.dtype], case.num_slots(), case.rank, case.size, case.T
    if case.variant:  # h is the middle slice of a wider shrink output, out has columns around the slice
        h = torch.randn(T, R + 5, generator=gen)[:, 2:2 + R]
        out, offset = torch.randn(T, N + 11, generator=gen), 7
    else:
        h, out, offset = torch.randn(T, R, generator=gen), torch.randn(T, N, generator=gen), 0
    b = torch.randn(S, N, R, generator=gen) / R ** 0.5
    for s, r in enumerate(_ranks(case, gen)):
        b[s, :, r:] = 0
    slots = make_slots(case, gen)
    return {"h": h.to(device, dt), "lora_b": b.to(device, dt), "token_lora_slots": slots.to(device),
            "out": out.to(device, dt), "out_offset": offset}


def naive_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_lora_slots: torch.Tensor,
                 scales: torch.Tensor) -> torch.Tensor:
    """Per-row float64 loop straight from the semantics: the oracle for the reference itself."""
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float64)
    for t, s in enumerate(token_lora_slots.tolist()):
        if s >= 0:
            h[t] = scales[s].double() * (lora_a[s].double().cpu() @ x[t].double().cpu())
    return h


def naive_expand(h: torch.Tensor, lora_b: torch.Tensor, token_lora_slots: torch.Tensor, out: torch.Tensor,
                 out_offset: int) -> torch.Tensor:
    """Per-row float64 loop: returns the expected out (float64), input out untouched."""
    res = out.double().cpu().clone()
    N = lora_b.shape[1]
    for t, s in enumerate(token_lora_slots.tolist()):
        if s >= 0:
            res[t, out_offset:out_offset + N] += lora_b[s].double().cpu() @ h[t].double().cpu()
    return res


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: str, what: str) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")
