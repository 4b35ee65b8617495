"""API-key check and adapter-path confinement.

The key guards every route but /health and /metrics (so every /v1 route; OpenAI clients send
`Authorization: Bearer KEY`); those two stay open so probes and Prometheus need no secret. Runtime adapter paths are resolved
with realpath (every symlink followed) and must land inside --adapter-root, and so must every
file the adapter directory holds, so neither `../` nor a symlink, to the directory or to a
file inside it, reaches outside.
"""

from __future__ import annotations

import hmac
import os

from engine.server.protocol import APIError


OPEN_PATHS = frozenset({"/health", "/metrics"})
MAX_ADAPTER_ENTRIES = 1000  # files and directories under one adapter directory (PEFT saves a handful)


def check_api_key(path: str, authorization: str | None, api_key: str | None) -> None:
    """Raise APIError(401) unless `path` is open (/health, /metrics) or the Bearer token equals `api_key`.

    Every other path is guarded, not just /v1/*, so no spelling of a route can slip past.
    """
    if api_key is None or path in OPEN_PATHS:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives (Windows)
        return False


def confine_adapter_path(lora_path: str, adapter_root: str | None) -> str:
    """The path to load, checked against `adapter_root` (already realpath'd; None = no confinement).

    Relative paths are taken relative to the root. Raises APIError(403) when the resolved
    directory, or any file in it, lies outside the root, and 400 when it does not exist.
    """
    if "\x00" in lora_path:
        raise APIError(400, "lora_path must not contain NUL bytes", param="lora_path")
    if adapter_root is None:
        return lora_path
    candidate = os.path.join(adapter_root, os.path.expanduser(lora_path))  # absolute paths replace the root
    resolved = os.path.realpath(candidate)
    if not _inside(resolved, adapter_root):
        raise APIError(403, f"lora_path {lora_path!r} resolves outside the adapter root")
    if not os.path.exists(resolved):
        raise APIError(400, f"lora_path {lora_path!r} does not exist under the adapter root", param="lora_path")
    if adapter_root == os.sep:  # `--adapter-root /`: the operator allowed any path
        return resolved
    if os.path.isdir(resolved):
        seen = 0
        for dirpath, dirnames, filenames in os.walk(resolved):
            seen += len(filenames) + len(dirnames)
            if seen > MAX_ADAPTER_ENTRIES:
                raise APIError(400, f"lora_path {lora_path!r} holds more than {MAX_ADAPTER_ENTRIES} files: "
                                    "not an adapter directory", param="lora_path")
            for name in filenames + dirnames:
                if not _inside(os.path.realpath(os.path.join(dirpath, name)), adapter_root):
                    raise APIError(403, f"lora_path {lora_path!r} holds {name!r}, a link outside the adapter root")
    return resolved
