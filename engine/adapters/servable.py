"""What the engine cannot serve, and why: decided from the config and the tensor names alone.

A slot holds, per decoder layer and module, one A [r, in], one B [out, r] and one scaling.
Anything else an adapter carries (full replacement weights, embedding LoRA, biases, DoRA
magnitudes, a base model that training rewrote) would be silently dropped or applied wrongly,
so it is flagged here with the reason and what to do instead.
"""

from __future__ import annotations

from typing import Iterable

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


def servability_issues(config: AdapterConfig, keys: Iterable[str]) -> list[tuple[str, str]]:
    """(status, message) for each feature of the adapter the engine cannot serve as-is.

    status is "fail" (cannot be served correctly) or "warn" (served with a caveat, or only by an
    engine with extra support). An empty list means plain LoRA on q/k/v/o/gate/up/down.
    """
    issues: list[tuple[str, str]] = []
    init = _init_issue(config.init_lora_weights)
    if init:
        issues.append(init)

    has_magnitude = has_lora_bias = False
    lora_paths: set[str] = set()  # decoder modules with lora_A/lora_B
    magnitude_paths: set[str] = set()  # decoder modules with a DoRA magnitude vector
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
            magnitude_paths.add(lk.module_path)
        elif lk.role in ("A", "B"):
            lora_paths.add(lk.module_path)
        elif lk.role == "bias":
            has_lora_bias = True

    if config.use_dora or has_magnitude:
        unscaled = sorted(lora_paths - magnitude_paths)
        if unscaled:  # the engine's slots refuse this too (LoraSlots.check), with the same reason
            more = f" and {len(unscaled) - 2} more" if len(unscaled) > 2 else ""
            issues.append(("fail", f"use_dora is set but some modules have no lora_magnitude_vector ({', '.join(unscaled[:2])}{more}): "
                                   "DoRA cannot be applied without it; re-save the adapter with PEFT"))
        else:
            issues.append(("warn", DORA_WARNING))
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
