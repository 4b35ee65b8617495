"""Load a PEFT LoRA adapter and normalise it to per-(layer, module) A, B and scaling.

Used by the engine (registration), `mlora validate` and `mlora merge` alike, so that every
consumer reads an adapter exactly as PEFT wrote it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.adapters.config import AdapterConfig, parse_adapter_config
from engine.adapters.files import CONFIG_NAME, WeightsFile, decode_json, find_weights_file, read_small_file, resolve_adapter_dir
from engine.adapters.keys import LoraKey, parse_lora_key
from engine.adapters.limits import all_finite, module_value_issue
from engine.adapters.servable import ModuleShape, Problem, SlotTarget, config_reasons, servable_problems
from engine.errors import AdapterError


@dataclass
class LoraModuleWeights:
    """One LoRA'd linear: y += scaling * (x @ lora_a.T) @ lora_b.T (+ bias)."""

    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scaling: float
    module_path: str = ""  # PEFT's module key, e.g. "model.layers.3.self_attn.q_proj"
    magnitude: torch.Tensor | None = None  # [out]  DoRA's lora_magnitude_vector
    bias: torch.Tensor | None = None  # [out]  lora_bias

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.lora_a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_b.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32, [out, in]: what PEFT's get_delta_weight returns (non-DoRA)."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.lora_a, self.lora_b, self.magnitude, self.bias) if t is not None]


@dataclass(frozen=True)
class AdapterFingerprint:
    """What an adapter was registered with, so a later re-read can prove it is the same adapter.

    `digest` is the sha256 of the adapter_config.json bytes and of the weights *as loaded* - the
    bytes that are validated and served, hashed from the one read that loads them, not from a
    separate read of the file (safetensors: the whole file, header and data; a legacy .bin: every
    tensor's name, dtype, shape and bytes in name order). None when only the header was read
    (registration, `engine.adapters.manifest`): the digest is taken at the first full load.
    `facts` is the sha256 of what registration reads: the config bytes, the safetensors header
    bytes and the file size (every tensor's name, dtype, shape and place).
    `files` are the resolved real paths of the two files read.
    """

    digest: str | None
    files: tuple[str, ...]
    facts: str | None = None


def header_facts(config_bytes: bytes, head: bytes, size: int) -> str:
    """`AdapterFingerprint.facts`: sha256 of the config bytes, the safetensors header bytes and the file size."""
    h = hashlib.sha256()
    for part in (config_bytes, head):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    h.update(size.to_bytes(8, "little"))
    return h.hexdigest()


def _digest(config_bytes: bytes, tensors: dict[str, torch.Tensor]) -> str:
    """The legacy .bin digest: config bytes, then every tensor (name, dtype, shape, bytes) in name order."""
    h = hashlib.sha256()
    h.update(len(config_bytes).to_bytes(8, "little"))
    h.update(config_bytes)
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous()
        h.update(f"\n{key}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


@dataclass
class LoraAdapter:
    """A normalised LoRA adapter.

    `modules` holds only what a slot can serve: decoder-layer q/k/v/o/gate/up/down linears.
    `other_keys` names every tensor in the file that is not in `modules` (embedding LoRA,
    modules_to_save, base biases, LoRA on other modules); `unservable_reasons()` says why.
    """

    name: str
    path: Path
    config: AdapterConfig
    modules: dict[tuple[int, str], LoraModuleWeights]
    weights_file: Path
    all_keys: tuple[str, ...] = field(default=(), repr=False)
    fingerprint: AdapterFingerprint | None = field(default=None, repr=False)

    @property
    def other_keys(self) -> list[str]:
        """Tensor names in the file that are not decoder-linear LoRA (so not in `modules`)."""
        return [k for k in self.all_keys if (lk := parse_lora_key(k)) is None or lk.layer is None]

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def num_params(self) -> int:
        return sum(t.numel() for m in self.modules.values() for t in m.tensors())

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in m.tensors())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of most LoRA A/B tensors (adapters are normally uniform)."""
        counts = Counter(t.dtype for m in self.modules.values() for t in (m.lora_a, m.lora_b))
        return counts.most_common(1)[0][0] if counts else torch.float32

    @property
    def module_names(self) -> list[str]:
        """Sorted distinct module names, e.g. ["k_proj", "q_proj", "v_proj"]."""
        return sorted({mod for _, mod in self.modules})

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.modules})

    def module_shapes(self) -> dict[tuple[int, str], ModuleShape]:
        """Per (layer, module): what the servability rules need to know without the values."""
        return {key: ModuleShape.of(m) for key, m in self.modules.items()}

    def unservable_reasons(self, *, allow_dora: bool = False) -> list[str]:
        """Why the engine cannot serve this adapter in a slot (empty list: it can): config and tensor names only."""
        return config_reasons(self.config, self.all_keys, allow_dora=allow_dora)


def _group(keys: list[str]) -> dict[str, dict[str, LoraKey]]:
    """module_path -> role -> key, for decoder-linear LoRA keys only."""
    groups: dict[str, dict[str, LoraKey]] = {}
    for k in keys:
        lk = parse_lora_key(k)
        if lk is not None and lk.layer is not None:
            groups.setdefault(lk.module_path, {})[lk.role] = lk
    return groups


def check_module_shapes(config: AdapterConfig, path: str, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """A message if one module's tensor shapes disagree with each other or with the config's rank."""
    if "A" not in shapes:
        return f"{path}: has lora_B but no lora_A"
    if "B" not in shapes:
        return f"{path}: has lora_A but no lora_B"
    a, b = shapes["A"], shapes["B"]
    if len(a) != 2 or len(b) != 2:
        return f"{path}: lora_A {list(a)} and lora_B {list(b)} must both be 2-D"
    r, _ = config.rank_alpha_for(path)
    if a[0] != r or b[1] != r:
        return f"{path}: lora_A {list(a)} / lora_B {list(b)} do not have rank {r} from the config (r/rank_pattern)"
    for role in ("magnitude", "bias"):
        if role in shapes and tuple(shapes[role]) != (b[0],):
            return f"{path}: {role} has shape {list(shapes[role])}, expected [{b[0]}] (out_features)"
    return None


def read_config(adapter_dir: Path) -> tuple[AdapterConfig, bytes, str]:
    """(parsed config, its bytes, its real path): adapter_config.json read once, parsed and checked for r > 0."""
    config_path = adapter_dir / CONFIG_NAME
    config_bytes, config_real = read_small_file(config_path, CONFIG_NAME)  # one read: parsed and hashed
    config = parse_adapter_config(decode_json(config_bytes, config_path, CONFIG_NAME))
    if config.r <= 0 or any(v <= 0 for v in config.rank_pattern.values()):
        raise AdapterError(f"{adapter_dir}: r must be > 0 (r={config.r}, rank_pattern={config.rank_pattern})")
    return config, config_bytes, config_real


def module_keys(config: AdapterConfig, wf: WeightsFile) -> dict[tuple[int, str], dict[str, LoraKey]]:
    """(layer, module) -> role -> key of the decoder-linear LoRA tensors, from names and shapes only;
    AdapterError if the file holds no tensors, shapes disagree with each other or the config's rank,
    or one (layer, module) appears twice."""
    name = wf.path.name
    out: dict[tuple[int, str], dict[str, LoraKey]] = {}
    for path, roles in _group(wf.keys()).items():
        problem = check_module_shapes(config, path, {role: tuple(wf.shape(lk.key)) for role, lk in roles.items()})
        if problem:
            raise AdapterError(f"{name}: {problem}")
        lk = roles["A"]
        assert lk.layer is not None and lk.module is not None
        if (lk.layer, lk.module) in out:
            raise AdapterError(f"{name}: two LoRA entries for layer {lk.layer} {lk.module}")
        out[(lk.layer, lk.module)] = roles
    if not wf.keys():
        raise AdapterError(f"{name} holds no tensors")
    return dict(sorted(out.items()))


def load_adapter(path_or_hub_id: str | Path, *, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA adapter (directory or hub id) into a LoraAdapter; AdapterError if it is unreadable.

    A safetensors file's tensor data is read ONCE (pread from the descriptor that was checked, see
    WeightsFile) into memory the adapter owns, never a view of a memory map, and hashed from that
    same buffer: a file rewritten in place later cannot change loaded (validated, hashed) weights,
    a file truncated in place cannot SIGBUS the server. Legacy adapter_model.bin only via
    torch.load(weights_only=True). Servability is not enforced here: call `check_servable` (the
    engine does, at the first load).
    """
    adapter_dir = resolve_adapter_dir(path_or_hub_id)
    config, config_bytes, config_real = read_config(adapter_dir)
    wfile = find_weights_file(adapter_dir)
    wf = WeightsFile(wfile)
    try:
        layout = module_keys(config, wf)
        if wf.is_safetensors:
            data = wf.read_data()
            h = hashlib.sha256()
            h.update(len(config_bytes).to_bytes(8, "little"))
            h.update(config_bytes)
            h.update(wf.head)
            h.update(data)
            start = wf.data_start

            def get(key: str) -> torch.Tensor:
                return wf.tensor(key, data, start)
        else:
            get = wf.get
        modules: dict[tuple[int, str], LoraModuleWeights] = {}
        for key, roles in layout.items():
            path = roles["A"].module_path
            opt = {role: get(roles[role].key) for role in ("magnitude", "bias") if role in roles}
            modules[key] = LoraModuleWeights(
                lora_a=get(roles["A"].key), lora_b=get(roles["B"].key), scaling=config.scaling_for(path),
                module_path=path, **opt,
            )
        keys = wf.keys()
        if wf.is_safetensors:
            digest, facts = h.hexdigest(), header_facts(config_bytes, wf.head, wf.size)
        else:
            loaded = {roles[role].key: t for (key, roles), m in zip(layout.items(), modules.values())
                      for role, t in (("A", m.lora_a), ("B", m.lora_b), ("magnitude", m.magnitude), ("bias", m.bias))
                      if t is not None}
            loaded.update({f"\0key:{k}": torch.empty(0) for k in keys})  # every name in the file counts too
            digest = _digest(config_bytes, loaded)
            facts = header_facts(config_bytes, repr(sorted((k, m.dtype, m.shape) for k, m in wf.meta.items())).encode(), 0)
        real = wf.real_path
    finally:
        wf.close()
    return LoraAdapter(
        name=name or adapter_dir.name, path=adapter_dir, config=config, modules=modules,
        weights_file=wfile, all_keys=tuple(keys),
        fingerprint=AdapterFingerprint(digest, (config_real, real), facts),
    )


def check_servable(
    adapter: LoraAdapter | Any, *, allow_dora: bool = False, check_values: bool = True, dtype: torch.dtype = torch.bfloat16,
    target: SlotTarget | None = None,
) -> None:
    """Raise AdapterError naming every reason the engine cannot serve `adapter`: the one function that
    refuses (registration, first load, `LoraSlots.check`); the rules are `servable_problems` (config,
    names, shapes, dtypes, and with `target` the fit to those slots) and `engine.adapters.limits` (values).

    With `check_values` (needs the tensors: a LoraAdapter, not a header-only manifest), also refuses
    NaN/Inf values, values that overflow when cast to the serving `dtype`, and a scaling or LoRA gain
    beyond the limits of `engine.adapters.limits` (one cheap pass over the weights), so a broken or
    hostile adapter never reaches a slot.
    """
    problems = servable_problems(adapter, allow_dora=allow_dora, target=target)
    if check_values and all(t.is_floating_point() for m in adapter.modules.values() for t in m.tensors()):
        problems += value_problems(adapter.modules, dtype)  # (integer tensors: refused above, by dtype)
    if problems:
        raise AdapterError(f"adapter {adapter.name!r} cannot be served: " + "; ".join(p.message for p in problems),
                           hint=next((p.hint for p in problems if p.hint), None))


def value_problems(modules: Mapping[tuple[int, str], Any], dtype: Any) -> list[Problem]:
    """NaN/Inf, overflow in `dtype`, scaling and gain beyond `engine.adapters.limits` (first offender)."""
    bad = [f"layer {layer} {mod}" for (layer, mod), m in modules.items() if not all(all_finite(t) for t in m.tensors())]
    if bad:
        return [Problem(f"NaN/Inf values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")]
    for (layer, mod), m in modules.items():
        issue = module_value_issue(m.lora_a, m.lora_b, m.scaling, dtype)
        if issue:  # the first one says enough; the others are usually the same
            return [Problem(f"layer {layer} {mod}: {issue}")]
    return []

