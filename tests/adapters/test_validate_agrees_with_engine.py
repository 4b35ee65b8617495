"""`mlora validate` says what the engine will do: it fails what registration refuses (with the same
reason) and does not warn about a base that is the adapter's own (the shipped demo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
