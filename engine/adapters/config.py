"""`adapter_config.json` as PEFT writes it, parsed strictly, plus PEFT's own matching rules.

The matching rules (`pattern_key`, `targets_module`) are re-implementations of PEFT's
`get_pattern_key` and `check_target_module_exists` (peft/utils/other.py, peft/tuners/tuners_utils.py)
so that per-module rank, alpha and targeting agree with what PEFT did when it trained the adapter.
No torch import: config checks run in milliseconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from engine.planning.budget import LORA_MODULES
from engine.errors import AdapterError
from engine.numbers import finite_number

# The linear layers of a Llama-family decoder layer that the engine serves LoRA on (budget's list).
SERVABLE_MODULES: tuple[str, ...] = LORA_MODULES

# init_lora_weights values whose initialisation rewrote the BASE weights (W <- W - B0 A0 or a
# quantised/decomposed W). The saved adapter only works on top of that modified base.
BASE_CHANGING_INITS: dict[str, str] = {
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "corda": "CorDA",
    "loftq": "LoftQ",
    "lora_ga": "LoRA-GA",
}
# init_lora_weights values that only initialise A/B (the base is untouched): servable.
PLAIN_INITS: frozenset[str] = frozenset({"true", "false", "gaussian", "eva", "orthogonal", "mica"})


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT `LoraConfig` that decide how an adapter is applied.

    `raw` keeps the whole JSON object so checks can look at fields mlora does not model.
    """

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str | None
    peft_type: str = "LORA"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] | None = None
    init_lora_weights: bool | str = True
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def max_rank(self) -> int:
        """The largest rank any module may have: max(r, *rank_pattern.values()), as PEFT computes it."""
        return max([self.r, *self.rank_pattern.values()])

    @property
    def default_scaling(self) -> float:
        """Scaling of a module not matched by any pattern: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return scaling(self.lora_alpha, self.r, self.use_rslora)

    def rank_alpha_for(self, module_key: str) -> tuple[int, float]:
        """(r, alpha) PEFT gives the module named `module_key` (e.g. "model.layers.3.self_attn.q_proj")."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module_key), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module_key), self.lora_alpha)
        return r, alpha

    def scaling_for(self, module_key: str) -> float:
        """Effective scaling of one module, honouring rank_pattern, alpha_pattern and use_rslora."""
        r, alpha = self.rank_alpha_for(module_key)
        return scaling(alpha, r, self.use_rslora)

    def targets(self, module_key: str) -> bool:
        """Whether PEFT would have put a LoRA on `module_key` under this config."""
        return targets_module(self, module_key)


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's LoraLayer.update_layer: alpha / sqrt(r) with rsLoRA, alpha / r otherwise."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def pattern_key(pattern_keys: Sequence[str] | Mapping[str, Any], key_to_match: str) -> str:
    """PEFT's `get_pattern_key`: the first pattern whose regex matches a dotted suffix of the key.

    Returns `key_to_match` itself when nothing matches (so `.get(result, default)` falls back).
    """
    for key in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({key})$", key_to_match):
                return key
        except re.error:
            continue  # an invalid pattern never matches (parse_adapter_config reports it)
    return key_to_match


def _layer_index(config: AdapterConfig, key: str) -> int | None:
    if not config.layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pattern in config.layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def targets_module(config: AdapterConfig, key: str) -> bool:
    """PEFT's `check_target_module_exists` for LoRA: exclude_modules, modules_to_save, target_modules
    (regex string = fullmatch, list = exact name or dotted suffix), then layers_to_transform."""
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return False
        elif key in ex or any(key.endswith(f".{e}") for e in ex):
            return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    tm = config.target_modules
    if tm is None:
        return False
    if isinstance(tm, str):
        if tm == "all-linear":  # PEFT expands this at creation; accept it if a config still says so
            return key.rsplit(".", 1)[-1] in SERVABLE_MODULES
        return re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    if not any(key.endswith(f".{t}") for t in tm):
        return False
    if config.layers_to_transform:
        idx = _layer_index(config, key)
        return idx is not None and idx in config.layers_to_transform
    return True


# ---------------------------------------------------------------------------------------------
# Parsing: strict about types, with messages that name the field and what was found.


def _bad(field_name: str, expected: str, value: Any) -> AdapterError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return AdapterError(f"adapter_config.json: field '{field_name}' must be {expected}, got {shown}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(raw: Mapping[str, Any], name: str, *, allow_str: bool) -> tuple[str, ...] | str | None:
    v = raw.get(name)
    if v is None:
        return None
    if isinstance(v, str):
        if not allow_str:
            return (v,)
        try:
            re.compile(v)
        except re.error as exc:
            raise AdapterError(f"adapter_config.json: '{name}' is not a valid regular expression ({exc})") from None
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return tuple(sorted(set(v))) if name == "target_modules" else tuple(v)
    raise _bad(name, "a list of module names" + (" or a regex string" if allow_str else ""), v)


def _bool(raw: Mapping[str, Any], name: str, default: bool = False) -> bool:
    v = raw.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, "true or false", v)
    return v


def _pattern(raw: Mapping[str, Any], name: str, *, ints: bool) -> dict:
    v = raw.get(name) or {}
    if not isinstance(v, dict):
        raise _bad(name, "an object mapping module-name patterns to numbers", v)
    for k, x in v.items():
        if not (_is_int(x) if ints else finite_number(x)):
            raise _bad(f"{name}[{k!r}]", "an integer" if ints else "a number", x)
        try:
            re.compile(k)
        except re.error as exc:
            raise AdapterError(f"adapter_config.json: {name} key {k!r} is not a valid regular expression ({exc})") from None
    return dict(v)


REQUIRED_FIELDS: tuple[str, ...] = ("peft_type", "r", "lora_alpha", "target_modules")


def parse_adapter_config(raw: Any) -> AdapterConfig:
    """Build an AdapterConfig from the decoded JSON, or raise AdapterError naming the bad field.

    Checks presence and types only; value checks (r > 0, servability) live in the validator so
    that each failure gets its own named check.
    """
    if not isinstance(raw, dict):
        raise AdapterError(f"adapter_config.json must hold a JSON object, got a JSON {type(raw).__name__}")
    missing = [f for f in REQUIRED_FIELDS if raw.get(f) is None]
    if missing:
        raise AdapterError(
            f"adapter_config.json is missing required field(s): {', '.join(missing)} "
            "(PEFT always writes them; re-save the adapter with peft's save_pretrained)"
        )
    peft_type = raw["peft_type"]
    if not isinstance(peft_type, str):
        raise _bad("peft_type", "a string", peft_type)
    if peft_type.upper() != "LORA":
        raise AdapterError(f"adapter_config.json: peft_type is {peft_type!r}; mlora serves only LoRA adapters (peft_type 'LORA')")
    if not _is_int(raw["r"]):
        raise _bad("r", "an integer", raw["r"])
    if not finite_number(raw["lora_alpha"]):
        raise _bad("lora_alpha", "a number", raw["lora_alpha"])
    ltt = raw.get("layers_to_transform")
    if ltt is not None:
        if _is_int(ltt):
            ltt = (ltt,)
        elif isinstance(ltt, list) and all(_is_int(x) for x in ltt):
            ltt = tuple(ltt)
        else:
            raise _bad("layers_to_transform", "an integer or a list of integers", ltt)
    bias = raw.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise _bad("bias", "one of 'none', 'all', 'lora_only'", bias)
    init = raw.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise _bad("init_lora_weights", "true, false or a method name", init)
    base = raw.get("base_model_name_or_path")
    lp = _str_list(raw, "layers_pattern", allow_str=False)
    mts = _str_list(raw, "modules_to_save", allow_str=False)
    return AdapterConfig(
        r=raw["r"],
        lora_alpha=raw["lora_alpha"],
        target_modules=_str_list(raw, "target_modules", allow_str=True),
        peft_type="LORA",
        use_rslora=_bool(raw, "use_rslora"),
        rank_pattern=_pattern(raw, "rank_pattern", ints=True),
        alpha_pattern=_pattern(raw, "alpha_pattern", ints=False),
        layers_to_transform=ltt,
        layers_pattern=lp if isinstance(lp, tuple) else None,
        exclude_modules=_str_list(raw, "exclude_modules", allow_str=True),
        use_dora=_bool(raw, "use_dora"),
        fan_in_fan_out=_bool(raw, "fan_in_fan_out"),
        bias=bias,
        lora_bias=_bool(raw, "lora_bias"),
        modules_to_save=mts if isinstance(mts, tuple) and mts else None,
        init_lora_weights=init,
        base_model_name_or_path=base if isinstance(base, str) else None,
        task_type=raw.get("task_type") if isinstance(raw.get("task_type"), str) else None,
        raw=dict(raw),
    )
