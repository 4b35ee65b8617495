"""Reading adapter files defensively: the config JSON, the safetensors header, legacy .bin.

Every function here either returns what it read or raises AdapterError with a one-line reason a
user can act on. Files are treated as hostile: only regular files are read (a FIFO or
/dev/zero symlink cannot hang us), sizes are capped before reading, the safetensors header is
parsed and bounds-checked in Python before the Rust reader memory-maps the file, and `.bin`
files are only ever read with `torch.load(weights_only=True)`.

No check-then-use gaps: each file is opened once (non-blocking, so a FIFO swapped in cannot
block the open), the open descriptor is checked with fstat, and every later read (the header,
the memory map, torch.load) goes through that same descriptor (`/proc/self/fd/N` on Linux), so
what was checked is what is read, even if the path is swapped for a symlink meanwhile.
`real_path(fd)` names the file actually read (for pinning an adapter's files at registration).
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import AdapterError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit

# safetensors dtype tag -> (torch dtype name, bytes per element)
ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class TensorMeta:
    """What the file says about one tensor, before any data is read."""

    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute byte offset of the data in a safetensors file (0 for .bin)

    @property
    def itemsize(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return self.nbytes // numel if numel else 1


def _stat_regular(path: Path, what: str) -> os.stat_result:
    """stat() a path that must be a regular file; AdapterError otherwise (missing, loop, FIFO, dir)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise AdapterError(f"{what} {path} is a broken symlink") from None
        raise AdapterError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise AdapterError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise AdapterError(f"{what} {path} is {kind}")
    return st


def open_regular(path: Path, what: str) -> int:
    """An O_RDONLY descriptor for `path`, which must be a regular file (checked on the open file)."""
    _stat_regular(path, what)  # the friendly messages for missing/broken/loop/dir
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise AdapterError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise AdapterError(f"{what} {path} is not a regular file")
    return fd


def fd_path(fd: int, fallback: Path) -> str:
    """A path that reopens exactly the file behind `fd` (Linux: /proc/self/fd/N), else `fallback`."""
    p = f"/proc/self/fd/{fd}"
    return p if os.path.exists(p) else str(fallback)


def real_path(fd: int, fallback: Path) -> str:
    """The resolved path of the file behind `fd` (what was really opened), else realpath(fallback)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(fallback)


def looks_like_hub_id(s: str) -> bool:
    """`org/name` with no path-like parts; only such strings are ever sent to the Hugging Face Hub."""
    return bool(_HUB_ID.match(s)) and ".." not in s


def resolve_adapter_dir(path_or_hub_id: str | Path) -> Path:
    """A local adapter directory for `path_or_hub_id`.

    A local path wins; a file inside the adapter (e.g. adapter_config.json) means its directory.
    Otherwise an `org/name` id is downloaded with huggingface_hub (config and weights only).
    """
    p = Path(path_or_hub_id).expanduser()
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as exc:
        raise AdapterError(f"adapter path {p} cannot be read: {exc.strerror or exc}") from None
    if exists:
        return p if is_dir else p.parent
    if os.path.lexists(p):
        raise AdapterError(f"adapter path {p} is a broken symlink or a symlink loop")
    s = str(path_or_hub_id)
    if isinstance(path_or_hub_id, str) and looks_like_hub_id(s):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(repo_id=s, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME])
        except Exception as exc:  # noqa: BLE001 - network/auth/not-found: one line for the user
            raise AdapterError(
                f"adapter {s!r} is not a local directory and could not be fetched from the Hugging Face Hub: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        return Path(local)
    raise AdapterError(f"adapter directory not found: {p}")


def read_json_file(path: Path, what: str) -> Any:
    """Decode a small JSON file; AdapterError on missing, oversized, binary or malformed content."""
    return decode_json(read_small_file(path, what)[0], path, what)


def read_small_file(path: Path, what: str) -> tuple[bytes, str]:
    """(bytes, real path) of a small regular file, read through one descriptor and size-capped."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterError(f"{what} {path} is {size} bytes; a config should be a few KB")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise AdapterError(f"{what} {path} grew past {MAX_CONFIG_BYTES} bytes while being read")
        return data, real_path(fd, path)
    except OSError as exc:
        raise AdapterError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def decode_json(data: bytes, path: Path, what: str) -> Any:
    """Decode JSON bytes read from `path`; AdapterError on binary or malformed content."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterError(f"{what} {path} is not valid JSON: it is not UTF-8 text (binary file?)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise AdapterError(f"{what} {path} is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal past Python's 4300-digit limit
        raise AdapterError(f"{what} {path} is not valid JSON: {str(exc).splitlines()[0][:120]}") from None


def read_adapter_config_json(adapter_dir: Path) -> Any:
    """The decoded adapter_config.json of `adapter_dir` (not yet checked for fields)."""
    return read_json_file(adapter_dir / CONFIG_NAME, CONFIG_NAME)


def find_weights_file(adapter_dir: Path) -> Path:
    """adapter_model.safetensors if present, else the legacy adapter_model.bin; AdapterError if neither."""
    for name in (SAFETENSORS_NAME, BIN_NAME):
        p = adapter_dir / name
        if os.path.lexists(p):
            return p
    raise AdapterError(
        f"no weights in {adapter_dir}: expected {SAFETENSORS_NAME} (or a legacy {BIN_NAME})",
        hint="save the adapter with peft's save_pretrained(), which writes adapter_model.safetensors",
    )


def read_safetensors_header(path: Path, fd: int | None = None) -> dict[str, TensorMeta]:
    """Parse and bounds-check a safetensors header without reading tensor data (from `fd`, an
    `open_regular` descriptor of `path`, when given).

    Rejects: files shorter than the length prefix, header lengths past the file end or the
    format's 100 MB limit, non-JSON headers, unknown dtypes, byte ranges that disagree with
    shape x dtype, overlap or gaps, and data that would extend past the end of the file.
    """
    own = fd is None
    if fd is None:
        fd = open_regular(path, path.name)
    try:
        return _parse_safetensors_header(path, fd)[0]
    finally:
        if own:
            os.close(fd)


def _parse_safetensors_header(path: Path, fd: int) -> tuple[dict[str, TensorMeta], bytes, int]:
    """(tensor metadata, the raw bytes before the data: length prefix + header JSON, file size)."""
    size = os.fstat(fd).st_size
    name = path.name
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            f.seek(0)  # the dup shares the descriptor's offset
            prefix = f.read(8)
            if len(prefix) < 8:
                raise AdapterError(f"{name} is truncated: {size} bytes, not even the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise AdapterError(f"{name} has a corrupt header: it claims a {n}-byte header (limit {MAX_HEADER_BYTES})")
            if 8 + n > size:
                raise AdapterError(f"{name} is truncated: the header claims {n} bytes but the file has only {size - 8} after the length prefix")
            raw = f.read(n)
    except OSError as exc:
        raise AdapterError(f"{name} cannot be read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deeply, a 5000-digit integer
        raise AdapterError(f"{name} is not a safetensors file: its header is not valid JSON (corrupt or wrong format)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{name} is not a safetensors file: its header is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, TensorMeta] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise AdapterError(f"{name}: header entry for {key!r} is not an object (corrupt header)")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ST_DTYPES:
            raise AdapterError(f"{name}: tensor {key!r} has unknown dtype {dtype!r} (corrupt header)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise AdapterError(f"{name}: tensor {key!r} has an invalid shape {shape!r} (corrupt header)")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise AdapterError(f"{name}: tensor {key!r} has invalid data_offsets {offs!r} (corrupt header)")
        begin, end = offs
        torch_dtype, itemsize = ST_DTYPES[dtype]
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end or end - begin != numel * itemsize:
            raise AdapterError(
                f"{name}: tensor {key!r} claims {end - begin} bytes but shape {shape} of {dtype} needs {numel * itemsize} (corrupt header)"
            )
        if end > data_len:
            raise AdapterError(
                f"{name} is truncated: tensor {key!r} ends at byte {8 + n + end} but the file has {size} bytes"
            )
        spans.append((begin, end, key))
        out[key] = TensorMeta(torch_dtype, tuple(shape), end - begin, 8 + n + begin)
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            raise AdapterError(f"{name}: tensor {key!r} {'overlaps another' if begin < pos else 'leaves a gap'} in the data buffer (corrupt header)")
        pos = end
    if pos != data_len:
        raise AdapterError(f"{name}: {data_len - pos} stray bytes after the last tensor (corrupt or concatenated file)")
    return out, prefix + raw, size


def load_bin_state_dict(path: Path, fd: int | None = None) -> dict[str, Any]:
    """A legacy adapter_model.bin read with torch.load(weights_only=True): never unpickles code.

    Memory-maps when the file is in torch's zip format; anything that is not a flat
    {str: Tensor} mapping is rejected.
    """
    import torch

    own = fd is None
    if fd is None:
        fd = open_regular(path, path.name)
    src = fd_path(fd, path)
    try:
        try:
            sd = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) serialisation cannot be mmapped
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            sd = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - hostile pickles raise many types; all mean "refused"
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise AdapterError(
            f"{path.name} could not be loaded safely (weights_only): {type(exc).__name__}: {first}",
            hint="convert the adapter to adapter_model.safetensors with peft's save_pretrained()",
        ) from None
    finally:
        if own:
            os.close(fd)
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise AdapterError(f"{path.name} does not hold a state dict of named tensors")
    return sd


class WeightsFile:
    """Uniform access to adapter_model.safetensors or a legacy .bin: names, shapes and dtypes from
    metadata; tensor data only when asked for.

    Safetensors data is read with pread() from the one descriptor opened (and checked) at
    construction into memory the tensor owns - never a view of a memory map: a map would make a
    file rewritten in place change weights already loaded (and validated and hashed), and a file
    truncated in place SIGBUS the server. A short read is an AdapterError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        fd = open_regular(path, path.name)  # one open: header, data and real_path see one file
        try:
            self.real_path = real_path(fd, path)
            self.head = b""  # safetensors: the bytes before the data (length prefix + header JSON)
            self.size = 0  # safetensors: the file size the header was checked against
            if path.name.endswith(".safetensors") or path.name == SAFETENSORS_NAME:
                self.meta: dict[str, TensorMeta]
                self.meta, self.head, self.size = _parse_safetensors_header(path, fd)
                self._sd = None
                self._fd, fd = fd, -1  # kept for get(); closed by close() / garbage collection
            else:
                self._sd = load_bin_state_dict(path, fd)
                self.meta = {
                    k: TensorMeta(str(v.dtype).removeprefix("torch."), tuple(v.shape), v.numel() * v.element_size())
                    for k, v in self._sd.items()
                }
        finally:
            if fd >= 0:
                os.close(fd)

    def keys(self) -> list[str]:
        return list(self.meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.meta[key].shape

    def get(self, key: str) -> "torch.Tensor":
        if self._sd is not None:
            return self._sd[key].clone()  # own memory, not the .bin's map
        m = self.meta[key]
        buf = bytearray(m.nbytes)
        self._pread(buf, m.offset, f"tensor {key!r}")
        return self.tensor(key, buf, m.offset)

    @property
    def is_safetensors(self) -> bool:
        return self._sd is None

    def read_data(self) -> bytearray:
        """Every tensor's bytes (safetensors: the whole data buffer after the header) in ONE read,
        into memory the caller owns; slice it with `tensor(key, data, self.data_start)`."""
        assert self._sd is None, "read_data is for safetensors files"
        buf = bytearray(self.size - len(self.head))
        self._pread(buf, len(self.head), "the tensor data")
        return buf

    @property
    def data_start(self) -> int:
        return len(self.head)

    def tensor(self, key: str, buf: bytearray, start: int) -> "torch.Tensor":
        """Tensor `key` as a view of `buf`, which holds the file's bytes from offset `start` on."""
        import torch

        m = self.meta[key]
        dtype = getattr(torch, m.dtype)
        if not m.nbytes:
            return torch.empty(m.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype, count=m.nbytes // m.itemsize, offset=m.offset - start).reshape(m.shape)

    def _pread(self, buf: bytearray, offset: int, what: str) -> None:
        """Fill `buf` from the checked descriptor at `offset`; a short read is an AdapterError."""
        assert self._fd is not None, "WeightsFile was closed"
        view, got, total = memoryview(buf), 0, len(buf)
        try:
            while got < total:
                n = os.preadv(self._fd, [view[got : got + (1 << 30)]], offset + got)
                if n <= 0:
                    raise AdapterError(f"{self.path.name}: {what} cannot be read: the file shrank while being read")
                got += n
        except OSError as exc:
            raise AdapterError(f"{self.path.name}: {what} cannot be read: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
