"""ServerConfig: the one frozen configuration object of `mlora serve` (checked in __post_init__)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import EngineConfig
from engine.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """Everything the HTTP layer needs, plus the engine's own config.

    `api_key` (None = open) guards every /v1 route; /health, /ping, /version and /metrics stay open. An empty or
    blank key is an error, not an open server (an empty MLORA_API_KEY must not disable auth).
    `allow_runtime_lora` enables POST /v1/load_lora_adapter and /v1/unload_lora_adapter and needs
    `adapter_root`, which confines their paths after resolving symlinks ("/" = anywhere, explicitly).
    `lora_dir` (with `allow_runtime_lora`) is vLLM's filesystem LoRA resolver: a request for an
    unregistered adapter NAME that exists as `lora_dir/NAME` loads it; it must lie inside `adapter_root`.
    `grace_period` is how long SIGINT/SIGTERM waits for in-flight requests before aborting them.
    `port=0` binds a free port (the bound URL is reported to `on_ready`).

    Bounds on what one client can make the server do (each a 4xx, never a stall for the others):
    `max_seqs_per_request` caps prompts x n of one request; `max_body_bytes` the request body (413);
    `header_timeout` how long a connection may take to send its request headers or sit idle between
    requests (then it is closed); `body_timeout` how long the body may take to arrive (408);
    `trust_request_chat_template` lets clients send their own chat template (refused by default).
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_runtime_lora: bool = False
    adapter_root: str | None = None
    grace_period: float = 10.0
    retry_after_s: int = 1
    max_seqs_per_request: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    trust_request_chat_template: bool = False
    lora_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in 0..65535, got {self.port!r}")
        if self.grace_period < 0:
            raise ConfigError(f"grace_period must be >= 0 seconds, got {self.grace_period}")
        for name in ("max_seqs_per_request", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty (--api-key or MLORA_API_KEY): that would leave the server open",
                              hint="give a non-empty key, or unset MLORA_API_KEY to serve without one")
        if self.allow_runtime_lora and self.adapter_root is None:
            raise ConfigError("--allow-runtime-lora needs --adapter-root: the directory runtime adapters must come from",
                              hint="e.g. --adapter-root ./adapters (--adapter-root / allows any path)")
        if self.adapter_root is not None:
            root = os.path.realpath(os.path.expanduser(self.adapter_root))
            if not os.path.isdir(root):
                raise ConfigError(f"--adapter-root {self.adapter_root!r} is not a directory")
            object.__setattr__(self, "adapter_root", root)
        if self.lora_dir is not None:
            lora_dir = os.path.realpath(os.path.expanduser(self.lora_dir))
            object.__setattr__(self, "lora_dir", lora_dir)
            if self.allow_runtime_lora and self.adapter_root != os.sep and os.path.commonpath(
                    [lora_dir, self.adapter_root]) != self.adapter_root:
                raise ConfigError(f"--lora-dir {lora_dir!r} is outside --adapter-root {self.adapter_root!r}: "
                                  "adapters loaded on demand from it would escape the root",
                                  hint="put the directory inside --adapter-root, or point --adapter-root at it")


def adapters_in_dir(directory: str, *, flag: str = "lora_dir") -> tuple[tuple[str, str], ...]:
    """((name, path), ...) for every subdirectory of `directory` holding adapter_config.json, named after
    it and sorted: a directory of adapters as one adapter source (`mlora serve --lora-dir`)."""
    from engine.config import ADAPTER_NAME_RULE, valid_adapter_name

    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{flag} {directory!r} is not a directory")
    found = sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file())
    if not found:
        raise ConfigError(f"{flag} {directory!r} has no adapter directories (subdirectories with adapter_config.json)")
    for p in found:
        if not valid_adapter_name(p.name):
            raise ConfigError(f"{flag}: adapter directory name {p.name!r} is not allowed: use {ADAPTER_NAME_RULE}")
    return tuple((p.name, str(p)) for p in found)


def servable_adapters_in_dir(directory: str, *, base: str | None, max_lora_rank: int,
                             flag: str = "--lora-dir") -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """`adapters_in_dir`, minus the adapters the validate library refuses: (servable, one warning per
    skipped adapter). One broken adapter in a directory of many must not keep the others from being served."""
    from engine.adapters import validate_adapter

    good, skipped = [], []
    for name, path in adapters_in_dir(directory, flag=flag):
        report = validate_adapter(path, base=base, max_lora_rank=max_lora_rank)
        fails = [f"{c.name}: {c.message}" for c in report.checks if c.status == "fail"]
        if fails:
            skipped.append(f"{flag}: skipping adapter {name!r} ({path}): {'; '.join(fails)}"[:500])
        else:
            good.append((name, path))
    return tuple(good), skipped
