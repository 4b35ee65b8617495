"""Which base checkpoint tensor a PEFT module path refers to, for any architecture.

PEFT names modules by their path in the transformers model (`model.layers.0.self_attn.q_proj`,
`transformer.h.0.attn.c_attn`); checkpoints may carry the same names or drop/add a leading
prefix (old GPT-2 files say `h.0.attn.c_attn.weight`). So a name is matched against the base's
own key set: exactly, then with leading segments dropped on either side, and only a unique
match counts. No torch import.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.adapters.keys import strip_prefix

# Input-embedding weight names across families, used to find what a tied lm_head shares.
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")
LM_HEAD = "lm_head.weight"
_MAX_DROP = 3  # leading segments that may differ between the adapter's and the checkpoint's names


def _drop(key: str, n: int) -> str | None:
    parts = key.split(".")
    return ".".join(parts[n:]) if n < len(parts) - 1 else None


class BaseKeys:
    """Resolve adapter-side tensor names to the base checkpoint's names."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)
        self._by_suffix: dict[str, set[str]] = {}
        for k in self.keys:
            for n in range(1, _MAX_DROP + 1):
                s = _drop(k, n)
                if s is not None:
                    self._by_suffix.setdefault(s, set()).add(k)

    def resolve(self, name: str) -> str | None:
        """The base key for `name` (e.g. "transformer.h.0.attn.c_attn.weight"), or None."""
        if name in self.keys:
            return name
        hits = self._by_suffix.get(name, set())  # the checkpoint adds a prefix
        if len(hits) == 1:
            return next(iter(hits))
        for n in range(1, _MAX_DROP + 1):  # the checkpoint drops a prefix
            s = _drop(name, n)
            if s is None:
                break
            if s in self.keys:
                return s
        return None

    def input_embedding(self) -> str | None:
        """The unique input-embedding weight key, if the checkpoint has one."""
        hits = [k for k in self.keys if any(k == e or k.endswith("." + e) for e in INPUT_EMBEDDINGS)]
        return hits[0] if len(hits) == 1 else None


def full_tensor_target(adapter_key: str) -> str | None:
    """The model parameter name a non-LoRA adapter tensor replaces, or None if it is not one.

    `base_model.model.lm_head.weight` (modules_to_save, as PEFT saves it),
    `...lm_head.modules_to_save.default.weight` (older files), `...embed_tokens.base_layer.weight`
    (saved embedding layers), `...q_proj.base_layer.bias` (bias="lora_only"/"all").
    """
    parts = strip_prefix(adapter_key).split(".")
    if parts[-1] not in ("weight", "bias"):
        return None
    out: list[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p == "modules_to_save":
            i += 2 if i + 2 < len(parts) else 1  # skip the adapter name too, if there is one
            continue
        if p in ("base_layer", "original_module"):
            i += 1
            continue
        out.append(p)
        i += 1
    return ".".join(out)
