"""Registering an adapter without reading its tensors: config + safetensors header, checked and fingerprinted.

A safetensors file starts with an 8-byte length and a JSON header naming every tensor's dtype,
shape and byte range; `read_manifest` reads only that (and adapter_config.json), through the same
checked descriptors as a full load (`engine.adapters.files`), so registering 1,000 adapters costs
1,000 small reads. Everything the servability rules can decide without values is decided from it
(`servable_problems` with a `SlotTarget`: config, key names, shapes, ranks, dtypes, target modules).

What only the values can tell (finite, magnitude bounds) and the content digest come at the first
full load, which must find the same `facts` (config bytes + header bytes + file size) and the same
real files that registration saw, else the adapter is refused as changed. After that first load
the digest rules every re-read (`engine.lora.manager`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.adapters.config import AdapterConfig
from engine.adapters.files import WeightsFile, find_weights_file, resolve_adapter_dir
from engine.adapters.loader import AdapterFingerprint, header_facts, module_keys, read_config
from engine.adapters.servable import ModuleShape, config_reasons


@dataclass
class AdapterManifest:
    """What registration knows about an adapter: its config, every tensor's name/dtype/shape, and
    a header-level fingerprint (`fingerprint.digest` is None until the first full load)."""

    name: str
    path: Path
    config: AdapterConfig
    shapes: dict[tuple[int, str], ModuleShape]
    weights_file: Path
    all_keys: tuple[str, ...] = field(default=(), repr=False)
    fingerprint: AdapterFingerprint | None = field(default=None, repr=False)
    size_bytes: int = 0  # bytes of tensor data the first load will read
    header_only: bool = True  # the adapter cache keeps nothing of it in the CPU tier

    @property
    def dora(self) -> bool:
        return bool(self.config.use_dora) or any(s.has_magnitude for s in self.shapes.values())

    def module_shapes(self) -> dict[tuple[int, str], ModuleShape]:
        return self.shapes

    def unservable_reasons(self, *, allow_dora: bool = False) -> list[str]:
        return config_reasons(self.config, self.all_keys, allow_dora=allow_dora)


def read_manifest(path_or_hub_id: str | Path, *, name: str | None = None) -> AdapterManifest | None:
    """The manifest of a safetensors adapter (None for a legacy .bin, which has no header to read
    alone: load it in full). AdapterError for anything unreadable or malformed at header level."""
    adapter_dir = resolve_adapter_dir(path_or_hub_id)
    config, config_bytes, config_real = read_config(adapter_dir)
    wfile = find_weights_file(adapter_dir)
    if not os.fspath(wfile).endswith(".safetensors"):
        return None
    wf = WeightsFile(wfile)  # one open: header bytes and real path from one checked descriptor
    try:
        layout = module_keys(config, wf)
        shapes: dict[tuple[int, str], ModuleShape] = {}
        for key, roles in layout.items():
            a, b = wf.meta[roles["A"].key], wf.meta[roles["B"].key]
            extra = [wf.meta[roles[r].key].dtype for r in ("magnitude", "bias") if r in roles]
            shapes[key] = ModuleShape(a.shape[0], a.shape[1], b.shape[0], (a.dtype, b.dtype, *extra),
                                      "magnitude" in roles, "bias" in roles)
        fp = AdapterFingerprint(None, (config_real, wf.real_path), header_facts(config_bytes, wf.head, wf.size))
        return AdapterManifest(
            name=name or adapter_dir.name, path=adapter_dir, config=config, shapes=shapes, weights_file=wfile,
            all_keys=tuple(wf.keys()), fingerprint=fp, size_bytes=wf.size - wf.data_start,
        )
    finally:
        wf.close()
