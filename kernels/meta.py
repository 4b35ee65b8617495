"""Per-step batch layout for the LoRA ops, built once per engine step and shared by every layer.

Every LoRA layer of a decoder sees the same `token_slots` in one step, so everything that
depends only on the slots (sort order, segments, distinct slots, index tensors) is computed
here once instead of in each of the ~7 x num_layers op calls.

Strategy (which kernel layout the Triton backend launches), decided from the layout alone:

- "segment" (SGMV): rows are processed per adapter segment (rows of one slot, gathered through
  `sorted_rows`), so one weight tile serves up to BLOCK_M rows with a tensor-core dot. Used when
  adapters are shared by several rows on average (prefill chunks, decode with popular adapters):
  `num_lora_rows > GATHER_MAX_ROWS_PER_SEGMENT * num_segments`.
- "gather" (BGMV): one program per row reads that row's adapter weights directly. Used when
  rows mostly have distinct adapters (decode with many adapters), where a segment tile would be
  mostly padding and L2 already absorbs the rare repeated weight reads.

The CPU fast path (`kernels.cpu`) uses the same metadata differently (`cpu_path`, chosen here once
per step so each of the ~7 x num_layers op calls only dispatches):
- "single": every row has one slot -> one plain matmul.
- "bmm": many adapter segments with few rows each (decode over many adapters), or equal segments
  already in slot order -> one batched matmul over the segments padded to `pad_len` rows
  (`pad_rows` gathers them; a zero-copy view when `pad_identity`), instead of one tiny matmul per
  segment: the per-op overhead is paid once, not G times. `cpu_path_half` is the choice for
  bf16/fp16 activations, where "bmm" wins for longer segments too (`path_for(dtype)` picks).
  1 thread, hidden 768 -> 2304, rank 16, 16 adapters, shrink + expand, us (runs / bmm):
  fp32  T=128 equal segments 456 / 301;  8 rows +-15%: 449 / 557;  160 rows +-15%: 2139 / 6918
  bf16  T=128 equal segments 1041 / 281; 8 rows +-15%: 1033 / 467; 12 rows x 8 adapters: 535 / 346;
        40 rows x 4: 397 / 423;  160 rows +-15%: 2568 / 4960
- "runs": few row runs (rows of an adapter contiguous, e.g. prefill) -> one matmul per run on
  zero-copy row slices.
- "segments": otherwise a sort-gather of the rows, one matmul per segment, one scatter back.
- "dense" (bf16/fp16 only): short segments of unequal length, where "bmm" pads and the loops pay a
  16-bit matmul's overhead per segment -> one matmul against the stack's slots lo..hi (the lowest to
  the highest slot in the batch: a view, no copy) as [(hi-lo+1) * R, K] (shrink; each row keeps its
  own R columns) or [(hi-lo+1) * R, N] (expand; rows scattered into their own R columns of a zeroed
  [T, (hi-lo+1) * R]). (hi-lo+1) times the useful FLOPs, so `kernels.cpu` takes it only while
  (hi-lo+1) * R <= DENSE_MAX_COLS, else `dense_fallback`. bf16, 1 thread, 16 adapters of rank 16,
  ~58 rows of unequal segments, 768 -> 2304, expand us: bmm 220 / dense 187; 8 adapters 169 / 103.
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

# Mean rows per adapter segment at or below which "gather" (BGMV) beats "segment" (SGMV).
GATHER_MAX_ROWS_PER_SEGMENT = 2
# The CPU path loops over row runs (zero-copy slices) when there are at most this many runs
# per distinct slot; otherwise one gather + one scatter of the rows is cheaper than many tiny matmuls.
CPU_MAX_RUNS_PER_SLOT = 2
# The CPU path uses one padded batched matmul ("bmm") from this many adapter segments on, while the
# segments are short (mean rows per segment at most CPU_BMM_MAX_MEAN_ROWS: there the per-matmul
# overhead dominates; longer segments amortise it and the padded row copies cost more than they save)
# and the padding keeps the padded rows (segments x longest segment) within this factor of the real rows.
# 16-bit activations move the crossover: a bf16/fp16 CPU matmul costs ~2x an fp32 one in fixed
# overhead (oneDNN dispatch) while the batched one runs on AMX/AVX-512 units, so "bmm" pays up to
# CPU_BMM_MAX_MEAN_ROWS_HALF rows per segment (measured below). Equal segments already in slot order
# (`pad_identity`: zero-copy views, no padding) take "bmm" in every dtype.
CPU_BMM_MIN_SEGMENTS = 3
CPU_BMM_MAX_MEAN_ROWS = 4
CPU_BMM_MAX_MEAN_ROWS_HALF = 32
CPU_BMM_MAX_PAD_FACTOR = 1.5
# bf16/fp16 segments up to this many rows on average (not already in equal slot order) take "dense".
# bf16, 1 thread, shrink + expand 768 -> 2304, us (runs / bmm / dense): 10 prompts of 30-38 rows
# 864 / 814 / 496; 8 x 60-70 rows 910 / 1161 / 557; 3 x 100-130 rows 432 / 745 / 297;
# 16 x 140-180 rows 2817 / 5524 / 3013 (past the crossover); 16 x 1-3 rows 869 / - / 200.
CPU_DENSE_MAX_MEAN_ROWS_HALF = 128
_HALF = (torch.bfloat16, torch.float16)
CPU_PATHS = ("none", "single", "bmm", "runs", "segments", "split", "dense")


class KernelError(MloraError):
    """Bad input to a LoRA kernel op (shapes, dtypes, devices, slot indices)."""


@dataclass(frozen=True, eq=False)
class LoraBatchMeta:
    """Layout of one step's `token_slots`: what each op needs to launch without recomputing it.

    Attributes (T = rows, G = segments = distinct slots != -1, T_lora = rows with a slot != -1):
        token_slots:    [T] int32 on `device`, the slot of each row (-1 = base model only).
        num_tokens:     T.
        num_no_lora:    rows with slot -1 (their shrink output is 0, expand leaves them alone).
        min_slot, max_slot: host ints for the range check against S (no device sync per op).
        distinct_slots: sorted distinct slots != -1 (length G).
        sorted_rows:    [T_lora] int64, row indices stably sorted by slot, -1 rows left out.
        sorted_slots:   [T_lora] int64, the slot of each entry of sorted_rows.
        seg_starts, seg_lens, seg_slots: [G] int32 on `device`; segment g is
                        sorted_rows[seg_starts[g] : seg_starts[g] + seg_lens[g]], all using seg_slots[g].
        segments:       host copy of the above as (start, end, slot) into sorted_rows.
        max_seg_len:    longest segment (sizes the SGMV grid).
        runs:           maximal runs of equal slot in row order, (start, end, slot), -1 runs included.
        single_slot:    the slot when every row uses the same slot != -1, else None (plain matmul).
        strategy:       "segment" or "gather" (Triton backend; see the module docstring).
        cpu_path:       the CPU path's layout, one of CPU_PATHS (see the module docstring).
        pad_len:        L = max_seg_len: rows per segment in the padded "bmm" layout.
        pad_rows:       [G * L] int64 on `device`; entry g * L + i is row i of segment g, and segments
                        shorter than L repeat their first row as padding (identical work, written back
                        to the same row with the same value, so no mask or dummy row is needed).
        pad_slots:      [G] int64 on `device`, the slot of each segment (index into the weight stack).
        slot_base:      lo when the distinct slots are exactly lo, lo+1, ..., lo+G-1 (the weights of the
                        segments are then a view `stack[lo:lo+G]`, no copy), else None.
    """

    token_slots: torch.Tensor
    num_tokens: int
    num_no_lora: int
    min_slot: int
    max_slot: int
    distinct_slots: tuple[int, ...]
    sorted_rows: torch.Tensor
    sorted_slots: torch.Tensor
    seg_starts: torch.Tensor
    seg_lens: torch.Tensor
    seg_slots: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    max_seg_len: int
    runs: tuple[tuple[int, int, int], ...]
    single_slot: int | None
    strategy: str
    cpu_path: str = "none"
    pad_len: int = 0
    pad_rows: torch.Tensor | None = None
    pad_slots: torch.Tensor | None = None
    slot_base: int | None = None
    pad_identity: bool = False  # pad_rows == arange(T): rows already grouped, equal segments, no -1 rows
    cpu_path_half: str = "none"  # cpu_path for bf16/fp16 activations
    dense_fallback: str = "segments"  # the path a "dense" op takes when the dense layout does not apply
    dense_cols: torch.Tensor | None = None  # [T_lora] int64: sorted_slots - distinct_slots[0] (a row's block in "dense")
    parts: tuple[tuple[int, int, "LoraBatchMeta"], ...] = ()  # "split": (row start, row end, layout of those rows)

    def path_for(self, dtype: torch.dtype) -> str:
        """The CPU path for activations of `dtype` (16-bit types batch longer segments)."""
        return self.cpu_path_half if dtype in _HALF else self.cpu_path

    @property
    def num_lora_rows(self) -> int:
        return self.num_tokens - self.num_no_lora

    @property
    def grouped(self) -> bool:
        """Rows are already grouped: every slot (and -1) occupies one contiguous run of rows."""
        return len(self.runs) == len(self.distinct_slots) + (1 if self.num_no_lora else 0)

    def rows_of(self, g: int) -> torch.Tensor:
        """Row indices of segment g (slot `segments[g][2]`): a view into sorted_rows, no copy."""
        a, b, _ = self.segments[g]
        return self.sorted_rows[a:b]

    @classmethod
    def from_token_slots(
        cls, token_slots: torch.Tensor | Sequence[int], *, device: torch.device | str | None = None,
        split: int | None = None,
    ) -> LoraBatchMeta:
        """Build the layout from the per-row slots (a tensor or a host list; a list avoids a sync).

        `device` is where the index tensors go (default: the tensor's device, else CPU). `split`:
        rows [0, split) and [split, T) are laid out separately by the CPU path (prefill chunks then
        decode rows; see "split" in the module docstring); the Triton backend ignores it.
        """
        if isinstance(token_slots, torch.Tensor):
            if token_slots.dim() != 1:
                raise KernelError(f"token_slots must be 1-D [T], got shape {tuple(token_slots.shape)}")
            if token_slots.dtype.is_floating_point or token_slots.dtype.is_complex or token_slots.dtype == torch.bool:
                raise KernelError(f"token_slots must be an integer tensor, got {token_slots.dtype}")
            dev = torch.device(device) if device is not None else token_slots.device
            host = token_slots.detach().to("cpu", torch.int64)
        else:
            values = list(token_slots)
            if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise KernelError("token_slots must be a sequence of ints")
            dev = torch.device(device) if device is not None else torch.device("cpu")
            host = torch.tensor(values, dtype=torch.int64)
        meta = cls._build(host, dev)
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
    def _build(cls, host: torch.Tensor, dev: torch.device) -> LoraBatchMeta:
        # host: [T] int64 on CPU
        T = int(host.numel())
        if T == 0:
            empty = torch.empty(0, dtype=torch.int32, device=dev)
            none = torch.empty(0, dtype=torch.int64, device=dev)
            return cls(empty, 0, 0, -1, -1, (), none, none, empty, empty, empty, (), 0, (), None, "segment",
                       pad_rows=none, pad_slots=none)
        min_slot, max_slot = int(host.min()), int(host.max())
        if min_slot < -1:
            raise KernelError(f"token_slots must be >= -1 (-1 = no adapter), got {min_slot}")

        run_vals, run_lens = torch.unique_consecutive(host, return_counts=True)
        run_vals_l, run_lens_l = run_vals.tolist(), run_lens.tolist()
        runs, start = [], 0
        for v, n in zip(run_vals_l, run_lens_l):
            runs.append((start, start + n, v))
            start += n

        sorted_vals, order = torch.sort(host, stable=True)
        num_no_lora = int((sorted_vals < 0).sum())
        order = order[num_no_lora:]  # -1 rows sort first; drop them
        seg_vals, seg_lens = torch.unique_consecutive(sorted_vals[num_no_lora:], return_counts=True)
        seg_vals_l, seg_lens_l = seg_vals.tolist(), seg_lens.tolist()
        segments, start = [], 0
        for v, n in zip(seg_vals_l, seg_lens_l):
            segments.append((start, start + n, v))
            start += n
        G, T_lora = len(segments), T - num_no_lora

        strategy = "gather" if G and T_lora <= GATHER_MAX_ROWS_PER_SEGMENT * G else "segment"
        single = seg_vals_l[0] if G == 1 and num_no_lora == 0 else None
        starts = [s for s, _, _ in segments]
        # one host->device copy for the three int32 segment arrays
        seg_pack = torch.tensor([starts, seg_lens_l, seg_vals_l], dtype=torch.int32).to(dev)

        L = max(seg_lens_l, default=0)
        lora_runs = sum(1 for _, _, v in runs if v >= 0)
        bmm_ok = G >= CPU_BMM_MIN_SEGMENTS and G * L <= CPU_BMM_MAX_PAD_FACTOR * T_lora
        pad_identity = False
        pad_rows = torch.empty(0, dtype=torch.int64, device=dev)
        if bmm_ok:
            # pos: [G, L] positions into `order`, short segments padded with their first position
            ar = torch.arange(L).unsqueeze(0)  # [1, L]
            lens, seg_start = torch.tensor(seg_lens_l).unsqueeze(1), torch.tensor(starts).unsqueeze(1)  # [G, 1]
            pos = seg_start + torch.where(ar < lens, ar, torch.zeros_like(ar))
            pad_host = order[pos.reshape(-1)]  # [G * L]
            pad_identity = G * L == T and bool(torch.equal(pad_host, torch.arange(T)))
            pad_rows = pad_host.to(dev)
        fallback = "runs" if lora_runs <= CPU_MAX_RUNS_PER_SLOT * max(1, G) else "segments"

        def choose(max_mean_rows: int) -> str:
            if T_lora == 0:
                return "none"
            if single is not None:
                return "single"
            if bmm_ok and (pad_identity or T_lora <= max_mean_rows * G):
                return "bmm"
            return fallback

        cpu_path, cpu_path_half = choose(CPU_BMM_MAX_MEAN_ROWS), choose(CPU_BMM_MAX_MEAN_ROWS_HALF)
        if (cpu_path_half in ("bmm", "runs", "segments") and not pad_identity and G >= 2
                and T_lora <= CPU_DENSE_MAX_MEAN_ROWS_HALF * G):
            dense_fallback, cpu_path_half = cpu_path_half, "dense"
        else:
            dense_fallback = fallback
        contiguous = G > 0 and seg_vals_l[-1] - seg_vals_l[0] == G - 1  # sorted and distinct
        return cls(
            token_slots=host.to(device=dev, dtype=torch.int32),
            num_tokens=T,
            num_no_lora=num_no_lora,
            min_slot=min_slot,
            max_slot=max_slot,
            distinct_slots=tuple(seg_vals_l),
            sorted_rows=order.to(dev),
            sorted_slots=sorted_vals[num_no_lora:].to(dev),
            seg_starts=seg_pack[0],
            seg_lens=seg_pack[1],
            seg_slots=seg_pack[2],
            segments=tuple(segments),
            max_seg_len=max(seg_lens_l, default=0),
            runs=tuple(runs),
            single_slot=single,
            strategy=strategy,
            cpu_path=cpu_path,
            pad_len=L,
            pad_rows=pad_rows,
            pad_slots=seg_vals.to(dev),
            slot_base=seg_vals_l[0] if contiguous else None,
            pad_identity=pad_identity,
            cpu_path_half=cpu_path_half,
            dense_fallback=dense_fallback,
            dense_cols=(sorted_vals[num_no_lora:] - (seg_vals_l[0] if G else 0)).to(dev),
        )


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
        meta    = LoraBatchMeta.from_token_slots([0, 1, 2, 3, 3])
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
                   LoraBatchMeta.from_token_slots(slots, device=dev))
