"""`mlora validate` through the real CLI: each failing check on a corrupted copy of a real PEFT
adapter gives exit 1 and a message naming the problem; valid adapters give exit 0 and the
`mlora validate --json` schema: {valid, checks, adapter}, each check {name, status, message}."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from engine.adapters import load_adapter
from mlora_cli.main import app
from tests.adapters.conftest import edit_config
from tests.tiny import build_peft_adapter, tiny_config

runner = CliRunner()
JSON_KEYS = {"valid", "checks", "adapter"}
SUMMARY_KEYS = {"rank", "alpha", "scaling", "target_modules", "num_params", "size_bytes", "dtype"}
Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q0B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def run_validate(*args: str | Path) -> tuple[int, dict]:
    res = runner.invoke(app, ["validate", *map(str, args), "--json"])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    doc = json.loads(res.stdout)
    assert set(doc) == JSON_KEYS and set(doc["adapter"]) == SUMMARY_KEYS
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "message"} and c["status"] in ("pass", "warn", "fail")
    assert doc["valid"] == (res.exit_code == 0)
    return res.exit_code, doc


def check(doc: dict, name: str) -> dict:
    found = [c for c in doc["checks"] if c["name"] == name]
    assert found, f"no check {name!r} in {[c['name'] for c in doc['checks']]}"
    return found[0]


def rewrite_weights(adapter_dir: Path, fn) -> None:
    p = adapter_dir / "adapter_model.safetensors"
    sd = load_file(str(p))
    fn(sd)
    save_file(sd, str(p), metadata={"format": "pt"})


# --- valid adapters --------------------------------------------------------------------------


def test_valid_adapter_json_summary_matches_the_loaded_adapter(llama_adapter, bases):
    code, doc = run_validate(llama_adapter, "--base", bases["llama"], "--max-lora-rank", "8")
    assert code == 0 and doc["valid"] is True
    assert all(c["status"] == "pass" for c in doc["checks"]), doc["checks"]
    names = [c["name"] for c in doc["checks"]]
    assert names == ["config", "required_fields", "rank", "max_rank", "weights_file", "lora_pairs", "shapes", "dtype",
                     "finite", "magnitude", "target_modules", "servable", "base_config", "base_modules", "base_dims", "base_layers",
                     "base_name"]
    a = load_adapter(llama_adapter)
    assert doc["adapter"] == {
        "rank": 8, "alpha": 16, "scaling": 2.0,
        "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
        "num_params": a.num_params, "size_bytes": a.size_bytes, "dtype": "float32",
    }


def test_human_output_is_a_table_and_a_verdict(llama_adapter, adapter_copy):
    res = runner.invoke(app, ["validate", str(llama_adapter)])
    assert res.exit_code == 0
    assert "required_fields" in res.stdout and "servable" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("valid: ")
    (adapter_copy / "adapter_config.json").unlink()
    res = runner.invoke(app, ["validate", str(adapter_copy)])
    assert res.exit_code == 1
    assert res.stdout.strip().splitlines()[-1] == "invalid: 1 check(s) failed (config)"


def test_usage_errors_exit_2(llama_adapter):
    assert runner.invoke(app, ["validate"]).exit_code == 2
    assert runner.invoke(app, ["validate", str(llama_adapter), "--max-lora-rank", "0"]).exit_code == 2
    assert runner.invoke(app, ["validate", str(llama_adapter), "--max-lora-rank", "x"]).exit_code == 2


# --- each failing check ----------------------------------------------------------------------


CORRUPTIONS = {
    "missing_config": (lambda d: (d / "adapter_config.json").unlink(), "config", "adapter_config.json not found"),
    "invalid_json": (lambda d: (d / "adapter_config.json").write_text('{"r": 8,'), "config", "is not valid JSON"),
    "missing_field": (lambda d: edit_config(d, lora_alpha=...), "required_fields", "missing required field(s): lora_alpha"),
    "wrong_type": (lambda d: edit_config(d, r="8"), "required_fields", "field 'r' must be an integer"),
    "not_lora": (lambda d: edit_config(d, peft_type="IA3"), "required_fields", "serves only LoRA adapters"),
    "zero_rank": (lambda d: edit_config(d, r=0), "rank", "r must be > 0"),
    "missing_weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "weights_file", "no weights in"),
    "truncated": (
        lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:-100]),
        "weights_file", "is truncated: tensor",
    ),
    "header_garbage": (
        lambda d: (d / "adapter_model.safetensors").write_bytes(
            (lambda b: b[:8] + b"\xff\xfe garbage" + b[19:])((d / "adapter_model.safetensors").read_bytes())),
        "weights_file", "header is not valid JSON",
    ),
    "missing_lora_b": (lambda d: rewrite_weights(d, lambda sd: sd.pop(Q0B)), "lora_pairs",
                       "model.layers.0.self_attn.q_proj has lora_A but no lora_B"),
    "wrong_shape": (lambda d: rewrite_weights(d, lambda sd: sd.__setitem__(Q0A, torch.zeros(6, 64))), "shapes",
                    "do not have rank 8"),
    "nan": (lambda d: rewrite_weights(d, lambda sd: sd[Q0B].__setitem__((0, 0), float("nan"))), "finite",
            "1 NaN, 0 Inf"),
    "inf": (lambda d: rewrite_weights(d, lambda sd: sd[Q0A].__setitem__((1, 1), float("inf"))), "finite", "0 NaN, 1 Inf"),
    "int_dtype": (lambda d: rewrite_weights(d, lambda sd: sd.update({k: v.to(torch.int8) for k, v in sd.items()})),
                  "dtype", "LoRA tensors are int8"),
    "config_weights_disagree": (lambda d: edit_config(d, target_modules=["q_proj", "v_proj"]), "target_modules",
                                "which target_modules/layers_to_transform do not select"),
    "layers_disagree": (lambda d: edit_config(d, layers_to_transform=[0]), "target_modules",
                        "model.layers.1.mlp.down_proj"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_each_failing_check_exits_1_with_its_message(adapter_copy, case):
    corrupt, name, fragment = CORRUPTIONS[case]
    corrupt(adapter_copy)
    code, doc = run_validate(adapter_copy)
    assert code == 1 and doc["valid"] is False
    c = check(doc, name)
    assert c["status"] == "fail" and fragment in c["message"], c


def test_rank_too_large_for_max_lora_rank(bases, tmp_path):
    d = build_peft_adapter(bases["qwen2"], tmp_path / "a", r=4, lora_alpha=8, rank_pattern={"down_proj": 16})
    code, doc = run_validate(d, "--max-lora-rank", "8")
    assert code == 1
    assert check(doc, "max_rank")["message"].startswith("max rank 16 (via rank_pattern) exceeds --max-lora-rank 8")
    assert doc["adapter"]["rank"] == 16
    assert run_validate(d, "--max-lora-rank", "16")[0] == 0


def test_wrong_base_dims_and_layer_count(llama_adapter, tmp_path):
    cfg = tmp_path / "wider" / "config.json"
    cfg.parent.mkdir()
    tiny_config("llama", hidden_size=96, num_hidden_layers=1).to_json_file(str(cfg))
    code, doc = run_validate(llama_adapter, "--base", cfg.parent)
    assert code == 1
    assert "layer 0 q_proj: adapter 64->64, base 96->96" in check(doc, "base_dims")["message"]
    assert "layer index 1 but the base has only 1 layers" in check(doc, "base_layers")["message"]
    assert check(doc, "base_name")["status"] == "warn"


def test_different_base_name_with_matching_shapes_is_only_a_warning(llama_adapter, bases, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_bytes((bases["llama"] / "config.json").read_bytes())
    code, doc = run_validate(llama_adapter, "--base", cfg)
    assert code == 0
    c = check(doc, "base_name")
    assert c["status"] == "warn" and "validating against" in c["message"]


def test_unreadable_base_is_a_failed_check(llama_adapter, tmp_path):
    code, doc = run_validate(llama_adapter, "--base", tmp_path / "no-such-model")
    assert code == 1 and "no such model directory" in check(doc, "base_config")["message"]


def test_adapter_for_another_architecture_fails_base_modules(bases, tmp_path):
    """A real PEFT adapter for a tiny GPT-2 (Conv1D c_attn, fan_in_fan_out) checked against the llama base."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.adapters import check_servable
    from engine.errors import AdapterError

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64)).save_pretrained(str(gpt2))
    d = build_peft_adapter(gpt2, tmp_path / "gpt2-lora", target_modules=["c_attn"], fan_in_fan_out=True)
    code, doc = run_validate(d, "--base", bases["llama"])
    assert code == 1
    assert check(doc, "base_modules")["message"].startswith("['c_attn'] do not exist in llama")
    servable = check(doc, "servable")["message"]
    assert "LoRA on modules mlora has no slots for: transformer.h.0.attn.c_attn" in servable
    assert "fan_in_fan_out=true" in servable
    adapter = load_adapter(d)
    assert adapter.modules == {}
    with pytest.raises(AdapterError, match="no LoRA on any decoder q/k/v/o/gate/up/down linear"):
        check_servable(adapter)
