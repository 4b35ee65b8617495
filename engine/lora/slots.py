"""LoRA weight slots on the engine device: one stack per (layer, module), `max_loras` deep.

Layout (allocated ONCE, shapes from `engine.planning.budget.slot_stack_shapes`, the one source of
truth, so the bytes here equal `budget.adapter_slot_bytes(...) * max_loras`):

    A[module]   [layers, max_loras, max_rank, in]    lora_dtype   (A[m][l] is one layer's stack)
    B[module]   [layers, max_loras, out, max_rank]   lora_dtype
    scales      [layers, n_modules, max_loras]       float32

On CPU, B is stored rank-major ([layers, max_loras, max_rank, out] in memory) and exposed as the
transposed view above: every user indexes it the same way, while the CPU expand reads
`B[s].T` ([R, out]) and the stacked [G * R, out] of several slots as contiguous memory, which
lets it run one dense matmul for a mixed batch (see `kernels.cpu`); same bytes.

Scaling is kept PER (layer, module, slot), not folded into B: rank_pattern / alpha_pattern /
rsLoRA give every module its own `alpha/r` (or `alpha/sqrt(r)`), and the shrink op takes a
per-slot scale vector, so the math is `delta = scale * B @ A` exactly as PEFT computes it
(`lora_B(lora_A(x)) * scaling`), with no extra rounding of B in bf16/fp16.

A slot filled with an adapter of rank r < max_rank holds the adapter in the top-left
`[:r]` block and zeros elsewhere; (layer, module) pairs the adapter does not target are all
zeros with scale 0. `set_slot` always rewrites the whole slot, so a previous occupant never
leaks. Everything the slots cannot represent is refused with an AdapterError BEFORE any write.

`get(layer, module)` -> (A [S, R, in], B [S, out, R], scales [S]) or None is what the model's
linears call (engine.model.LoraStacks); None means no occupied slot targets that pair, so
the model skips the shrink/expand for it. `slot_ranks(module)` -> per slot, the rank rows that may
be non-zero in any layer (0 for an empty slot): the CPU ops skip the rest, so an r8 adapter in
slots sized for r64 costs r8 (kernels.cpu).

DoRA (served when built with `base_weight=`, which vLLM cannot do): PEFT computes
`y = g * (W x + s * B A x) + bias` with `g = magnitude / ||W + s * B @ A||_row` (norm per
output row, a constant at inference). `g` is precomputed per (layer, module, slot) at load
time and kept in `G[module] [layers, max_loras + 1, out]` fp32 (row `max_loras` is all ones,
so indexing with token slot -1 selects 1 = untouched). The model adds the LoRA delta as usual,
then calls `apply_dora(y_part, dora(layer, module), token_lora_slots, bias_part)`; `dora()` is None
while no DoRA adapter is resident, so plain-LoRA batches pay nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.adapters.servable import DORA_UNSUPPORTED, SlotTarget  # noqa: F401 (DORA_UNSUPPORTED: re-exported)
from engine.planning.budget import LORA_MODULES, ModelDims, lora_module_shape, normalize_dtype, slot_stack_shapes
from engine.errors import AdapterError, ConfigError
from kernels.dtypes import TORCH_DTYPES


def torch_dtype(dtype: object) -> torch.dtype:
    """A torch dtype from a name/alias ("bf16", "float16") or a torch.dtype."""
    return dtype if isinstance(dtype, torch.dtype) else TORCH_DTYPES[normalize_dtype(dtype)]


@dataclass
class PreparedAdapter:
    """An adapter checked for these slots and laid out for fast slot writes (the CPU tier keeps these).

    Per module: either one stacked pair covering every layer at one rank (a single copy per
    module), or per-layer pairs. Tensors are in lora_dtype, pinned when the device is CUDA.
    """

    name: str
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # m -> (A [L, r, in], B [L, out, r])
    per_layer: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # m -> [(l, A [r, in], B [out, r])]
    scales: torch.Tensor | None = None  # [layers, n_modules] float32, 0 where untargeted
    targeted: frozenset[tuple[int, str]] = frozenset()
    dora: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (l, m) -> g [out] fp32
    nbytes: int = 0
    fingerprint: Any = None  # the LoraAdapter's (content digest + real file paths), for re-read checks


BaseWeight = Callable[[int, str], torch.Tensor]  # (layer, module) -> the base linear's W [out, in]


@torch.no_grad()
def apply_dora(
    y: torch.Tensor, g: torch.Tensor, token_lora_slots: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """DoRA's output rescale, in place, after the LoRA delta was added into `y`.

    Semantics (per token t with slot s = token_lora_slots[t]; s == -1 selects g's ones row):
        y[t] = g[s] * (y[t] - bias) + bias        # = g * (W x + s B A x) + bias

    y: [T, out] (a column slice of the fused output is fine), g: [S + 1, out] fp32 from
    `LoraSlots.dora`, token_lora_slots: [T] int, bias: [out] or None.
    """
    gt = g[token_lora_slots.long()].to(y.dtype)  # [T, out]
    if bias is None:
        y.mul_(gt)
    else:
        y.sub_(bias).mul_(gt).add_(bias)
    return y


class LoraSlots:
    """Device-resident A/B/scale stacks for `max_loras` adapters (see module docstring)."""

    def __init__(
        self,
        dims: ModelDims,
        *,
        max_loras: int,
        max_rank: int,
        modules: Iterable[str] = LORA_MODULES,
        dtype: object = torch.float32,
        device: str | torch.device = "cpu",
        base_weight: BaseWeight | None = None,
    ) -> None:
        """`base_weight(layer, module) -> W [out, in]` enables DoRA serving (the norm needs W)."""
        self.dims = dims
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = torch_dtype(dtype)
        self.device = torch.device(device)
        shapes = slot_stack_shapes(dims, max_loras=max_loras, max_rank=max_rank, modules=modules)
        self.modules: tuple[str, ...] = tuple(shapes)
        self._mindex = {m: i for i, m in enumerate(self.modules)}
        L = dims.layers
        kw = dict(dtype=self.dtype, device=self.device)
        self.A = {m: torch.zeros((L, *a), **kw) for m, (a, _) in shapes.items()}  # [L, S, R, in]
        if self.device.type == "cpu":  # rank-major storage, [L, S, out, R] view (see the module docstring)
            self.B = {m: torch.zeros((L, b[0], b[2], b[1]), **kw).transpose(2, 3) for m, (_, b) in shapes.items()}
        else:
            self.B = {m: torch.zeros((L, *b), **kw) for m, (_, b) in shapes.items()}  # [L, S, out, R]
        self.scales = torch.zeros(L, len(self.modules), max_loras, dtype=torch.float32, device=self.device)
        # which slots have weights for (layer, module index): lets get() return None for idle pairs
        self._users: list[list[set[int]]] = [[set() for _ in self.modules] for _ in range(L)]
        # per module and slot: rank rows that may be non-zero (0 = all zero), so writes only
        # zero what a previous occupant actually dirtied
        self._dirty: dict[str, list[int]] = {m: [0] * max_loras for m in self.modules}
        self._ranks: dict[str, tuple[int, ...]] = {m: tuple(d) for m, d in self._dirty.items()}  # frozen copy for the ops
        self._pin = self.device.type == "cuda"
        self._base_weight = base_weight
        self.G: dict[str, torch.Tensor] | None = None  # DoRA g: [L, S + 1, out] fp32, ones where unused
        self._dora_users: list[list[set[int]]] = [[set() for _ in self.modules] for _ in range(L)]
        if base_weight is not None:
            self.G = {m: torch.ones(L, max_loras + 1, b[1], dtype=torch.float32, device=self.device)
                      for m, (_, b) in shapes.items()}

    # ------------------------------------------------------------------ sizes
    @property
    def nbytes(self) -> int:
        """Bytes of the A and B stacks (what `budget.total_slot_bytes` predicts)."""
        return sum(t.numel() * t.element_size() for t in (*self.A.values(), *self.B.values()))

    @property
    def scale_nbytes(self) -> int:
        """Bytes of the fp32 scales plus the DoRA g stacks (when DoRA is enabled)."""
        g = sum(t.numel() * t.element_size() for t in self.G.values()) if self.G is not None else 0
        return self.scales.numel() * self.scales.element_size() + g

    @property
    def dora_enabled(self) -> bool:
        return self.G is not None

    # ------------------------------------------------------------------ model-facing
    def get(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(A [S, R, in], B [S, out, R], scales [S]) for one linear, or None when no slot uses it."""
        mi = self._mindex.get(module)
        if mi is None or not self._users[layer][mi]:
            return None
        return self.A[module][layer], self.B[module][layer], self.scales[layer, mi]

    def stacks_for(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [S, R, in], B [S, out, R], scales [S]) views for one linear (always, even if all zero).

        (test/inspection accessor: the model reads `get`, which hides idle pairs; tests check that those
        stay zero and that lower ranks are zero-padded, without knowing how scales are laid out.)"""
        mi = self._mindex[module]
        return self.A[module][layer], self.B[module][layer], self.scales[layer, mi]

    def slot_ranks(self, module: str) -> tuple[int, ...]:
        """Per slot, how many leading rank rows of `module`'s A (columns of B) may be non-zero in any
        layer; the rest are zero. A new tuple whenever a slot changes (the ops cache by identity)."""
        return self._ranks[module]

    def dora(self, layer: int, module: str) -> torch.Tensor | None:
        """DoRA g [S + 1, out] for one linear (see `apply_dora`), or None when no resident DoRA adapter uses it."""
        mi = self._mindex.get(module)
        if self.G is None or mi is None or not self._dora_users[layer][mi]:
            return None
        return self.G[module][layer]

    # ------------------------------------------------------------------ checks and layout
    @property
    def target(self) -> SlotTarget:
        """What these slots can hold, for `engine.adapters.servable.servable_problems`."""
        return SlotTarget(self.dims.layers, {m: lora_module_shape(self.dims, m) for m in self.modules},
                          self.max_rank, self.dora_enabled)

    def check(self, adapter: Any, *, values: bool = False) -> None:
        """Raise AdapterError if `adapter` (a LoraAdapter, or an AdapterManifest from its header) cannot
        be held by these slots; with `values`, its values are checked too, in the slot dtype
        (`engine.adapters.check_servable` decides)."""
        from engine.adapters import check_servable

        check_servable(adapter, allow_dora=self.dora_enabled, check_values=values, dtype=self.dtype, target=self.target)

    def inspect(self, name: str, path: str) -> Any:
        """Registration: config + safetensors header only, checked for these slots (an AdapterManifest;
        nothing of the tensors is read). A legacy .bin has no header to read alone: it is loaded in full."""
        from engine.adapters.manifest import read_manifest

        manifest = read_manifest(path, name=name)
        if manifest is None:
            return self.load(name, path)
        self.check(manifest)
        return manifest

    def load(self, name: str, path: str, known: Any = None) -> PreparedAdapter:
        """Disk -> CPU tier: read (one read, hashed while loaded), validate and check `path` for these
        slots; the loader for `AdapterCache(loader=slots.load, inspector=slots.inspect, ...)`.

        `known`: the fingerprint recorded so far. It must match what is read (AdapterChangedError
        otherwise, before any value is looked at); when it carries a content digest, the bytes are
        the ones already fully validated, so the value checks are not repeated. Raises AdapterError
        for anything unreadable or unservable."""
        from engine.adapters import load_adapter
        from engine.lora.manager import check_same

        adapter = load_adapter(path, name=name)
        check_same(name, known, adapter.fingerprint)
        if getattr(known, "digest", None) is not None:  # the very bytes that passed every check before
            return self.prepare(adapter, checked=True, finite=True)
        self.check(adapter, values=True)  # values checked in the slot dtype: what `prepare` casts to
        return self.prepare(adapter, checked=True, finite=True)  # copies into the slot dtype

    def prepare(self, adapter: Any, *, checked: bool = False, finite: bool = False) -> PreparedAdapter:
        """Check `adapter` (unless `checked`) and lay it out for `set_slot` (run off the critical path:
        load/prefetch); `finite`: the weights are known to stay finite in the slot dtype (checked by
        `check(values=True)`, or a re-read whose digest matches that first load's)."""
        if isinstance(adapter, PreparedAdapter):
            return adapter
        if not checked:
            self.check(adapter)
        L = self.dims.layers
        name = getattr(adapter, "name", None) or "adapter"
        out = PreparedAdapter(name=name, scales=torch.zeros(L, len(self.modules), dtype=torch.float32),
                              fingerprint=getattr(adapter, "fingerprint", None))
        by_module: dict[str, list[tuple[int, Any]]] = {}
        for (layer, module), w in adapter.modules.items():
            by_module.setdefault(module, []).append((layer, w))
            scale = float(w.scaling)
            if not abs(scale) <= torch.finfo(torch.float32).max:  # the scales are fp32 (NaN fails too)
                raise AdapterError(f"adapter {name!r}: layer {layer} {module} has scaling {scale:.3g}, not a finite float32")
            out.scales[layer, self._mindex[module]] = scale
        for module, items in by_module.items():
            items.sort(key=lambda t: t[0])
            ranks = {int(w.lora_a.shape[0]) for _, w in items}
            if len(items) == L and len(ranks) == 1:  # every layer, one rank: one copy per module
                a = self._host(torch.stack([w.lora_a for _, w in items]))  # [L, r, in]
                b = self._host(torch.stack([w.lora_b for _, w in items]))  # [L, out, r]
                out.stacked[module] = (a, b)
                out.nbytes += a.nbytes + b.nbytes
            else:
                lst = [(layer, self._host(w.lora_a), self._host(w.lora_b)) for layer, w in items]
                out.per_layer[module] = lst
                out.nbytes += sum(a.nbytes + b.nbytes for _, a, b in lst)
        out.targeted = frozenset(adapter.modules)
        for key, w in adapter.modules.items():
            if getattr(w, "magnitude", None) is not None:
                out.dora[key] = self._dora_g(key, w)
        if not finite or out.dora:  # DoRA's g comes from the base weights: never checked before
            self._check_finite(out, name)  # a slot never holds NaN/Inf: other tenants' rows share its matmuls
        if self._pin:
            out.scales = out.scales.pin_memory()
        return out

    def _dora_g(self, key: tuple[int, str], w: Any) -> torch.Tensor:
        """g = magnitude / ||W + scaling * B @ A||_row in fp32 (PEFT's DoraLinearLayer), on the host."""
        assert self._base_weight is not None
        W = self._base_weight(*key).detach()  # [out, in]
        dev = W.device
        delta = w.lora_b.to(dev, torch.float32) @ w.lora_a.to(dev, torch.float32)  # [out, in]
        norm = torch.linalg.norm(W.float() + float(w.scaling) * delta, dim=1)  # [out]
        g = (w.magnitude.to(dev, torch.float32) / norm).cpu()
        return g.pin_memory() if self._pin else g

    def _check_finite(self, p: PreparedAdapter, name: str) -> None:
        """Refuse weights that are finite in the file but not in the slot dtype (e.g. 1e30 in fp16),
        and non-finite scales: checked on exactly the tensors a slot will hold."""
        from engine.adapters.limits import all_finite

        tensors = [t for a, b in p.stacked.values() for t in (a, b)]
        tensors += [t for lst in p.per_layer.values() for _, a, b in lst for t in (a, b)]
        tensors += list(p.dora.values())
        if p.scales is not None:
            tensors.append(p.scales)
        if not all(all_finite(t) for t in tensors):
            raise AdapterError(
                f"adapter {name!r} cannot be served: its weights or scaling overflow the slot dtype "
                f"({str(self.dtype).removeprefix('torch.')}) to Inf/NaN"
            )

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(device="cpu", dtype=self.dtype).contiguous()
        return t.pin_memory() if self._pin else t

    # ------------------------------------------------------------------ writes
    @torch.no_grad()
    def set_slot(self, slot: int, adapter: Any) -> None:
        """Write `adapter` (LoraAdapter or PreparedAdapter) into `slot`, zeroing everything it
        does not cover. Raises AdapterError (and leaves the slot untouched) if it cannot be held."""
        self._check_slot(slot)
        p = self.prepare(adapter)
        nb = self._pin  # async host->device copies from pinned memory
        for m in self.modules:
            a_dst, b_dst = self.A[m][:, slot], self.B[m][:, slot]  # [L, R, in], [L, out, R]
            dirty = self._dirty[m][slot]  # rows >= dirty are known zero in every layer
            if m in p.stacked:
                a, b = p.stacked[m]
                r = a.shape[1]
                if dirty > r:
                    a_dst[:, r:dirty].zero_()
                    b_dst[:, :, r:dirty].zero_()
                a_dst[:, :r].copy_(a, non_blocking=nb)
                b_dst[:, :, :r].copy_(b, non_blocking=nb)
                self._dirty[m][slot] = r
            else:
                if dirty:
                    a_dst[:, :dirty].zero_()
                    b_dst[:, :, :dirty].zero_()
                r_max = 0
                for layer, a, b in p.per_layer.get(m, ()):
                    r = a.shape[0]
                    a_dst[layer, :r].copy_(a, non_blocking=nb)
                    b_dst[layer, :, :r].copy_(b, non_blocking=nb)
                    r_max = max(r_max, r)
                self._dirty[m][slot] = r_max
            self._ranks[m] = tuple(self._dirty[m])
        assert p.scales is not None
        self.scales[:, :, slot].copy_(p.scales, non_blocking=nb)
        if self.G is not None:
            for m in self.modules:
                self.G[m][:, slot].fill_(1.0)
            for (layer, m), g in p.dora.items():
                self.G[m][layer, slot].copy_(g, non_blocking=nb)
        for layer in range(self.dims.layers):
            for mi, m in enumerate(self.modules):
                for users, on in ((self._users, (layer, m) in p.targeted), (self._dora_users, (layer, m) in p.dora)):
                    if on:
                        users[layer][mi].add(slot)
                    else:
                        users[layer][mi].discard(slot)

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        """Zero `slot` everywhere (A, B and scales)."""
        self._check_slot(slot)
        for m in self.modules:
            d = self._dirty[m][slot]
            self.A[m][:, slot, :d].zero_()
            self.B[m][:, slot, :, :d].zero_()
            self._dirty[m][slot] = 0
            self._ranks[m] = tuple(self._dirty[m])
        self.scales[:, :, slot].zero_()
        if self.G is not None:
            for m in self.modules:
                self.G[m][:, slot].fill_(1.0)
        for table in (self._users, self._dora_users):
            for per_layer in table:
                for users in per_layer:
                    users.discard(slot)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise ConfigError(f"slot {slot} out of range [0, {self.max_loras})")
