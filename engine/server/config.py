"""ServerConfig: the one frozen configuration object of `mlora serve` (checked in __post_init__)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """Everything the HTTP layer needs, plus the engine's own config.

    `api_key` (None = open) guards every /v1 route; /health and /metrics stay open.
    `allow_runtime_lora` enables POST /v1/load_lora_adapter and /v1/unload_lora_adapter;
    `adapter_root` (None = anywhere) confines their paths after resolving symlinks.
    `grace_period` is how long SIGINT/SIGTERM waits for in-flight requests before aborting them.
    `port=0` binds a free port (the bound URL is reported to `on_ready`).
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_runtime_lora: bool = False
    adapter_root: str | None = None
    grace_period: float = 10.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in 0..65535, got {self.port!r}")
        if self.grace_period < 0:
            raise ConfigError(f"grace_period must be >= 0 seconds, got {self.grace_period}")
        if self.api_key is not None and not self.api_key.strip():
            object.__setattr__(self, "api_key", None)
        if self.adapter_root is not None:
            root = os.path.realpath(os.path.expanduser(self.adapter_root))
            if not os.path.isdir(root):
                raise ConfigError(f"--adapter-root {self.adapter_root!r} is not a directory")
            object.__setattr__(self, "adapter_root", root)
