"""Per-request adapter composition: y = W x + sum_i w_i * s_i * B_i A_i x (no torch, no I/O).

One owner for "what does this request compose": `normalize` turns every accepted spelling (a name,
[(name, weight), ...], [{"name": ..., "weight": ...}, ...], "a:0.7,b:0.5") into a tuple of
(name, weight) pairs with weights finite and at most `MAX_WEIGHT` in magnitude, zero weights dropped,
names unique and at most K pairs.
Aliases (`--lora-compose NAME=a:0.7,b:0.5`) resolve to such a tuple before the engine sees them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.errors import ConfigError
from engine.numbers import finite_number

DEFAULT_MAX_COMPONENTS = 4  # K: (lora_slot, weight) pairs one request may carry
# |w_i| at most this. A weight multiplies its adapter's delta: the adapter's own numbers are held to a LoRA
# gain of at most 1e6 (engine.adapters.limits.MAX_LORA_GAIN; trained adapters: about 10-1e3), so a
# weight of 1e3 keeps a trained adapter's weighted delta within that limit, and the weight is a finite
# number in every serving dtype (fp16 ends at 65504). A weight like 1e300 is inf in fp32 and a weight
# like 1e30 overflows the activations it scales: either would end the request with non-finite logits.
MAX_WEIGHT = 1000.0

Composition = tuple[tuple[str, float], ...]


def parse_spec(spec: str) -> Composition:
    """"style:0.7,domain:0.5" -> (("style", 0.7), ("domain", 0.5)); a name without ":w" has weight 1."""
    pairs: list[tuple[str, Any]] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            raise ConfigError(f"empty component in composition {spec!r}", hint="write NAME=a:0.7,b:0.5")
        name, sep, w = part.rpartition(":")
        if not sep:
            name, w = part, "1"
        try:
            weight = float(w)
        except ValueError:
            raise ConfigError(f"weight {w!r} of {name!r} in composition {spec!r} is not a number") from None
        pairs.append((name.strip(), weight))
    return normalize(pairs, max_components=None)


def parse_alias(text: str) -> tuple[str, Composition]:
    """"NAME=style:0.7,domain:0.5" -> ("NAME", (("style", 0.7), ("domain", 0.5)))."""
    name, sep, spec = str(text).partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"composition {text!r} must look like NAME=adapter:weight,adapter:weight")
    return name.strip(), parse_spec(spec)


def normalize(value: Any, *, max_components: int | None = DEFAULT_MAX_COMPONENTS) -> Composition:
    """Every accepted spelling of a composition -> ((name, weight), ...); ConfigError (400) when bad."""
    if isinstance(value, str):
        items: list[Any] = [(value, 1.0)]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"adapters must be a list of {{name, weight}} entries, got {type(value).__name__}")
    out: list[tuple[str, float]] = []
    for item in items:
        if isinstance(item, Mapping):
            extra = set(item) - {"name", "weight"}
            if extra:
                raise ConfigError(f"unknown field(s) in an adapters entry: {', '.join(sorted(map(str, extra)))}")
            name, weight = item.get("name"), item.get("weight", 1.0)
        elif isinstance(item, str):
            name, weight = item, 1.0
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, weight = item
        else:
            raise ConfigError(f"an adapters entry must be a name, (name, weight) or {{name, weight}}, got {item!r}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"an adapters entry needs a non-empty adapter name, got {name!r}")
        weight = _weight(name, weight)
        if any(n == name for n, _ in out):
            raise ConfigError(f"adapter {name!r} appears twice in one composition", hint="give it one weight")
        if weight != 0:  # a weight of 0 drops the component
            out.append((name, float(weight)))
    if max_components is not None and len(out) > max_components:
        raise ConfigError(f"a request may compose at most {max_components} adapters, got {len(out)}",
                          hint="the engine option max_adapters_per_request sets this limit")
    return tuple(out)


def _weight(name: str, weight: Any) -> float:
    """`weight` as a float in [-MAX_WEIGHT, MAX_WEIGHT], or a ConfigError naming the adapter."""
    if not finite_number(weight):
        got = ("a number with more than 300 digits" if isinstance(weight, int) and not isinstance(weight, bool)
               else repr(weight))  # an int is only too large for a float
        raise ConfigError(f"the weight of adapter {name!r} must be a finite number, got {got}")
    if not abs(weight) <= MAX_WEIGHT:
        raise ConfigError(f"the weight of adapter {name!r} must be between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g}, "
                          f"got {weight:.6g}", hint="a weight scales the adapter's delta; trained adapters are "
                          "composed with weights of about 0.1-2")
    return float(weight)


def is_plain(comp: Composition) -> bool:
    """One component of weight 1: served exactly as a plain single-adapter request."""
    return len(comp) == 1 and comp[0][1] == 1.0
