"""Writing the output: a streaming safetensors writer and an all-or-nothing output directory.

The writer knows every tensor's name, dtype and shape up front (the merge never changes shapes),
so it writes the header first and then each tensor's bytes as soon as it is computed: memory
holds one tensor at a time, not a shard. The file is byte-for-byte the safetensors format
(8-byte little-endian header length, JSON header padded with spaces to 8 bytes, data).

`Staging` writes into a hidden temporary directory next to `--out` (same filesystem, so the final
rename is atomic) and removes it on any failure or interrupt: a failed merge leaves no `--out`.
A merge killed outright (SIGKILL, power loss) cannot clean up, so each staging directory holds a
lock file that its merge keeps `flock`ed (and names its pid); `clean_stale_staging` removes the
staging directories next to `--out` whose lock is free (their merge is gone: the kernel drops the
lock with the process) and touches nothing else: not our name pattern, no lock file, a symlink,
or a lock still held by a running merge means "leave it".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
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


STAGING_RE = re.compile(r"^\..+\.mlora-merge-[0-9a-f]{8}$")
LOCK_NAME = ".mlora-merge.lock"


def _try_lock(fd: int) -> bool:
    """Take an exclusive flock without waiting; False if another process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def clean_stale_staging(parent: Path) -> list[Path]:
    """Remove staging directories in `parent` left by merges that were killed; returns them."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not STAGING_RE.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        lock = Path(entry.path) / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue  # no lock file (or not a plain file): not provably ours, leave it
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not _try_lock(fd):
                continue  # a live merge holds it
            if os.lstat(lock).st_ino != st.st_ino:
                continue  # the lock file changed under us: leave it
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


class Staging:
    """A temporary directory next to `out`; `publish()` renames it into place (replacing `out`).

    While it exists it holds LOCK_NAME, flocked by this process (see `clean_stale_staging`)."""

    def __init__(self, out: Path) -> None:
        self.out = out.expanduser().absolute()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = self.out.parent / f".{self.out.name}.mlora-merge-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir()
        self._lock_fd: int | None = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        _try_lock(self._lock_fd)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())

    def _unlock(self) -> None:
        """Drop the lock file (unlinked while still locked, so no cleaner can take it meanwhile)."""
        if self._lock_fd is None:
            return
        try:
            (self.dir / LOCK_NAME).unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def publish(self) -> None:
        (self.dir / LOCK_NAME).unlink(missing_ok=True)  # not part of the output; still flocked via the fd
        try:
            self._publish()
        finally:
            self._unlock()

    def _publish(self) -> None:
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
        self._unlock()
