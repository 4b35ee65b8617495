"""Per-step batch layout for the LoRA ops, built once per engine step and shared by every layer.

Every LoRA layer of a decoder sees the same `token_lora_slots` in one step, so everything that
depends only on the slots (sort order, segments, distinct slots, index tensors) is computed
here once instead of in each of the ~7 x num_layers op calls. On an accelerator the index
tensors are written into buffers allocated once (`LoraMetaBuffers`, pinned host staging) and
copied to the device with one non-blocking copy per step, as vLLM's `LoRAKernelMeta` does.

Strategy (which kernel layout the Triton backend launches), decided from the layout alone:

- "segment" (SGMV): rows are processed per adapter segment (rows of one slot, gathered through
  `sorted_rows`), so one weight tile serves up to BLOCK_M rows with a tensor-core dot. Used when
  adapters are shared by several rows on average (prefill chunks, decode with popular adapters):
  `num_lora_rows > GATHER_MAX_ROWS_PER_SEGMENT * num_segments`.
- "gather" (BGMV): one program per row reads that row's adapter weights directly. Used when
  rows mostly have distinct adapters (decode with many adapters), where a segment tile would be
  mostly padding and L2 already absorbs the rare repeated weight reads.

The CPU fast path (`kernels.cpu`) uses the same metadata differently (`cpu_path`, chosen here once
per step so each of the ~7 x num_layers op calls only dispatches; the thresholds are in
`kernels.tuning`, the measurements behind them in `benchmarks/README.md`):
- "single": every row has one slot -> one plain matmul.
- "bmm": many adapter segments with few rows each (decode over many adapters), or equal segments
  already in slot order -> one batched matmul over the segments padded to `pad_len` rows
  (`pad_rows` gathers them; a zero-copy view when `pad_identity`), instead of one tiny matmul per
  segment: the per-op overhead is paid once, not G times. `cpu_path_half` is the choice for
  bf16/fp16 activations, where "bmm" wins for longer segments too (`path_for(dtype)` picks).
- "runs": few row runs (rows of an adapter contiguous, e.g. prefill) -> one matmul per run on
  zero-copy row slices.
- "segments": otherwise a sort-gather of the rows, one matmul per segment, one scatter back.
- "dense" (bf16/fp16 only): short segments of unequal length, where "bmm" pads and the loops pay a
  16-bit matmul's overhead per segment -> one matmul against the stack's slots lo..hi (the lowest to
  the highest slot in the batch: a view, no copy) as [(hi-lo+1) * R, K] (shrink; each row keeps its
  own R columns) or [(hi-lo+1) * R, N] (expand; rows scattered into their own R columns of a zeroed
  [T, (hi-lo+1) * R]). (hi-lo+1) times the useful FLOPs, so `kernels.cpu` takes it only while
  (hi-lo+1) * R <= tuning.DENSE_MAX_COLS, else `dense_fallback`.
- "split": a step of prefill chunks followed by decode rows (`split=` the first decode row) is two
  layouts: long prefill runs and many short decode segments. Each part gets its own path
  (`parts`, zero-copy row slices), so the decode rows still take one bmm when a prompt joins the
  batch, instead of the whole step falling back to one matmul per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from engine.errors import MloraError
from kernels import tuning

_HALF = (torch.bfloat16, torch.float16)
CPU_PATHS = ("none", "single", "bmm", "runs", "segments", "split", "dense")


class KernelError(MloraError):
    """Bad input to a LoRA kernel op (shapes, dtypes, devices, slot indices)."""


@dataclass(frozen=True, eq=False)
class LoraBatchMeta:
    """Layout of one step's `token_lora_slots`: what each op needs to launch without recomputing it.

    T = rows, G = segments = distinct slots != -1, T_lora = rows with a slot != -1. Each field's
    comment walks one example, token_lora_slots = [1, -1, 0, 1] (T = 4, G = 2, T_lora = 3):
    """

    token_lora_slots: torch.Tensor  # [T] int32 on device, the slot of each row (-1 = base model): [1, -1, 0, 1]
    num_tokens: int  # T: 4
    num_no_lora: int  # rows with slot -1 (shrink gives 0, expand leaves them alone): 1
    min_slot: int  # host int for the range check against S (no device sync per op): -1
    max_slot: int  # 1
    distinct_slots: tuple[int, ...]  # sorted distinct slots != -1 (G of them): (0, 1)
    sorted_rows: torch.Tensor  # [T_lora] int64, rows stably sorted by slot, -1 rows left out: [2, 0, 3]
    sorted_slots: torch.Tensor  # [T_lora] int64, the slot of each sorted_rows entry: [0, 1, 1]
    seg_starts: torch.Tensor  # [G] int32, segment g is sorted_rows[seg_starts[g]:][:seg_lens[g]]: [0, 1]
    seg_lens: torch.Tensor  # [G] int32: [1, 2]
    seg_slots: torch.Tensor  # [G] int32, the slot of every row of segment g: [0, 1]
    segments: tuple[tuple[int, int, int], ...]  # host (start, end, slot) into sorted_rows: ((0, 1, 0), (1, 3, 1))
    max_seg_len: int  # longest segment (sizes the SGMV grid): 2
    runs: tuple[tuple[int, int, int], ...]  # maximal runs of one slot in row order, -1 included:
    #                                         ((0, 1, 1), (1, 2, -1), (2, 3, 0), (3, 4, 1))
    single_slot: int | None  # the slot when every row has one slot != -1 (plain matmul), else None: None
    strategy: str  # Triton: "gather" while T_lora <= GATHER_MAX_ROWS_PER_SEGMENT * G (3 <= 4), else "segment"
    cpu_path: str = "none"  # one of CPU_PATHS (module docstring): "runs" (3 runs <= CPU_MAX_RUNS_PER_SLOT * G)
    pad_len: int = 0  # L = max_seg_len, rows per segment in the padded "bmm" layout: 2
    # [G * L] int64: entry g * L + i is row i of segment g; shorter segments repeat their first row (same
    # work written back to the same row, so no mask): [2, 2, 0, 3] when "bmm" applies, here empty (G < 3)
    pad_rows: torch.Tensor | None = None
    pad_slots: torch.Tensor | None = None  # [G] int64, each segment's slot (index into the stack): [0, 1]
    slot_base: int | None = None  # lo when the slots are lo..lo+G-1 (stack[lo:lo+G] is a view), else None: 0
    pad_identity: bool = False  # pad_rows == arange(T): grouped, equal segments, no -1 rows: False
    cpu_path_half: str = "none"  # cpu_path for bf16/fp16 activations: "dense"
    dense_fallback: str = "segments"  # the path of a "dense" op whose dense layout does not fit: "runs"
    dense_cols: torch.Tensor | None = None  # [T_lora] int64, sorted_slots - distinct_slots[0]: [0, 1, 1]
    parts: tuple[tuple[int, int, "LoraBatchMeta"], ...] = ()  # "split": (row start, row end, their layout)

    def path_for(self, dtype: torch.dtype) -> str:
        """The CPU path for activations of `dtype` (16-bit types batch longer segments)."""
        return self.cpu_path_half if dtype in _HALF else self.cpu_path

    @property
    def num_lora_rows(self) -> int:
        return self.num_tokens - self.num_no_lora

    @classmethod
    def from_token_lora_slots(
        cls, token_lora_slots: torch.Tensor | Sequence[int], *, device: torch.device | str | None = None,
        split: int | None = None, buffers: LoraMetaBuffers | None = None,
    ) -> LoraBatchMeta:
        """Build the layout from the per-row slots (a tensor or a host list; a list avoids a sync).

        `device` is where the index tensors go (default: the tensor's device, else CPU). `split`:
        rows [0, split) and [split, T) are laid out separately by the CPU path (prefill chunks then
        decode rows; see "split" in the module docstring); the Triton backend ignores it.
        `buffers`: write the device tensors into these preallocated buffers (valid until their next
        fill) instead of allocating them; `LoraMetaBuffers.build` passes itself here.
        """
        host, dev = _host_slots(token_lora_slots, device)
        meta = cls._build(host, dev, buffers)
        T = int(host.numel())
        if split is not None and 0 < split < T and meta.cpu_path not in ("none", "single"):
            whole_bmm = lambda path: path == "bmm" and meta.pad_identity  # noqa: E731  (already zero-copy)
            meta = replace(
                meta,
                parts=((0, split, cls._build(host[:split], dev)), (split, T, cls._build(host[split:], dev))),
                cpu_path=meta.cpu_path if whole_bmm(meta.cpu_path) else "split",
                cpu_path_half=meta.cpu_path_half if whole_bmm(meta.cpu_path_half) else "split",
            )
        return meta

    @classmethod
    def _build(cls, host: torch.Tensor, dev: torch.device, buffers: LoraMetaBuffers | None = None) -> LoraBatchMeta:
        # host: [T] int64 on CPU
        T = int(host.numel())
        if T == 0:
            empty = torch.empty(0, dtype=torch.int32, device=dev)
            none = torch.empty(0, dtype=torch.int64, device=dev)
            return cls(empty, 0, 0, -1, -1, (), none, none, empty, empty, empty, (), 0, (), None, "segment",
                       pad_rows=none, pad_slots=none)
        min_slot, max_slot = int(host.min()), int(host.max())
        if min_slot < -1:
            raise KernelError(f"token_lora_slots must be >= -1 (-1 = no adapter), got {min_slot}")
        runs = _spans(*torch.unique_consecutive(host, return_counts=True))
        sg = _Segments.of(host)
        pad = _padded_layout(sg, T)
        cpu_path, cpu_path_half, dense_fallback = _cpu_paths(sg, runs, pad)
        G, vals = len(sg.segments), sg.seg_vals_l
        seg_pack = torch.tensor([[s for s, _, _ in sg.segments], sg.seg_lens_l, vals], dtype=torch.int32)  # [3, G]
        dense_cols = sg.sorted_slots - (vals[0] if G else 0)
        placed = _place(dev, buffers, int32=(host, seg_pack),
                        int64=(sg.order, sg.sorted_slots, pad[2], sg.seg_vals, dense_cols))
        (token_lora_slots, seg_pack), (sorted_rows, sorted_slots, pad_rows, pad_slots, dense_cols) = placed
        return cls(
            token_lora_slots=token_lora_slots,
            num_tokens=T,
            num_no_lora=sg.num_no_lora,
            min_slot=min_slot,
            max_slot=max_slot,
            distinct_slots=tuple(vals),
            sorted_rows=sorted_rows,
            sorted_slots=sorted_slots,
            seg_starts=seg_pack[0],
            seg_lens=seg_pack[1],
            seg_slots=seg_pack[2],
            segments=sg.segments,
            max_seg_len=max(sg.seg_lens_l, default=0),
            runs=runs,
            single_slot=sg.single,
            strategy="gather" if G and sg.num_lora <= tuning.GATHER_MAX_ROWS_PER_SEGMENT * G else "segment",
            cpu_path=cpu_path,
            pad_len=max(sg.seg_lens_l, default=0),
            pad_rows=pad_rows,
            pad_slots=pad_slots,
            slot_base=vals[0] if G > 0 and vals[-1] - vals[0] == G - 1 else None,  # sorted, distinct: contiguous
            pad_identity=pad[1],
            cpu_path_half=cpu_path_half,
            dense_fallback=dense_fallback,
            dense_cols=dense_cols,
        )


# ----------------------------------------------------------------------------- layout helpers (host side)
def _host_slots(token_lora_slots: torch.Tensor | Sequence[int],
                device: torch.device | str | None) -> tuple[torch.Tensor, torch.device]:
    """Check the per-row slots; return them as a host [T] int64 tensor and the target device."""
    if isinstance(token_lora_slots, torch.Tensor):
        if token_lora_slots.dim() != 1:
            raise KernelError(f"token_lora_slots must be 1-D [T], got shape {tuple(token_lora_slots.shape)}")
        if token_lora_slots.dtype.is_floating_point or token_lora_slots.dtype.is_complex or token_lora_slots.dtype == torch.bool:
            raise KernelError(f"token_lora_slots must be an integer tensor, got {token_lora_slots.dtype}")
        dev = torch.device(device) if device is not None else token_lora_slots.device
        return token_lora_slots.detach().to("cpu", torch.int64), dev
    values = list(token_lora_slots)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise KernelError("token_lora_slots must be a sequence of ints")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return torch.tensor(values, dtype=torch.int64), dev


def _spans(vals: torch.Tensor, lens: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    """(start, end, value) of consecutive runs, from torch.unique_consecutive's values and counts."""
    out, start = [], 0
    for v, n in zip(vals.tolist(), lens.tolist()):
        out.append((start, start + n, v))
        start += n
    return tuple(out)


@dataclass(frozen=True)
class _Segments:
    """The rows with an adapter, stably sorted by slot and cut into one segment per distinct slot."""

    order: torch.Tensor  # [T_lora] int64: row indices in slot order (-1 rows dropped)
    sorted_slots: torch.Tensor  # [T_lora] int64
    seg_vals: torch.Tensor  # [G] int64 distinct slots
    seg_vals_l: list[int]
    seg_lens_l: list[int]
    segments: tuple[tuple[int, int, int], ...]  # (start, end, slot) into order
    num_no_lora: int
    num_lora: int
    single: int | None  # the one slot of every row, else None

    @classmethod
    def of(cls, host: torch.Tensor) -> _Segments:
        sorted_vals, order = torch.sort(host, stable=True)
        num_no_lora = int((sorted_vals < 0).sum())  # -1 rows sort first; drop them
        seg_vals, seg_lens = torch.unique_consecutive(sorted_vals[num_no_lora:], return_counts=True)
        vals, lens = seg_vals.tolist(), seg_lens.tolist()
        segments = _spans(seg_vals, seg_lens)
        single = vals[0] if len(vals) == 1 and num_no_lora == 0 else None
        return cls(order[num_no_lora:], sorted_vals[num_no_lora:], seg_vals, vals, lens, segments,
                   num_no_lora, int(host.numel()) - num_no_lora, single)


def _padded_layout(sg: _Segments, T: int) -> tuple[bool, bool, torch.Tensor]:
    """(bmm_ok, pad_identity, pad_rows on host) of the padded "bmm" layout: [G * L] positions, L = longest segment."""
    G, L = len(sg.segments), max(sg.seg_lens_l, default=0)
    if not (G >= tuning.CPU_BMM_MIN_SEGMENTS and G * L <= tuning.CPU_BMM_MAX_PAD_FACTOR * sg.num_lora):
        return False, False, torch.empty(0, dtype=torch.int64)
    # pos: [G, L] positions into `order`, short segments padded with their first position
    ar = torch.arange(L).unsqueeze(0)  # [1, L]
    lens = torch.tensor(sg.seg_lens_l).unsqueeze(1)  # [G, 1]
    seg_start = torch.tensor([s for s, _, _ in sg.segments]).unsqueeze(1)  # [G, 1]
    pos = seg_start + torch.where(ar < lens, ar, torch.zeros_like(ar))
    pad_host = sg.order[pos.reshape(-1)]  # [G * L]
    identity = G * L == T and bool(torch.equal(pad_host, torch.arange(T)))
    return True, identity, pad_host


def _cpu_paths(sg: _Segments, runs: tuple[tuple[int, int, int], ...],
               pad: tuple[bool, bool, torch.Tensor]) -> tuple[str, str, str]:
    """(cpu_path, cpu_path_half, dense_fallback) for this layout (module docstring; thresholds in kernels.tuning)."""
    G, T_lora = len(sg.segments), sg.num_lora
    bmm_ok, pad_identity, _ = pad
    lora_runs = sum(1 for _, _, v in runs if v >= 0)
    fallback = "runs" if lora_runs <= tuning.CPU_MAX_RUNS_PER_SLOT * max(1, G) else "segments"

    def choose(max_mean_rows: float) -> str:
        if T_lora == 0:
            return "none"
        if sg.single is not None:
            return "single"
        if bmm_ok and (pad_identity or T_lora <= max_mean_rows * G):
            return "bmm"
        return fallback

    cpu_path, cpu_path_half = choose(tuning.CPU_BMM_MAX_MEAN_ROWS), choose(tuning.CPU_BMM_MAX_MEAN_ROWS_HALF)
    if (cpu_path_half in ("bmm", "runs", "segments") and not pad_identity and G >= 2
            and T_lora <= tuning.CPU_DENSE_MAX_MEAN_ROWS_HALF * G):
        return cpu_path, "dense", cpu_path_half
    return cpu_path, cpu_path_half, fallback


def _place(dev: torch.device, buffers: LoraMetaBuffers | None, *, int32: tuple[torch.Tensor, ...],
           int64: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The host tensors on `dev`: through `buffers` (one staged copy per dtype) or one `.to` each."""
    if buffers is not None:
        return buffers.fill(int32, int64)
    return [t.to(device=dev, dtype=torch.int32) for t in int32], [t.to(dev) for t in int64]


# ----------------------------------------------------------------------------- preallocated step buffers
class LoraMetaBuffers:
    """Device buffers for a step's LoraBatchMeta, allocated once and refilled every step (vLLM's LoRAKernelMeta).

    `build(token_lora_slots)` returns the step's LoraBatchMeta whose index tensors are views of two device
    buffers (int32: token_lora_slots + the three [G] segment arrays; int64: sorted_rows, sorted_slots,
    pad_rows, pad_slots, dense_cols), filled from pinned host staging with one non-blocking copy each.
    The views stay valid until the next `build`: one step's metadata at a time, as the engine uses it.
    Sized for `max_tokens` rows up front (grown, once, if a step ever needs more). On CPU (`stage`
    False by default) nothing is staged: the host tensors already are the device tensors.
    """

    def __init__(self, device: torch.device | str, max_tokens: int = 0, *, stage: bool | None = None) -> None:
        self.device = torch.device(device)
        self.stage = self.device.type != "cpu" if stage is None else stage
        self._pin = self.device.type == "cuda"
        self._cap = (0, 0)
        self._copied: torch.cuda.Event | None = None  # the last staged copy, waited on before the host rewrite
        if self.stage:
            self._reserve(4 * max_tokens, 4 * max_tokens + (3 * max_tokens + 1) // 2)  # pad_rows <= 1.5 T

    def _reserve(self, n32: int, n64: int) -> None:
        n32, n64 = max(n32, self._cap[0]), max(n64, self._cap[1])
        if (n32, n64) == self._cap:
            return
        self._host32 = torch.empty(n32, dtype=torch.int32, pin_memory=self._pin)
        self._host64 = torch.empty(n64, dtype=torch.int64, pin_memory=self._pin)
        self._dev32 = torch.empty(n32, dtype=torch.int32, device=self.device)
        self._dev64 = torch.empty(n64, dtype=torch.int64, device=self.device)
        self._cap = (n32, n64)

    def build(self, token_lora_slots: torch.Tensor | Sequence[int], *, split: int | None = None) -> LoraBatchMeta:
        """This step's layout (see LoraBatchMeta.from_token_lora_slots), its index tensors in these buffers."""
        return LoraBatchMeta.from_token_lora_slots(token_lora_slots, device=self.device, split=split,
                                              buffers=self if self.stage else None)

    def fill(self, int32: tuple[torch.Tensor, ...],
             int64: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copy the host tensors into the buffers (one copy per dtype); return same-shaped device views."""
        self._reserve(sum(t.numel() for t in int32), sum(t.numel() for t in int64))
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the pinned staging
        views = []
        for parts, host, dev in ((int32, self._host32, self._dev32), (int64, self._host64, self._dev64)):
            n = 0
            for t in parts:
                host[n:n + t.numel()].view(t.shape).copy_(t)
                n += t.numel()
            dev[:n].copy_(host[:n], non_blocking=True)
            out, n = [], 0
            for t in parts:
                out.append(dev[n:n + t.numel()].view(t.shape))
                n += t.numel()
            views.append(out)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return views[0], views[1]


@dataclass(frozen=True, eq=False)
class ComposedRows:
    """Rows that compose several adapters, expanded into "virtual rows" (one per component).

    A composed row t with pairs [(s_1, w_1), ..., (s_k, w_k)] becomes k virtual rows v, each with one
    slot (`meta`, a plain LoraBatchMeta over the virtual rows) and one weight, so the single-adapter
    segment kernels run unchanged on them; `lora_compose` sums them back into row t (index_add).
    Virtual rows are ordered by slot (stable), so each slot's rows are one contiguous run and the CPU path
    takes its zero-copy "runs"/"bmm" layouts instead of a sort-gather.
    Example: rows 0 and 2 compose [(1, 0.7), (3, 0.5)] and [(3, 1.0), (0, 0.2), (2, 0.4)]:
        rows    = [2, 0, 2, 0, 2]          (the real row of each virtual row, int64 on device)
        weights = [0.2, 0.7, 0.4, 0.5, 1.0] (fp32 on device)
        meta    = LoraBatchMeta.from_token_lora_slots([0, 1, 2, 3, 3])
    """

    rows: torch.Tensor
    weights: torch.Tensor
    meta: LoraBatchMeta

    @property
    def num_virtual(self) -> int:
        return self.meta.num_tokens

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[int, Sequence[tuple[int, float]]]], *,
                   device: torch.device | str | None = None) -> ComposedRows:
        """`pairs`: (row, [(lora_slot, weight), ...]) per composed row; slots >= 0 (base rows are not composed)."""
        triples: list[tuple[int, int, float]] = []  # (slot, row, weight)
        for row, comps in pairs:
            for slot, w in comps:
                if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
                    raise KernelError(f"a composed row's slot must be an int >= 0, got {slot!r}")
                triples.append((slot, int(row), float(w)))
        triples.sort(key=lambda t: t[0])  # stable: rows of one slot stay in row order
        slots = [t[0] for t in triples]
        rows = [t[1] for t in triples]
        weights = [t[2] for t in triples]
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return cls(torch.tensor(rows, dtype=torch.int64, device=dev),
                   torch.tensor(weights, dtype=torch.float32, device=dev),
                   LoraBatchMeta.from_token_lora_slots(slots, device=dev))
