"""LoRARequest: vLLM's per-request adapter handle, for `LLM.generate(..., lora_request=...)`. No torch.

Mirrors `vllm.lora.request.LoRARequest`: positional order `lora_name, lora_int_id, lora_path`,
ids >= 1, equality and hash by name. The offline `LLM` registers `lora_path` under `lora_name`
the first time a request names it (validated like any adapter); see `LLM.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError


@dataclass(eq=False)
class LoRARequest:
    """Serve a request with the adapter at `lora_path`, registered as `lora_name`.

    `lora_int_id` must be >= 1 and name one adapter: vLLM keys its adapter cache by it, so mlora
    refuses an id reused for another name, and a name reused for another path.
    `base_model_name` is informational, as in vLLM.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ConfigError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ConfigError(f"lora_int_id must be an integer > 0, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ConfigError(f"lora_path of LoRARequest {self.lora_name!r} is empty",
                              hint="give the adapter's directory (or Hub id) as the third argument")  # fmt: skip
        self.lora_path = str(self.lora_path)

    # vLLM's accessors
    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
