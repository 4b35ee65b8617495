"""Is this adapter servable: the rules, and why not (`servable_problems`).

A slot holds, per decoder layer and module, one A [r, in], one B [out, r] and one scaling.
Anything else an adapter carries (full replacement weights, embedding LoRA, biases, DoRA
magnitudes, a base model that training rewrote) would be silently dropped or applied wrongly,
so it is flagged here with the reason and what to do instead.

`servable_problems` decides everything that needs no tensor values, in two levels:
  * config and tensor names (`servability_issues`, also the `servable` check of `mlora validate`);
  * shapes, dtypes and ranks (`lora_shape_issue`: no zero-sized tensors, rank <= `MAX_LORA_RANK`),
    and with a `SlotTarget` the fit to the slots that will hold it:
    what registration checks from the safetensors header alone (`engine.adapters.manifest`).
The values (finite after the cast to the serving dtype, magnitude bounds) are
`engine.adapters.limits`' rule and need the tensors, so they run at the first full load.
`engine.adapters.check_servable` is the one function that refuses: it asks both and raises;
`LoraSlots.check`, the engine's loads and registration call it. The server's runtime-load
pre-check (`engine.adapters.validate.validation_failures`) reports the same rules as
`mlora validate`'s named checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.adapters.config import BASE_CHANGING_INITS, PLAIN_INITS, SERVABLE_MODULES, AdapterConfig
from engine.adapters.keys import classify_other_key, parse_lora_key

DORA_WARNING = (
    "DoRA (use_dora): served only if the engine supports DoRA (it renormalises every output row with "
    "the base weights); an engine without DoRA support rejects it at registration, and `mlora merge` works either way"
)

# Config fields that switch on LoRA variants whose forward is not `x @ A.T @ B.T * scaling`.
_VARIANT_FIELDS: dict[str, str] = {
    "alora_invocation_tokens": "activated LoRA (applies only after invocation tokens)",
    "use_qalora": "QA-LoRA (pooled quantisation-aware input)",
    "layer_replication": "layer replication (changes the base model's layer stack)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "use_bdlora": "BD-LoRA",
}

_MERGE_HINT = "merge it into the base with `mlora merge` and serve the merged model instead"


def _init_issue(init: bool | str) -> tuple[str, str] | None:
    if isinstance(init, bool):
        return None
    low = init.lower()
    for prefix, label in BASE_CHANGING_INITS.items():
        if low.startswith(prefix):
            return (
                "fail",
                f"init_lora_weights={init!r}: {label} initialisation rewrote the base weights during training "
                f"(W became W - B0@A0{' and was quantised' if prefix == 'loftq' else ''}), so this adapter is only correct on "
                "that modified base; convert it to a plain LoRA with PEFT's "
                "save_pretrained(path_initial_model_for_weight_conversion=...) or " + _MERGE_HINT,
            )
    if low not in PLAIN_INITS:
        return ("warn", f"init_lora_weights={init!r} is not a method mlora knows; if it changed the base weights, outputs will be wrong")
    return None


def dora_magnitude_issue(config: AdapterConfig, keys: Iterable[str]) -> str | None:
    """Why a DoRA adapter (use_dora, or any lora_magnitude_vector) cannot be applied: a LoRA'd linear
    without its magnitude vector (None: fine, or not DoRA). The rule `servability_issues` fails
    (so validate and the engine's slots), and `mlora merge` refuses."""
    lora_paths: set[str] = set()
    magnitude_paths: set[str] = set()
    for key in keys:
        lk = parse_lora_key(key)
        if lk is None or lk.role.startswith("embedding") or lk.layer is None:
            continue
        if lk.role == "magnitude":
            magnitude_paths.add(lk.module_path)
        elif lk.role in ("A", "B"):
            lora_paths.add(lk.module_path)
    unscaled = sorted(lora_paths - magnitude_paths)
    if not (config.use_dora or magnitude_paths) or not unscaled:
        return None
    more = f" and {len(unscaled) - 2} more" if len(unscaled) > 2 else ""
    return (f"use_dora is set but some modules have no lora_magnitude_vector ({', '.join(unscaled[:2])}{more}): "
            "DoRA cannot be applied without it; re-save the adapter with PEFT")


def servability_issues(config: AdapterConfig, keys: Iterable[str]) -> list[tuple[str, str]]:
    """(status, message) for each feature of the adapter the engine cannot serve as-is.

    status is "fail" (cannot be served correctly) or "warn" (served with a caveat, or only by an
    engine with extra support). An empty list means plain LoRA on q/k/v/o/gate/up/down.
    """
    issues: list[tuple[str, str]] = []
    init = _init_issue(config.init_lora_weights)
    if init:
        issues.append(init)

    keys = list(keys)  # read twice (dora_magnitude_issue)
    has_magnitude = has_lora_bias = False
    embedding_paths: set[str] = set()
    foreign_paths: set[str] = set()
    others: dict[str, list[str]] = {}
    for key in keys:
        lk = parse_lora_key(key)
        if lk is None:
            others.setdefault(classify_other_key(key), []).append(key)
        elif lk.role.startswith("embedding"):
            embedding_paths.add(lk.module_path)
        elif lk.layer is None:
            foreign_paths.add(lk.module_path)
        elif lk.role == "magnitude":
            has_magnitude = True
        elif lk.role == "bias":
            has_lora_bias = True

    if config.use_dora or has_magnitude:
        unscaled = dora_magnitude_issue(config, keys)  # the engine's slots refuse this too (LoraSlots.check)
        issues.append(("fail", unscaled) if unscaled else ("warn", DORA_WARNING))
    if config.lora_bias or has_lora_bias:
        issues.append(("fail", "lora_bias: LoRA B carries a bias vector; slots hold only A and B, so the bias would be dropped (" + _MERGE_HINT + ")"))
    if config.bias != "none":
        issues.append(("fail", f"bias={config.bias!r}: training also changed base-model biases; slots cannot carry them ({_MERGE_HINT})"))
    if config.modules_to_save:
        issues.append((
            "fail",
            f"modules_to_save {list(config.modules_to_save)}: the adapter ships full replacement weights for these modules; "
            f"a slot holds only low-rank A/B, so they would be silently ignored ({_MERGE_HINT})",
        ))
    if embedding_paths:
        issues.append((
            "fail",
            f"embedding LoRA (lora_embedding_A/B) on {sorted(embedding_paths)}: mlora applies LoRA only to decoder linears, "
            f"not to token embeddings ({_MERGE_HINT})",
        ))
    if foreign_paths:
        shown = sorted(foreign_paths)
        more = f" and {len(shown) - 4} more" if len(shown) > 4 else ""
        issues.append((
            "fail",
            f"LoRA on modules mlora has no slots for: {', '.join(shown[:4])}{more}; servable modules are the decoder "
            f"linears {', '.join(SERVABLE_MODULES)} (retrain with target_modules limited to them)",
        ))
    for reason, ks in sorted(others.items()):
        if "modules_to_save" in reason and config.modules_to_save:
            continue  # already reported from the config
        if "bias" in reason and config.bias != "none":
            continue
        if "trainable token" in reason and config.raw.get("trainable_token_indices"):
            continue
        issues.append(("fail", f"{len(ks)} tensor(s) such as {ks[0]!r} are {reason}; slots hold only LoRA A/B ({_MERGE_HINT})"))
    for fld, label in _VARIANT_FIELDS.items():
        v = config.raw.get(fld)
        if v not in (None, False, [], {}, ""):
            issues.append(("fail", f"{fld} is set: {label} is not plain LoRA and mlora cannot serve it"))
    if config.fan_in_fan_out:
        issues.append(("warn", "fan_in_fan_out=true is meant for GPT-2-style Conv1D bases; Llama-family linears are nn.Linear, "
                               "for which PEFT (and mlora) ignore it"))
    return issues


# Largest LoRA rank the engine accepts, whatever --max-lora-rank says. A LoRA update B @ A has rank at most
# min(in, out) of its linear, and the widest released models' linears are narrower than this
# (Llama-3.1-405B: hidden 16384); trained ranks are about 4-256. Only a corrupt or hostile file claims more
# (e.g. r = 2**40 with zero-sized tensors, which costs no bytes).
MAX_LORA_RANK = 1 << 16


def lora_shape_issue(rank: int, in_features: int, out_features: int) -> str | None:
    """Why one module's LoRA shapes (A [rank, in], B [out, rank]) cannot be a real adapter (None: they can).
    The one owner of this rule: `servable_problems` (so the engine's registration) and `mlora validate`'s
    `shapes` check both ask it."""
    issues = []
    if 0 in (rank, in_features, out_features):
        issues.append(f"lora_A [{rank}, {in_features}] / lora_B [{out_features}, {rank}] are zero-sized "
                      "(no base linear has 0 features): the file is corrupt or hostile")
    if rank > MAX_LORA_RANK:
        issues.append(f"rank {rank} is beyond the limit of {MAX_LORA_RANK} (LoRA ranks are about 4-256; "
                      "no model's linears are that wide)")
    return "; ".join(issues) or None


# Slots built without the base weights cannot serve DoRA: its norm needs W0.
DORA_UNSUPPORTED = "DoRA adapters need the base weights, and these LoRA slots were built without them"
# Tensor dtypes an adapter file may hold (cast to the engine's lora dtype at load); anything else (int8, ...) is refused.
SERVE_DTYPES = ("float32", "float16", "bfloat16", "float64")


def dtype_issue(dtypes: Iterable[str]) -> str | None:
    """Why LoRA tensors of these dtypes (torch names: "int8", "bool", "float8_e4m3fn", ...) cannot be
    served or merged: only float tensors can (None: all are). `servable_problems` and `mlora merge` ask it;
    validate's `dtype` check applies the same `SERVE_DTYPES`."""
    bad = sorted({d for d in dtypes if d not in SERVE_DTYPES})
    if not bad:
        return None
    return f"LoRA tensors of dtype {', '.join('torch.' + d for d in bad)} (quantised adapters must be dequantised first)"


def config_reasons(config: AdapterConfig, keys: Iterable[str], *, allow_dora: bool) -> list[str]:
    """The failing `servability_issues` (and DoRA when it is not allowed), as messages."""
    return [msg for status, msg in servability_issues(config, keys)
            if status == "fail" or (msg == DORA_WARNING and not allow_dora)]


@dataclass(frozen=True)
class ModuleShape:
    """One LoRA'd linear as the rules see it without its values (from the header or from tensors)."""

    rank: int
    in_features: int
    out_features: int
    dtypes: tuple[str, ...]  # torch dtype names of A, B (and magnitude, bias), e.g. ("float32", "float32")
    has_magnitude: bool = False
    has_bias: bool = False

    @staticmethod
    def of(m: Any) -> "ModuleShape":
        """From a `LoraModuleWeights` (duck-typed: anything with lora_a/lora_b/magnitude/bias tensors)."""
        ts = [t for t in (m.lora_a, m.lora_b, getattr(m, "magnitude", None), getattr(m, "bias", None)) if t is not None]
        return ModuleShape(int(m.lora_a.shape[0]), int(m.lora_a.shape[1]), int(m.lora_b.shape[0]),
                           tuple(str(t.dtype).removeprefix("torch.") for t in ts),
                           getattr(m, "magnitude", None) is not None, getattr(m, "bias", None) is not None)


@dataclass(frozen=True)
class SlotTarget:
    """What the engine's LoRA slots can hold (built by `LoraSlots`)."""

    layers: int
    module_shapes: Mapping[str, tuple[int, int]]  # module -> (in_features, out_features) of the base linear
    max_rank: int
    dora: bool  # built with the base weights (DoRA's norm needs them)


@dataclass(frozen=True)
class Problem:
    """One reason an adapter cannot be served, with what to do about it."""

    message: str
    hint: str | None = None


def servable_problems(adapter: Any, *, allow_dora: bool, target: SlotTarget | None = None) -> list[Problem]:
    """Every reason the engine cannot serve `adapter` that needs no tensor values (empty list: none).

    `adapter`: a `LoraAdapter` or an `AdapterManifest` (anything with `config`, `all_keys` and
    `module_shapes()`). `target`: also check it fits these slots (modules, layers, rank, shapes).
    The values (finite, magnitude) are `engine.adapters.limits`' decision; `check_servable` adds
    them for a loaded adapter and is the one function that refuses.
    """
    config = adapter.config
    shapes: dict[tuple[int, str], ModuleShape] = adapter.module_shapes()
    out: list[Problem] = []
    merge = "merge it into the base with `mlora merge`"
    is_dora = bool(config.use_dora) or any(s.has_magnitude for s in shapes.values())
    if target is not None:
        allow_dora = allow_dora and target.dora
        if is_dora and not target.dora:
            out.append(Problem(DORA_UNSUPPORTED, merge))
    out += [Problem(m) for m in config_reasons(config, adapter.all_keys, allow_dora=allow_dora)
            if not (target is not None and is_dora and not target.dora and m == DORA_WARNING)]
    if not shapes:
        out.insert(0 if target is None else len(out), Problem("it has no LoRA on any decoder q/k/v/o/gate/up/down linear"))
    bad_dtype = dtype_issue(d for s in shapes.values() for d in s.dtypes)
    if bad_dtype:
        out.append(Problem(bad_dtype))
    bad_shape = next(((key, msg) for key, s in shapes.items()
                      if (msg := lora_shape_issue(s.rank, s.in_features, s.out_features))), None)
    if bad_shape:  # the first offender says enough; the others are usually the same
        (layer, module), msg = bad_shape
        out.append(Problem(f"layer {layer} {module}: {msg}"))
    if target is not None:
        out += _slot_problems(shapes, target)
    return out


def _slot_problems(shapes: Mapping[tuple[int, str], ModuleShape], target: SlotTarget) -> list[Problem]:
    """The first way a module does not fit the slots (the others are usually the same)."""
    for (layer, module), s in shapes.items():
        if module not in target.module_shapes:
            what = "embedding LoRA" if module in ("embed_tokens", "lm_head") else f"LoRA on {module!r}"
            return [Problem(f"{what} is not served (slots hold {', '.join(target.module_shapes)})")]
        if not 0 <= layer < target.layers:
            return [Problem(f"layer {layer} does not exist (the base model has {target.layers})")]
        if s.rank > target.max_rank:
            return [Problem(f"rank {s.rank} of layer {layer} {module} exceeds max_lora_rank {target.max_rank}",
                            "restart with a larger --max-lora-rank")]
        in_f, out_f = target.module_shapes[module]
        if (s.in_features, s.out_features) != (in_f, out_f):
            return [Problem(f"layer {layer} {module} has A {(s.rank, s.in_features)} and B {(s.out_features, s.rank)}, "
                            f"but the base model needs A [r, {in_f}] and B [{out_f}, r]",
                            "the adapter was trained for a different base model")]
    return []
