"""`validate_adapter`: named pass/warn/fail checks that say whether an adapter is servable and why.

Checks run in stages; a check whose inputs could not be read is left out (its cause is
already a failed check), every other check still runs, and nothing a file contains can make
this raise: hostile or truncated files become "fail" checks with a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.adapters.base import BaseDims, read_base_dims
from engine.adapters.config import SERVABLE_MODULES, AdapterConfig, parse_adapter_config
from engine.adapters.files import WeightsFile, find_weights_file, read_adapter_config_json, resolve_adapter_dir
from engine.adapters.keys import parse_lora_key
from engine.adapters.limits import MAX_LORA_GAIN, all_finite, lora_gain, module_value_issue
from engine.adapters.loader import check_module_shapes
from engine.adapters.servable import SERVE_DTYPES, lora_shape_issue, servability_issues
from engine.errors import AdapterError, MloraError

STATUSES = ("pass", "warn", "fail")
# Display order of the named checks in `mlora validate` (table and --json): the adapter itself first, then
# what serving it needs, then its fit to a base model, then an internal error last.
CHECK_ORDER = (
    "config", "required_fields", "rank", "max_rank", "weights_file", "lora_pairs", "shapes", "dtype", "finite",
    "magnitude", "target_modules", "servable", "base_config", "base_modules", "base_dims", "base_layers", "base_name", "internal",
)
@dataclass(frozen=True)
class Check:
    """One named check: status is "pass", "warn" or "fail"; message says what to do about it."""

    name: str
    status: str
    message: str


@dataclass
class ValidationReport:
    """All checks for one adapter plus a summary (`adapter`) of what was read."""

    path: str
    checks: list[Check] = field(default_factory=list)
    adapter: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        """No check failed (warnings allowed)."""
        return all(c.status != "fail" for c in self.checks)

    def add(self, name: str, status: str, message: str) -> None:
        assert status in STATUSES, status
        self.checks.append(Check(name, status, message))

    def verdict(self) -> str:
        """One line: valid/invalid, with the failed or warned check names."""
        fails = [c.name for c in self.checks if c.status == "fail"]
        warns = [c.name for c in self.checks if c.status == "warn"]
        if fails:
            return f"invalid: {len(fails)} check(s) failed ({', '.join(fails)})"
        tail = f" with {len(warns)} warning(s) ({', '.join(warns)})" if warns else ""
        return f"valid{tail}: {self.path} can be served"

    def to_json(self) -> dict[str, Any]:
        """The `mlora validate --json` document."""
        return {
            "valid": self.valid,
            "checks": [{"name": c.name, "status": c.status, "message": c.message} for c in self.checks],
            "adapter": self.adapter,
        }


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _first(items: list[str], k: int = 3) -> str:
    return "; ".join(items[:k]) + (f"; and {len(items) - k} more" if len(items) > k else "")


def validate_adapter(
    path: str | Path, *, base: str | Path | None = None, max_lora_rank: int | None = None, dtype: str = "bfloat16"
) -> ValidationReport:
    """Run every check on the adapter at `path` (directory or hub id); never raises for bad files.

    `dtype` is the serving dtype the values are checked in (finite after the cast, bounded gain);
    bfloat16 by default, whose range is the narrower of bf16 and fp32.
    """
    report = ValidationReport(path=str(path))
    try:
        _run(report, path, base, max_lora_rank, getattr(torch, dtype))
    except MloraError as exc:  # defensive: every stage catches its own errors
        report.add("internal", "fail", exc.message)
    except Exception as exc:  # noqa: BLE001 - a hostile file must never crash validate
        report.add("internal", "fail", f"unexpected {type(exc).__name__} while validating: {str(exc)[:200]}")
    report.checks.sort(key=lambda c: CHECK_ORDER.index(c.name))
    return report


def _run(report: ValidationReport, path: str | Path, base: str | Path | None, max_lora_rank: int | None,
         dtype: torch.dtype) -> None:
    adapter_dir: Path | None
    try:
        adapter_dir = resolve_adapter_dir(path)
    except AdapterError as exc:
        report.add("config", "fail", exc.message)
        return

    # --- config -----------------------------------------------------------------------------
    config: AdapterConfig | None = None
    raw_ok = False
    try:
        raw = read_adapter_config_json(adapter_dir)
        raw_ok = True
        report.add("config", "pass", "adapter_config.json is present and valid JSON")
    except AdapterError as exc:
        report.add("config", "fail", exc.message + " (PEFT's save_pretrained writes it next to the weights)")
    if raw_ok:
        try:
            config = parse_adapter_config(raw)
            tm = config.target_modules
            shown = tm if isinstance(tm, str) else list(tm or ())
            report.add("required_fields", "pass", f"peft_type LORA, r={config.r}, lora_alpha={config.lora_alpha}, target_modules={shown}")
        except AdapterError as exc:
            report.add("required_fields", "fail", exc.message)
    rank_ok = False
    if config is not None:
        bad = {k: v for k, v in config.rank_pattern.items() if v <= 0}
        if config.r <= 0 or bad:
            report.add("rank", "fail", f"r must be > 0, got r={config.r}" + (f", rank_pattern {bad}" if bad else ""))
        else:
            rank_ok = True
            report.add("rank", "pass", f"r={config.r}" + (f", rank_pattern {config.rank_pattern}" if config.rank_pattern else ""))

    # --- weights ----------------------------------------------------------------------------
    wf: WeightsFile | None = None
    try:
        wf = WeightsFile(find_weights_file(adapter_dir))
        total = sum(m.nbytes for m in wf.meta.values())
        report.add("weights_file", "pass", f"{wf.path.name}: {len(wf.meta)} tensors, {_fmt_bytes(total)}")
    except AdapterError as exc:
        report.add("weights_file", "fail", exc.message)

    lora_paths: dict[str, dict[str, str]] = {}  # module_path -> role -> key (all LoRA keys, servable or not)
    if wf is not None:
        for k in wf.keys():
            lk = parse_lora_key(k)
            if lk is not None and not lk.role.startswith("embedding"):
                lora_paths.setdefault(lk.module_path, {})[lk.role] = k
        _check_pairs(report, lora_paths)
        if config is not None and rank_ok:
            _check_shapes(report, config, wf, lora_paths)
        _check_dtype(report, wf, lora_paths)
        if _check_finite(report, wf, dtype) and config is not None and rank_ok:
            _check_magnitude(report, config, wf, lora_paths, dtype)
    if config is not None and wf is not None:
        _check_targets(report, config, lora_paths)
    if config is not None:
        _check_max_rank(report, config, wf, lora_paths, max_lora_rank, rank_ok)
        issues = servability_issues(config, wf.keys() if wf is not None else ())
        if issues:
            worst = "fail" if any(s == "fail" for s, _ in issues) else "warn"
            report.add("servable", worst, " | ".join(m for _, m in issues))
        else:
            report.add("servable", "pass", "plain LoRA on decoder linears: servable in a slot")
    report.adapter = _summary(config, wf, lora_paths)

    if base is not None:
        _check_base(report, config, wf, lora_paths, base)


def _check_pairs(report: ValidationReport, lora_paths: dict[str, dict[str, str]]) -> None:
    if not lora_paths:
        report.add("lora_pairs", "fail", "the weights file holds no lora_A/lora_B tensors: is this a LoRA adapter saved by PEFT?")
        return
    missing = [f"{p} has lora_{'A' if 'A' in r else 'B'} but no lora_{'B' if 'A' in r else 'A'}"
               for p, r in sorted(lora_paths.items()) if ("A" in r) != ("B" in r)]
    missing += [f"{p} has only {sorted(r)}" for p, r in sorted(lora_paths.items()) if "A" not in r and "B" not in r]
    if missing:
        report.add("lora_pairs", "fail", f"unpaired LoRA tensors: {_first(missing)} (the file is incomplete; re-save it)")
    else:
        report.add("lora_pairs", "pass", f"every lora_A has its lora_B ({len(lora_paths)} modules)")


def _check_shapes(report: ValidationReport, config: AdapterConfig, wf: WeightsFile, lora_paths: dict[str, dict[str, str]]) -> None:
    problems: list[str] = []
    dims: dict[str, set[tuple[int, int]]] = {}
    for p, roles in sorted(lora_paths.items()):
        if "A" not in roles or "B" not in roles:
            continue  # reported by lora_pairs
        shapes = {role: wf.shape(k) for role, k in roles.items()}
        msg = check_module_shapes(config, p, shapes)
        if not msg and (issue := lora_shape_issue(shapes["A"][0], shapes["A"][1], shapes["B"][0])):
            msg = f"{p}: {issue}"  # the engine's registration refuses it too (servable_problems)
        if msg:
            problems.append(msg)
            continue
        lk = parse_lora_key(roles["A"])
        if lk is not None and lk.module is not None:
            dims.setdefault(lk.module, set()).add((shapes["A"][1], shapes["B"][0]))
    for mod, seen in sorted(dims.items()):
        if len(seen) > 1:
            problems.append(f"{mod}: in/out features differ between layers {sorted(seen)}")
    if problems:
        report.add("shapes", "fail", f"{_first(problems)}")
    elif any("A" in r and "B" in r for r in lora_paths.values()):
        report.add("shapes", "pass", "lora_A [r, in] and lora_B [out, r] agree with r/rank_pattern for every module")


def _check_dtype(report: ValidationReport, wf: WeightsFile, lora_paths: dict[str, dict[str, str]]) -> None:
    keys = [k for roles in lora_paths.values() for k in roles.values()]
    dtypes = sorted({wf.meta[k].dtype for k in keys})
    if not dtypes:
        return
    bad = [d for d in dtypes if d not in SERVE_DTYPES]
    if bad:
        report.add("dtype", "fail", f"LoRA tensors are {', '.join(bad)}: only float32/float16/bfloat16 adapters are served "
                                    "(quantised adapters must be dequantised first)")
    elif "float64" in dtypes or len(dtypes) > 1:
        report.add("dtype", "warn", f"LoRA tensors are {', '.join(dtypes)}: they will be cast to the engine's lora dtype")
    else:
        report.add("dtype", "pass", dtypes[0])


def _check_finite(report: ValidationReport, wf: WeightsFile, dtype: torch.dtype) -> bool:
    """No NaN/Inf in any float tensor, in the file's dtype and after the cast to `dtype`; True = pass."""
    bad: list[str] = []
    over: list[str] = []
    name = str(dtype).replace("torch.", "")
    try:
        for k, m in wf.meta.items():
            if not (m.dtype.startswith("float") or m.dtype.startswith("bfloat")) or 0 in m.shape:
                continue
            t = wf.get(k)
            if not all_finite(t):
                n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                bad.append(f"{k} ({n_nan} NaN, {n_inf} Inf)")
            elif t.dtype != dtype and not all_finite(t.to(dtype)):
                over.append(f"{k} ({int(torch.isinf(t.to(dtype)).sum())} values, max |x| {float(t.abs().max()):.3g})")
    except AdapterError as exc:
        report.add("finite", "fail", exc.message)
        return False
    if bad:
        report.add("finite", "fail", f"non-finite values in {_first(bad)}: training diverged or the file is corrupt")
    elif over:
        report.add("finite", "fail", f"values overflow to Inf when cast to the serving dtype {name}: {_first(over)}; "
                                     "the file is corrupt or hostile")
    else:
        report.add("finite", "pass", f"no NaN or Inf in any tensor, also after the cast to {name}")
    return not bad and not over


def _check_magnitude(report: ValidationReport, config: AdapterConfig, wf: WeightsFile,
                     lora_paths: dict[str, dict[str, str]], dtype: torch.dtype) -> None:
    """Scaling and LoRA gain within `engine.adapters.limits` for every module (the engine's own rule)."""
    worst, problems = 0.0, []
    try:
        for p, roles in sorted(lora_paths.items()):
            if "A" not in roles or "B" not in roles or check_module_shapes(config, p, {r: wf.shape(k) for r, k in roles.items()}):
                continue  # reported by lora_pairs / shapes
            a, b, scaling = wf.get(roles["A"]), wf.get(roles["B"]), config.scaling_for(p)
            if not (a.is_floating_point() and b.is_floating_point()):
                continue  # reported by dtype
            issue = module_value_issue(a, b, scaling, dtype)
            if issue:
                problems.append(f"{p}: {issue}")
            else:
                worst = max(worst, lora_gain(a.to(dtype), b.to(dtype), scaling))
    except AdapterError as exc:
        report.add("magnitude", "fail", exc.message)
        return
    if problems:
        report.add("magnitude", "fail", _first(problems, 1) + (" module(s)" if len(problems) > 1 else ""))
    elif worst or lora_paths:
        report.add("magnitude", "pass", f"largest LoRA gain {worst:.3g} (limit {MAX_LORA_GAIN:.0e}); scaling within limits")


def _check_targets(report: ValidationReport, config: AdapterConfig, lora_paths: dict[str, dict[str, str]]) -> None:
    untargeted = sorted(p for p in lora_paths if not config.targets(p))
    if untargeted:
        report.add("target_modules", "fail",
                   f"weights have LoRA for {_first(untargeted)} which target_modules/layers_to_transform do not select: "
                   "config and weights disagree (mixed-up files?)")
        return
    tm = config.target_modules
    present = {p.rsplit(".", 1)[-1] for p in lora_paths}
    if isinstance(tm, tuple):
        unused = [t for t in tm if t not in present and not any(p.endswith("." + t) or p == t for p in lora_paths)]
        if unused:
            report.add("target_modules", "warn", f"target_modules lists {unused} but the weights have no LoRA for them")
            return
    report.add("target_modules", "pass", f"every LoRA module is selected by target_modules ({', '.join(sorted(present))})")


def _effective_max_rank(config: AdapterConfig, wf: WeightsFile | None, lora_paths: dict[str, dict[str, str]]) -> int:
    ranks = [config.max_rank]
    if wf is not None:
        ranks += [wf.shape(r["A"])[0] for r in lora_paths.values() if "A" in r and len(wf.shape(r["A"])) == 2]
    return max(ranks)


def _check_max_rank(report: ValidationReport, config: AdapterConfig, wf: WeightsFile | None,
                    lora_paths: dict[str, dict[str, str]], max_lora_rank: int | None, rank_ok: bool) -> None:
    if not rank_ok:
        return
    eff = _effective_max_rank(config, wf, lora_paths)
    src = "" if eff == config.r else " (via rank_pattern)" if eff == config.max_rank else " (from the weights)"
    if max_lora_rank is None:
        report.add("max_rank", "pass", f"max rank {eff}{src}; no --max-lora-rank given")
    elif eff > max_lora_rank:
        report.add("max_rank", "fail", f"max rank {eff}{src} exceeds --max-lora-rank {max_lora_rank}: "
                                       f"serve with --max-lora-rank {eff} or higher, or retrain at a lower rank")
    else:
        report.add("max_rank", "pass", f"max rank {eff}{src} <= --max-lora-rank {max_lora_rank}")


def _summary(config: AdapterConfig | None, wf: WeightsFile | None, lora_paths: dict[str, dict[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rank": None, "alpha": None, "scaling": None, "target_modules": None,
                           "num_params": None, "size_bytes": None, "dtype": None}
    if config is not None:
        out.update(alpha=config.lora_alpha, target_modules=config.target_modules if isinstance(config.target_modules, str)
                   else list(config.target_modules or ()))
        if config.r > 0:
            out.update(rank=_effective_max_rank(config, wf, lora_paths), scaling=config.default_scaling)
    if wf is not None and lora_paths:
        keys = [k for roles in lora_paths.values() for k in roles.values()]
        numel = [m.nbytes // max(1, _itemsize(m.dtype)) for m in (wf.meta[k] for k in keys)]
        out.update(num_params=sum(numel), size_bytes=sum(wf.meta[k].nbytes for k in keys),
                   target_modules=sorted({p.rsplit(".", 1)[-1] for p in lora_paths}))
        dtypes = sorted({wf.meta[k].dtype for k in keys})
        out["dtype"] = dtypes[0] if len(dtypes) == 1 else ",".join(dtypes)
    return out


def _itemsize(dtype: str) -> int:
    try:
        return torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    except (AttributeError, TypeError):
        return 1


def _check_base(report: ValidationReport, config: AdapterConfig | None, wf: WeightsFile | None,
                lora_paths: dict[str, dict[str, str]], base: str | Path) -> None:
    try:
        dims: BaseDims = read_base_dims(base)
        report.add("base_config", "pass", f"{dims.source}: {dims.model_type}, {dims.num_layers} layers, hidden {dims.hidden}")
    except MloraError as exc:
        report.add("base_config", "fail", exc.message)
        return
    if wf is not None:
        # Names that exist in a Llama-family model (embed_tokens/lm_head exist but are not slot-servable:
        # the servable check says so); anything else means the adapter was made for another architecture.
        known = set(dims.module_names) | {"embed_tokens", "lm_head"}
        leaves = {p.rsplit(".", 1)[-1] for p in lora_paths}
        if config is not None and isinstance(config.target_modules, tuple):
            leaves |= {t.rsplit(".", 1)[-1] for t in config.target_modules}
        missing = sorted(leaves - known)
        if missing:
            report.add("base_modules", "fail", f"{missing} do not exist in {dims.model_type} (its LoRA-able linears are "
                                               f"{', '.join(SERVABLE_MODULES)}): the adapter is for a different architecture")
        else:
            report.add("base_modules", "pass", f"every targeted module exists in {dims.model_type}")
        mism, out_of_range = [], []
        decoder = []
        for roles in lora_paths.values():
            lk = parse_lora_key(next(iter(roles.values())))
            if lk is not None and lk.layer is not None:
                decoder.append((lk.layer, SERVABLE_MODULES.index(lk.module), lk, roles))
        for _, _, lk, roles in sorted(decoder, key=lambda t: t[:2]):
            if lk.layer >= dims.num_layers:
                out_of_range.append(lk.layer)
            if "A" in roles and "B" in roles:
                a, b = wf.shape(roles["A"]), wf.shape(roles["B"])
                want_in, want_out = dims.module_shape(lk.module)
                if len(a) == 2 and len(b) == 2 and (a[1], b[0]) != (want_in, want_out):
                    mism.append(f"layer {lk.layer} {lk.module}: adapter {a[1]}->{b[0]}, base {want_in}->{want_out}")
        if mism:
            report.add("base_dims", "fail", f"in/out features do not match the base: {_first(mism)} (adapter trained for another model)")
        else:
            report.add("base_dims", "pass", "every module's in/out features match the base")
        if out_of_range:
            report.add("base_layers", "fail", f"adapter has layer index {max(out_of_range)} but the base has only "
                                              f"{dims.num_layers} layers (0..{dims.num_layers - 1}): adapter is for a deeper model")
        else:
            report.add("base_layers", "pass", f"all layer indices < num_hidden_layers ({dims.num_layers})")
    if config is not None:
        named = config.base_model_name_or_path
        if not named:
            report.add("base_name", "pass", "adapter does not name its base model")
        elif dims.same_name(named):
            report.add("base_name", "pass", f"adapter was trained on {named}")
        else:
            report.add("base_name", "warn", f"adapter was trained on {named!r}, validating against {dims.name!r}: "
                                            "shapes can match while weights differ; make sure this is the intended base")


def validation_failures(path: str, *, base: str | None, max_lora_rank: int | None, dtype: str = "bfloat16") -> list[str]:
    """Why a runtime load of `path` is refused, as `name: message` per failed `mlora validate` check
    (empty: servable). The full check, values included, for the server's 400 answer."""
    report = validate_adapter(path, base=base, max_lora_rank=max_lora_rank, dtype=dtype)
    return [f"{c.name}: {c.message}" for c in report.checks if c.status == "fail"]
