"""`mlora validate` says what the engine will do: it fails what registration refuses (with the same
reason) and does not warn about a base that is the adapter's own (the shipped demo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from engine.demo import DEMO_ADAPTERS, DEMO_MODEL_DIR, DEMO_MODEL_NAME
from engine.errors import AdapterError
from mlora_cli.main import app
from tests.tiny import build_peft_adapter

runner = CliRunner()
SAME_REASON = "use_dora is set but some modules have no lora_magnitude_vector"


def _validate(*args: str | Path) -> tuple[int, dict]:
    res = runner.invoke(app, ["validate", *map(str, args), "--json"])
    return res.exit_code, json.loads(res.stdout)


def _check(doc: dict, name: str) -> dict:
    return next(c for c in doc["checks"] if c["name"] == name)


@pytest.mark.parametrize("drop", ["all", "one"])
def test_dora_without_magnitude_vectors_fails_validate_as_the_engine_refuses_it(bases, tmp_path: Path, drop: str) -> None:
    from engine import LLM

    adapter = build_peft_adapter(bases["llama"], tmp_path / "dora", seed=3, r=4, lora_alpha=8, use_dora=True,
                                 target_modules=["q_proj", "v_proj"])  # fmt: skip
    code, doc = _validate(adapter)
    assert code == 0 and _check(doc, "servable")["status"] == "warn"  # a complete DoRA adapter is served
    weights = adapter / "adapter_model.safetensors"
    sd = load_file(str(weights))
    mags = sorted(k for k in sd if "lora_magnitude_vector" in k)
    for k in mags if drop == "all" else mags[:1]:
        del sd[k]
    save_file(sd, str(weights), metadata={"format": "pt"})

    code, doc = _validate(adapter)
    servable = _check(doc, "servable")
    assert code == 1 and doc["valid"] is False
    assert servable["status"] == "fail" and SAME_REASON in servable["message"]
    with pytest.raises(AdapterError, match=SAME_REASON):
        LLM(str(bases["llama"]), max_loras=1).add_adapter("dora", str(adapter))


@pytest.mark.parametrize("base", [str(DEMO_MODEL_DIR), str(DEMO_MODEL_DIR / "config.json"), DEMO_MODEL_NAME])
def test_demo_adapter_against_the_demo_base_does_not_warn(base: str) -> None:
    for adapter in DEMO_ADAPTERS.values():
        code, doc = _validate(adapter, "--base", base)
        assert code == 0
        assert all(c["status"] == "pass" for c in doc["checks"]), [c for c in doc["checks"] if c["status"] != "pass"]
        assert _check(doc, "base_name")["message"] == f"adapter was trained on {DEMO_MODEL_NAME}"


def test_demo_adapter_against_another_base_still_warns(bases) -> None:
    code, doc = _validate(DEMO_ADAPTERS["upper"], "--base", bases["llama"])
    assert code == 1  # shapes differ from the tiny llama, and the name check says so too
    assert _check(doc, "base_name")["status"] == "warn"


def _reshape_lora(adapter: Path, rank: int, make) -> None:
    """Set r (and lora_alpha) to `rank` and replace every lora_A/lora_B with make(role, old tensor)."""
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(r=rank, lora_alpha=rank)
    cfg_path.write_text(json.dumps(cfg))
    weights = adapter / "adapter_model.safetensors"
    sd = load_file(str(weights))
    save_file({k: make("A" if "lora_A" in k else "B", v) for k, v in sd.items()}, str(weights), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        # r = 2**40 with lora_A [2**40, 0] / lora_B [0, 2**40]: zero bytes, and validate without --base passed it
        ("zero_sized_huge_rank", ("are zero-sized", "beyond the limit of 65536")),
        ("zero_sized", ("are zero-sized",)),
        ("huge_rank", ("rank 131072 is beyond the limit of 65536",)),  # A [2**17, 1], B [1, 2**17]: 1 MiB
    ],
)
def test_zero_sized_or_absurd_rank_fails_validate_without_base_as_the_engine_refuses_it(bases, tmp_path: Path, case, fragments) -> None:
    from engine.adapters import check_servable
    from engine.adapters.manifest import read_manifest

    adapter = build_peft_adapter(bases["llama"], tmp_path / case, r=4, target_modules=["q_proj"])
    rank = {"zero_sized_huge_rank": 2**40, "zero_sized": 4, "huge_rank": 2**17}[case]
    if case == "huge_rank":
        _reshape_lora(adapter, rank, lambda role, v: torch.full((rank, 1) if role == "A" else (1, rank), 1e-3))
    else:
        _reshape_lora(adapter, rank, lambda role, v: torch.empty((rank, 0) if role == "A" else (0, rank)))

    code, doc = _validate(adapter)  # no --base, no --max-lora-rank
    shapes = _check(doc, "shapes")
    assert code == 1 and doc["valid"] is False and shapes["status"] == "fail", doc
    assert all(f in shapes["message"] for f in fragments) and "\n" not in shapes["message"], shapes
    # the engine refuses it from the header alone, by the same rule (servable_problems), even with no slot target
    with pytest.raises(AdapterError) as exc:
        check_servable(read_manifest(adapter), check_values=False)
    assert all(f in exc.value.message for f in fragments), exc.value.message
    res = runner.invoke(app, ["validate", str(adapter)])  # the table: exit 1, the verdict names the check
    assert res.exit_code == 1 and "invalid: 1 check(s) failed (shapes)" in res.stdout
