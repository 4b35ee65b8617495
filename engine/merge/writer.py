"""Writing the output: a streaming safetensors writer and an all-or-nothing output directory.

The writer knows every tensor's name, dtype and shape up front (the merge never changes shapes),
so it writes the header first and then each tensor's bytes as soon as it is computed: memory
holds one tensor at a time, not a shard. The file is byte-for-byte the safetensors format
(8-byte little-endian header length, JSON header padded with spaces to 8 bytes, data).

`Staging` writes into a hidden temporary directory next to `--out` (same filesystem, so the final
rename is atomic) and removes it on any failure or interrupt: a failed merge leaves no `--out`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch

from engine.adapters.files import ST_DTYPES
from engine.errors import ConfigError

_TAG = {torch_name: tag for tag, (torch_name, _) in ST_DTYPES.items()}
_ITEMSIZE = {torch_name: size for _, (torch_name, size) in ST_DTYPES.items()}


class StreamingSafetensorsWriter:
    """Write tensors one by one, in the order given to the constructor."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> None:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._expect: list[tuple[str, str, int]] = []
        pos = 0
        for name, dtype, shape in entries:
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * _ITEMSIZE[dtype]
            header[name] = {"dtype": _TAG[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self._expect.append((name, dtype, nbytes))
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.data_bytes = pos
        self.path = path
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append `tensor` (must be the next expected name, dtype and size); returns bytes written."""
        want, dtype, nbytes = self._expect[self._next]
        got = str(tensor.dtype).removeprefix("torch.")
        if name != want or got != dtype or tensor.numel() * tensor.element_size() != nbytes:
            raise RuntimeError(f"writer expected {want} ({dtype}, {nbytes} B), got {name} ({got})")
        if nbytes:
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # raw bytes, no copy
            self._f.write(memoryview(flat.numpy()))
        self._next += 1
        return nbytes

    def close(self) -> None:
        """Finish the file; RuntimeError if a tensor is missing (the file would be unreadable)."""
        self._f.close()
        if self._next != len(self._expect):
            raise RuntimeError(f"{self.path.name}: {len(self._expect) - self._next} tensor(s) were never written")

    def abort(self) -> None:
        """Close without checks (the caller discards the partial file)."""
        self._f.close()


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an --out that exists (unless force, and unless that would delete an input)."""
    out_r = out.expanduser().resolve()
    for p in inputs:
        p_r = p.resolve()
        if _inside(p_r, out_r) or _inside(out_r, p_r):
            raise ConfigError(f"--out {out} overlaps an input ({p}); choose a directory outside the base model and adapters")
    if out.exists() or out.is_symlink():
        if not force:
            raise ConfigError(f"{out} already exists", hint="pass --force to replace it")


class Staging:
    """A temporary directory next to `out`; `publish()` renames it into place (replacing `out`)."""

    def __init__(self, out: Path) -> None:
        self.out = out.expanduser().absolute()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = self.out.parent / f".{self.out.name}.mlora-merge-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir()

    def publish(self) -> None:
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}.mlora-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        try:
            os.replace(self.dir, self.out)
        except OSError:
            if old is not None:
                os.replace(old, self.out)
            raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
