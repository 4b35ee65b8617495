"""Public LoRA ops: checks before launch, then dispatch to a backend.

Backends:
    "triton": the SGMV/BGMV Triton kernels; compiled on CUDA tensors, run by the Triton
              interpreter on CPU tensors (slow; for tests). Needs the triton package.
    "torch":  the reference (`shrink_reference` / `expand_reference`): simple, fp32, obviously right.
    "cpu":    the fast torch path (`kernels.cpu`); works on any device.
    "auto":   "triton" for CUDA tensors when triton is importable, else "cpu".
Strategy (Triton only): "auto" takes `meta.strategy` (see `kernels.meta`), or force
"segment" (SGMV) / "gather" (BGMV).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import _triton
from kernels.dtypes import TORCH_DTYPES
from kernels.cpu import expand_cpu, expand_cpu_slices, shrink_cpu, shrink_cpu_slices
from kernels.expand import expand_reference, expand_triton
from kernels.meta import ComposedRows, KernelError, LoraBatchMeta
from kernels.shrink import shrink_reference, shrink_triton

BACKENDS = ("auto", "triton", "torch", "cpu")
STRATEGIES = ("auto", "segment", "gather")
FLOAT_DTYPES = tuple(TORCH_DTYPES.values())


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_lora_slots: torch.Tensor, scales: torch.Tensor, *,
                meta: LoraBatchMeta | None = None, backend: str = "auto", strategy: str = "auto",
                check: bool = True, slot_ranks: Sequence[int] | None = None) -> torch.Tensor:
    """Per-row LoRA down-projection, each row with its own adapter slot.

    Semantics:
        x: [T, K], lora_a: [S, R, K], token_lora_slots: [T] int in [-1, S), scales: [S] or [S, R] float
        h[t] = scales[s] * (x[t] @ lora_a[s].T)   with s = token_lora_slots[t];   h[t] = 0 when s == -1
        returns h: [T, R] in x.dtype (accumulated in fp32)
    `meta` is `LoraBatchMeta.from_token_lora_slots(token_lora_slots)`, built once per step and shared by all
    layers (built here when omitted). Raises KernelError (an MloraError) on bad shapes/dtypes/devices.
    `check=False` (the engine's hot path, whose stacks and per-step meta are built consistent) skips
    the argument checks, ~20 us of Python per call, 168 calls per step on a 12-layer model; `meta`
    is then required. `slot_ranks` (host ints, one per slot, <= R): slot s's rows past slot_ranks[s] are
    zero (a lower-rank adapter in wider slots); the "cpu" backend then skips them (same result).
    """
    if check or meta is None:
        _check_shrink(x, lora_a, token_lora_slots, scales)
        _check_ranks(slot_ranks, *lora_a.shape[:2])
        meta = _meta_for(meta, token_lora_slots, lora_a.shape[0])
    be = _resolve(backend, x.device)
    if x.shape[0] == 0:
        return torch.empty(0, lora_a.shape[1], dtype=x.dtype, device=x.device)
    if be == "torch":
        return shrink_reference(x, lora_a, token_lora_slots, scales)
    if be == "cpu":
        return shrink_cpu(x, lora_a, scales, meta, slot_ranks)
    return shrink_triton(x, lora_a, scales, meta, _strategy(strategy, meta))


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, token_lora_slots: torch.Tensor, out: torch.Tensor, *,
                meta: LoraBatchMeta | None = None, out_offset: int = 0, backend: str = "auto",
                strategy: str = "auto", check: bool = True, slot_ranks: Sequence[int] | None = None) -> torch.Tensor:
    """Per-row LoRA up-projection added in place into a column slice of `out`.

    Semantics:
        h: [T, R], lora_b: [S, N, R] (on the torch/cpu backends also a rank-major view, i.e.
        `Bt.transpose(1, 2)` of a contiguous [S, R, N]), token_lora_slots: [T] int in [-1, S), out: [T, >= out_offset + N]
        out[t, out_offset:out_offset+N] += h[t] @ lora_b[s].T   with s = token_lora_slots[t]; nothing when s == -1
        returns out (the same tensor); accumulated in fp32, rounded once to out.dtype
    `out_offset` serves fused projections: expand q, k, v (or gate, up) into their column ranges
    of one output. h, lora_b and out share one dtype. `check=False`, `slot_ranks` (B's columns past
    slot_ranks[s] are zero): as in `lora_shrink`.
    """
    be = _resolve(backend, h.device)
    if check or meta is None:
        _check_expand(h, lora_b, token_lora_slots, out, out_offset, rank_major_ok=be != "triton")
        _check_ranks(slot_ranks, lora_b.shape[0], lora_b.shape[2])
        meta = _meta_for(meta, token_lora_slots, lora_b.shape[0])
    if h.shape[0] == 0:
        return out
    if be == "torch":
        return expand_reference(h, lora_b, token_lora_slots, out, out_offset)
    if be == "cpu":
        return expand_cpu(h, lora_b, out, meta, out_offset, slot_ranks)
    return expand_triton(h, lora_b, out, meta, out_offset, _strategy(strategy, meta))


def lora_shrink_slices(x: torch.Tensor, slices: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       token_lora_slots: torch.Tensor, *, meta: LoraBatchMeta | None = None, backend: str = "auto",
                       strategy: str = "auto", check: bool = True,
                       slot_ranks: Sequence[Sequence[int] | None] | None = None) -> list[torch.Tensor]:
    """The shrinks of a fused projection's slices (q/k/v, gate/up) in one call, as vLLM's `nslices`.

    Semantics:
        slices: [(lora_a_i [S, R_i, K], scales_i [S] or [S, R_i])] for i < nslices
        returns [h_i] with h_i = lora_shrink(x, lora_a_i, token_lora_slots, scales_i)   # h_i: [T, R_i]
    The step layout (`meta`), backend and strategy are resolved once for all slices; each backend
    then runs one shrink per slice (the slices' stacks are separate tensors: one fused launch would
    need them laid out as one [S, sum R_i, K] stack or a pointer table). `slot_ranks[i]`: slice i's
    per-slot true ranks (see `lora_shrink`), or None.
    """
    if check or meta is None:
        for a, sc in slices:
            _check_shrink(x, a, token_lora_slots, sc)
        meta = _meta_for(meta, token_lora_slots, min((a.shape[0] for a, _ in slices), default=0))
    ranks = slot_ranks if slot_ranks is not None else [None] * len(slices)
    if x.shape[0] and _resolve(backend, x.device) == "cpu":  # resolved once for all slices (the hot path)
        return shrink_cpu_slices(x, slices, meta, ranks)
    return [lora_shrink(x, a, token_lora_slots, sc, meta=meta, backend=backend, strategy=strategy, check=False,
                        slot_ranks=r) for (a, sc), r in zip(slices, ranks)]


def lora_expand_slices(hs: Sequence[torch.Tensor], slices: Sequence[tuple[torch.Tensor, int]],
                       token_lora_slots: torch.Tensor, out: torch.Tensor, *, meta: LoraBatchMeta | None = None,
                       backend: str = "auto", strategy: str = "auto", check: bool = True,
                       slot_ranks: Sequence[Sequence[int] | None] | None = None) -> torch.Tensor:
    """The expands of a fused projection's slices into their column ranges of one output, in one call.

    Semantics:
        hs: [h_i [T, R_i]], slices: [(lora_b_i [S, N_i, R_i], out_offset_i)] for i < nslices
        for every i: out[:, off_i:off_i + N_i] += h_i @ lora_b_i[s].T per row (as `lora_expand`)
        returns out (the same tensor)
    """
    if len(hs) != len(slices):
        raise KernelError(f"{len(hs)} shrink outputs for {len(slices)} expand slices")
    if check or meta is None:
        rank_major_ok = _resolve(backend, out.device) != "triton"
        for h, (b, off) in zip(hs, slices):
            _check_expand(h, b, token_lora_slots, out, off, rank_major_ok=rank_major_ok)
        meta = _meta_for(meta, token_lora_slots, min((b.shape[0] for b, _ in slices), default=0))
    ranks = slot_ranks if slot_ranks is not None else [None] * len(slices)
    if out.shape[0] and _resolve(backend, out.device) == "cpu":  # resolved once for all slices (the hot path)
        return expand_cpu_slices(hs, slices, out, meta, ranks)
    for h, (b, off), r in zip(hs, slices, ranks):
        lora_expand(h, b, token_lora_slots, out, meta=meta, out_offset=off, backend=backend, strategy=strategy,
                    check=False, slot_ranks=r)
    return out


def lora_compose(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                 out: torch.Tensor, composed: ComposedRows, *, out_offset: int = 0, backend: str = "auto",
                 strategy: str = "auto", check: bool = True) -> torch.Tensor:
    """Weighted sum of several adapters' deltas per row, added in place into a column slice of `out`.

    Semantics:
        x: [T, K], lora_a: [S, R, K], lora_b: [S, N, R] (as `lora_expand`), scales: [S] or [S, R],
        composed: virtual rows v = 0..V-1, each with a real row rows[v], a slot s_v >= 0 and a weight w_v
        out[rows[v], off:off+N] += w_v * scales[s_v] * (x[rows[v]] @ lora_a[s_v].T) @ lora_b[s_v].T   for every v
        i.e. a composed row t gets  sum_i w_i * s_i * B_i A_i x[t];  rows not in `rows` are untouched
        returns out (the same tensor)
    The virtual rows run through `lora_shrink` / `lora_expand` unchanged (one slot each, any backend,
    `composed.meta` as their per-step layout) into a zeroed [V, N] buffer, summed back with one index_add:
    steps without composed rows never come here, so single-adapter batches keep their kernels and cost.
    """
    m = composed.meta
    if check:
        _check_common("out", out, 2)
        if composed.rows.numel() and int(composed.rows.max()) >= x.shape[0]:
            raise KernelError(f"composed rows must be < {x.shape[0]} (the rows of x)")
    if m.num_tokens == 0:
        return out
    N = lora_b.shape[1]
    xv = x.index_select(0, composed.rows)  # [V, K]
    h = lora_shrink(xv, lora_a, m.token_lora_slots, scales, meta=m, backend=backend, strategy=strategy, check=check)
    h.mul_(composed.weights.to(h.dtype).unsqueeze(1))  # [V, R]: w_v * scales[s_v] * A x
    buf = torch.zeros(m.num_tokens, N, dtype=out.dtype, device=out.device)  # [V, N]
    lora_expand(h, lora_b, m.token_lora_slots, buf, meta=m, backend=backend, strategy=strategy, check=check)
    out[:, out_offset:out_offset + N].index_add_(0, composed.rows, buf)
    return out


# ----------------------------------------------------------------------------- dispatch
def _resolve(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise KernelError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton.available() else "cpu"
    if backend == "triton":
        _triton.load()  # clear KernelError when triton is missing
    return backend


def _strategy(strategy: str, meta: LoraBatchMeta) -> str:
    if strategy not in STRATEGIES:
        raise KernelError(f"unknown kernel strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return meta.strategy if strategy == "auto" else strategy


def _meta_for(meta: LoraBatchMeta | None, token_lora_slots: torch.Tensor, num_slots: int) -> LoraBatchMeta:
    if meta is None:
        meta = LoraBatchMeta.from_token_lora_slots(token_lora_slots)
    elif meta.num_tokens != token_lora_slots.shape[0]:
        raise KernelError(f"meta was built for {meta.num_tokens} rows but token_lora_slots has {token_lora_slots.shape[0]}")
    if meta.max_slot >= num_slots:
        raise KernelError(f"token_lora_slots must be in [-1, {num_slots}) for a stack of {num_slots} slots, "
                          f"got slot {meta.max_slot}")
    return meta


# ----------------------------------------------------------------------------- checks
def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _check_common(name: str, t: torch.Tensor, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise KernelError(f"{name} must be {dim}-D, got shape {_shape(t)}")
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise KernelError(f"{name} must have unit stride in its last dimension (call .contiguous()), "
                          f"got strides {tuple(t.stride())}")


def _check_slots(token_lora_slots: torch.Tensor, T: int) -> None:
    _check_common("token_lora_slots", token_lora_slots, 1)
    if token_lora_slots.dtype.is_floating_point or token_lora_slots.dtype.is_complex or token_lora_slots.dtype == torch.bool:
        raise KernelError(f"token_lora_slots must be an integer tensor, got {token_lora_slots.dtype}")
    if token_lora_slots.shape[0] != T:
        raise KernelError(f"token_lora_slots has {token_lora_slots.shape[0]} rows but the input has {T}")


def _check_ranks(slot_ranks: Sequence[int] | None, S: int, R: int) -> None:
    if slot_ranks is None:
        return
    if len(slot_ranks) != S or any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= R for r in slot_ranks):
        raise KernelError(f"slot_ranks must be {S} ints in [0, {R}] (one per slot), got {tuple(slot_ranks)}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise KernelError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_devices(**tensors: torch.Tensor) -> None:
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        raise KernelError(f"all tensors must be on one device, got {where}")


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_lora_slots: torch.Tensor, scales: torch.Tensor) -> None:
    _check_common("x", x, 2)
    _check_common("lora_a", lora_a, 3)
    _check_slots(token_lora_slots, x.shape[0])
    if not isinstance(scales, torch.Tensor) or scales.dim() not in (1, 2):
        raise KernelError("scales must be a tensor of shape [S] or [S, R]")
    _check_devices(x=x, lora_a=lora_a, token_lora_slots=token_lora_slots, scales=scales)
    _check_float("x", x)
    _check_float("scales", scales)
    if lora_a.dtype != x.dtype:
        raise KernelError(f"lora_a dtype {lora_a.dtype} must match x dtype {x.dtype}")
    S, R, K = lora_a.shape
    if x.shape[1] != K:
        raise KernelError(f"x has {x.shape[1]} features but lora_a {_shape(lora_a)} expects [S, R, {x.shape[1]}]")
    if scales.shape[0] != S or (scales.dim() == 2 and scales.shape[1] != R):
        raise KernelError(f"scales shape {_shape(scales)} must be [{S}] or [{S}, {R}] for lora_a {_shape(lora_a)}")


def _check_expand(h: torch.Tensor, lora_b: torch.Tensor, token_lora_slots: torch.Tensor, out: torch.Tensor,
                  out_offset: int, *, rank_major_ok: bool = False) -> None:
    _check_common("h", h, 2)
    # the torch backends also take a rank-major B (lora_b.transpose(1, 2) contiguous, as the
    # engine's CPU slots store it); the Triton kernels need [S, N, R] with unit last stride
    rank_major = rank_major_ok and lora_b.dim() == 3 and lora_b.stride(1) == 1 and lora_b.transpose(1, 2).is_contiguous()
    _check_common("lora_b", lora_b if not rank_major else lora_b.transpose(1, 2), 3)
    _check_common("out", out, 2)
    _check_slots(token_lora_slots, h.shape[0])
    _check_devices(h=h, lora_b=lora_b, token_lora_slots=token_lora_slots, out=out)
    _check_float("h", h)
    if lora_b.dtype != h.dtype or out.dtype != h.dtype:
        raise KernelError(f"h ({h.dtype}), lora_b ({lora_b.dtype}) and out ({out.dtype}) must share one dtype")
    S, N, R = lora_b.shape
    if h.shape[1] != R:
        raise KernelError(f"h has rank {h.shape[1]} but lora_b {_shape(lora_b)} expects [S, N, {h.shape[1]}]")
    if out.shape[0] != h.shape[0]:
        raise KernelError(f"out has {out.shape[0]} rows but h has {h.shape[0]}")
    if not isinstance(out_offset, int) or out_offset < 0 or out_offset + N > out.shape[1]:
        raise KernelError(f"out_offset {out_offset} + lora_b out features {N} must fit out's {out.shape[1]} columns")
