"""Adapters whose numbers would overflow a slot are refused, with the reason, by `mlora validate`
(a named failing check, exit 1) and at registration (AdapterError; the server answers 400), while
the demo adapters and PEFT-made adapters pass the bound by orders of magnitude."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.adapters import check_servable, load_adapter
from engine.adapters.limits import MAX_LORA_GAIN, lora_gain
from engine.errors import AdapterError
from engine.loader import demo_adapters
from tests.adapters.test_validate_cli import check, run_validate


def _scale_b(d: Path, factor: float, dtype: torch.dtype | None = None) -> None:
    p = d / "adapter_model.safetensors"
    sd = load_file(str(p))
    for k in list(sd):
        t = sd[k].to(dtype) if dtype is not None else sd[k]
        sd[k] = t * factor if "lora_B" in k else t
    save_file(sd, str(p), metadata={"format": "pt"})


def _alpha(d: Path, alpha: float) -> None:
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["lora_alpha"] = alpha
    p.write_text(json.dumps(cfg))


# kind -> (how to poison a copy of `upper`, the failing check, a fragment of its message)
POISONS = {
    "fp32_B_x1e30": (lambda d: _scale_b(d, 1e30), "magnitude", "LoRA gain"),
    "f64_B_x1e300": (lambda d: _scale_b(d, 1e300, torch.float64), "finite", "to Inf when cast to the serving dtype bfloat16"),
    "alpha_1e30": (lambda d: _alpha(d, 1e30), "magnitude", "scaling (lora_alpha / r) is 2.5e+29"),
    "alpha_1e308": (lambda d: _alpha(d, 1e308), "magnitude", "scaling (lora_alpha / r) is 2.5e+307"),
    "alpha_inf": (lambda d: _alpha(d, float("inf")), "required_fields", "'lora_alpha' must be a number, got inf"),
    "alpha_nan": (lambda d: _alpha(d, float("nan")), "required_fields", "'lora_alpha' must be a number, got nan"),
    "fp32_B_x1e8": (lambda d: _scale_b(d, 1e8), "magnitude", "beyond the limit of 1e+06"),  # finite, still hostile
}


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    dst = tmp_path / "upper"
    shutil.copytree(dict(demo_adapters())["upper"], dst)
    return dst


@pytest.mark.parametrize("kind", list(POISONS))
def test_mlora_validate_fails_the_named_check_with_the_reason(upper, kind):
    poison, name, fragment = POISONS[kind]
    poison(upper)
    code, doc = run_validate(upper)
    c = check(doc, name)
    assert code == 1 and not doc["valid"]
    assert c["status"] == "fail" and fragment in c["message"], c


@pytest.mark.parametrize("kind", list(POISONS))
def test_registration_refuses_with_the_reason(upper, kind):
    poison, _, fragment = POISONS[kind]
    poison(upper)
    with pytest.raises(AdapterError) as exc:  # unreadable config (inf/NaN alpha) or refused values
        check_servable(load_adapter(upper), dtype=torch.float32)
    assert fragment.replace("bfloat16", "float32") in str(exc.value)


@pytest.mark.parametrize("name", ["upper", "reverse", "rot13"])
def test_demo_adapters_pass_by_orders_of_magnitude(name):
    path = dict(demo_adapters())[name]
    code, doc = run_validate(path)
    assert code == 0 and check(doc, "magnitude")["status"] == "pass"
    adapter = load_adapter(path)
    worst = max(lora_gain(m.lora_a, m.lora_b, m.scaling) for m in adapter.modules.values())
    assert worst * 1e3 < MAX_LORA_GAIN
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_servable(adapter, dtype=dtype)


def test_peft_made_adapter_passes(llama_adapter):
    code, doc = run_validate(llama_adapter)
    assert code == 0 and check(doc, "magnitude")["status"] == "pass", check(doc, "magnitude")


def test_fp16_serving_refuses_values_beyond_its_range(upper):
    """Same gain, but B past 65504: servable in fp32/bf16, refused for fp16 slots (checked after the cast)."""
    p = upper / "adapter_model.safetensors"
    sd = load_file(str(p))
    save_file({k: t * (1e7 if "lora_B" in k else 1e-7) for k, t in sd.items()}, str(p), metadata={"format": "pt"})
    adapter = load_adapter(upper)
    assert max(float(m.lora_b.abs().max()) for m in adapter.modules.values()) > 65504
    check_servable(adapter, dtype=torch.float32)
    check_servable(adapter, dtype=torch.bfloat16)
    with pytest.raises(AdapterError, match="lora_B overflows to Inf when cast to the serving dtype float16"):
        check_servable(adapter, dtype=torch.float16)


def test_the_gain_bounds_the_delta_for_any_input():
    """|scaling * B @ A @ x|_inf <= gain * |x|_inf, also for the worst-case x (signs of A's largest row)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = torch.randn(8, 64, generator=g, dtype=torch.float64), torch.randn(32, 8, generator=g, dtype=torch.float64)
        s = 2.0
        gain = lora_gain(a, b, s)
        xs = [torch.randn(64, generator=g, dtype=torch.float64) for _ in range(50)]
        xs.append(torch.sign(a[a.abs().sum(1).argmax()]))
        for x in xs:
            assert float((s * b @ (a @ x)).abs().max()) <= gain * float(x.abs().max()) * (1 + 1e-12)
