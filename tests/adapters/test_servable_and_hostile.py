"""What the engine cannot serve is flagged with why (real PEFT adapters where PEFT can build
them), and hostile files never crash `mlora validate`: fail, exit 1, no traceback."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.adapters import load_adapter, validate_adapter
from engine.errors import AdapterError
from mlora_cli.main import app
from tests.adapters.conftest import edit_config
from tests.adapters.test_validate_cli import check, run_validate
from tests.tiny import build_peft_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (LoraConfig kwargs for real PEFT, status of "servable", fragment of its message)
REAL_FEATURES = {
    "dora": (dict(use_dora=True, target_modules=["q_proj"]), "warn", "served only if the engine supports DoRA"),
    "pissa": (dict(init_lora_weights="pissa", target_modules=["q_proj"]), "fail", "PiSSA initialisation rewrote the base weights"),
    "olora": (dict(init_lora_weights="olora", target_modules=["q_proj"]), "fail", "OLoRA initialisation rewrote the base weights"),
    "modules_to_save": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "fail", "modules_to_save ['lm_head']"),
    "embedding_lora": (dict(target_modules=["q_proj", "embed_tokens"]), "fail", "embedding LoRA (lora_embedding_A/B)"),
    "lora_bias": (dict(target_modules=["q_proj"], lora_bias=True), "fail", "lora_bias: LoRA B carries a bias vector"),
    "lm_head_lora": (dict(target_modules=["q_proj", "lm_head"]), "fail", "LoRA on modules mlora has no slots for: lm_head"),
    "base_bias": (dict(target_modules=["q_proj"], bias="all"), "fail", "bias='all'"),
}


@pytest.mark.parametrize("feature", list(REAL_FEATURES))
def test_unservable_features_of_real_peft_adapters_are_flagged(bases, tmp_path, feature):
    kwargs, status, fragment = REAL_FEATURES[feature]
    d = build_peft_adapter(bases["llama"], tmp_path / feature, **kwargs)
    code, doc = run_validate(d)
    c = check(doc, "servable")
    assert c["status"] == status and fragment in c["message"], c
    assert code == (0 if status == "warn" else 1)
    adapter = load_adapter(d)  # readable all the same: the engine decides at registration
    assert (0, "q_proj") in adapter.modules


@pytest.mark.parametrize("init,label", [("loftq", "LoftQ"), ("corda", "CorDA"), ("lora_ga", "LoRA-GA"), ("pissa_niter_4", "PiSSA")])
def test_base_changing_inits_fail_with_why(adapter_copy, init, label):
    edit_config(adapter_copy, init_lora_weights=init)
    code, doc = run_validate(adapter_copy)
    msg = check(doc, "servable")["message"]
    assert code == 1 and f"{label} initialisation rewrote the base weights" in msg and "path_initial_model_for_weight_conversion" in msg


@pytest.mark.parametrize("init", ["gaussian", "eva", "orthogonal", False])
def test_inits_that_leave_the_base_alone_are_servable(adapter_copy, init):
    edit_config(adapter_copy, init_lora_weights=init)
    code, doc = run_validate(adapter_copy)
    assert code == 0 and check(doc, "servable")["status"] == "pass"


def test_variants_that_are_not_plain_lora_fail(adapter_copy):
    edit_config(adapter_copy, alora_invocation_tokens=[5, 6], use_qalora=True)
    code, doc = run_validate(adapter_copy)
    msg = check(doc, "servable")["message"]
    assert code == 1 and "alora_invocation_tokens is set" in msg and "use_qalora is set" in msg


# --- hostile files ---------------------------------------------------------------------------


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def _pickle_bomb(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()
    _Boom.marker = str(d / "PWNED")
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Boom()}))


def _huge_header_len(d: Path) -> None:
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")


def _huge_tensor_claim(d: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 2**64]}}).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


def _offsets_disagree(d: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4]}}).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)


def _symlink_loop(d: Path) -> None:
    (d / "adapter_config.json").unlink()
    os.symlink("loop_b", d / "adapter_config.json")
    os.symlink("adapter_config.json", d / "loop_b")


def _fifo_weights(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()
    os.mkfifo(d / "adapter_model.safetensors")


HOSTILE = {
    "pickle_bomb_bin": (_pickle_bomb, "weights_file", "could not be loaded safely (weights_only)"),
    "huge_header_length": (_huge_header_len, "weights_file", "claims a 4611686018427387904-byte header"),
    "huge_tensor_claim": (_huge_tensor_claim, "weights_file", "is truncated: tensor 'w' ends at byte 18446744073709551725"),
    "offsets_disagree_with_shape": (_offsets_disagree, "weights_file", "claims 4 bytes but shape [2, 2] of F32 needs 16"),
    "symlink_loop_config": (_symlink_loop, "config", "Too many levels of symbolic links"),
    "binary_garbage_config": (lambda d: (d / "adapter_config.json").write_bytes(os.urandom(64) + b"\xff"), "config", "not UTF-8"),
    "deeply_nested_config": (lambda d: (d / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000), "config", "nested too deeply"),
    "config_is_a_list": (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "required_fields", "must hold a JSON object"),
    "config_is_a_dir": (lambda d: ((d / "adapter_config.json").unlink(), (d / "adapter_config.json").mkdir()), "config", "is a directory"),
    "fifo_weights": (_fifo_weights, "weights_file", "not a regular file"),
    "empty_weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(b""), "weights_file", "not even the 8-byte header"),
    "bad_regex_targets": (lambda d: edit_config(d, target_modules="(q_proj"), "required_fields", "not a valid regular expression"),
    "pattern_not_a_dict": (lambda d: edit_config(d, rank_pattern=[1, 2]), "required_fields", "'rank_pattern' must be an object"),
    "bool_rank": (lambda d: edit_config(d, r=True), "required_fields", "'r' must be an integer"),
    # JSON allows integers of any length: past 4300 digits json.loads raises a plain ValueError, and a 400-digit
    # lora_alpha is "finite" yet overflows alpha / r; both once escaped as an internal error.
    "5000_digit_integer_in_config": (
        lambda d: (d / "adapter_config.json").write_text((d / "adapter_config.json").read_text()[:-1] + ', "x": ' + "9" * 5000 + "}"),
        "config", "is not valid JSON: Exceeds the limit (4300 digits)"),
    "400_digit_lora_alpha": (lambda d: edit_config(d, lora_alpha=10**400), "required_fields", "'lora_alpha' must be a number"),
    "400_digit_alpha_pattern": (lambda d: edit_config(d, alpha_pattern={"q_proj": 10**400}), "required_fields",
                                "alpha_pattern['q_proj']' must be a number"),
    "5000_digit_integer_in_safetensors_header": (
        lambda d: (d / "adapter_model.safetensors").write_bytes((lambda h: struct.pack("<Q", len(h)) + h)(b'{"x": ' + b"9" * 5000 + b"}")),
        "weights_file", "its header is not valid JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_fail_cleanly(adapter_copy, case):
    make, name, fragment = HOSTILE[case]
    make(adapter_copy)
    code, doc = run_validate(adapter_copy)
    assert code == 1
    c = check(doc, name)
    assert c["status"] == "fail" and fragment in c["message"], c
    assert not any(c["name"] == "internal" for c in doc["checks"])
    with pytest.raises(AdapterError):
        load_adapter(adapter_copy)
    assert not (adapter_copy / "PWNED").exists()  # the pickle's payload never ran


def test_hostile_directory_via_the_console_script_has_no_traceback(tmp_path):
    """Everything hostile at once, through the installed `mlora` entry point (subprocess)."""
    d = tmp_path / "hostile"
    d.mkdir()
    (d / "adapter_config.json").write_bytes(b"\x00\x9f\x92\x96 binary")
    _Boom.marker = str(d / "PWNED")
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Boom()}))
    res = subprocess.run([sys.executable, "-m", "mlora_cli.main", "validate", str(d)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 1
    assert "Traceback" not in res.stdout + res.stderr
    assert "invalid: 2 check(s) failed (config, weights_file)" in res.stdout
    assert not (d / "PWNED").exists()


def test_validate_adapter_never_raises_on_any_single_byte_truncation_point(llama_adapter, tmp_path):
    """Cut the safetensors file at many offsets (inside the prefix, header and data): always a clean fail."""
    data = (llama_adapter / "adapter_model.safetensors").read_bytes()
    d = tmp_path / "t"
    d.mkdir()
    (d / "adapter_config.json").write_bytes((llama_adapter / "adapter_config.json").read_bytes())
    for cut in sorted({0, 3, 8, 9, 20, 100, len(data) // 2, len(data) - 1}):
        (d / "adapter_model.safetensors").write_bytes(data[:cut])
        report = validate_adapter(d)
        assert not report.valid
        c = [c for c in report.checks if c.name == "weights_file"][0]
        assert c.status == "fail" and ("truncated" in c.message or "not valid JSON" in c.message), (cut, c)


@pytest.mark.parametrize("case", ["5000_digit_integer_in_config", "400_digit_lora_alpha", "5000_digit_integer_in_safetensors_header"])
def test_oversized_integers_are_one_line_errors_in_merge(bases, adapter_copy, tmp_path, case):
    """`mlora merge` reads the adapter with the same readers: one line, exit 1, no traceback, no output."""
    HOSTILE[case][0](adapter_copy)
    out = tmp_path / "merged"
    res = subprocess.run([sys.executable, "-m", "mlora_cli.main", "merge", "--base", str(bases["llama"]), "--adapter", str(adapter_copy),
                          "--out", str(out)], capture_output=True, text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if k != "MLORA_DEBUG"}, "COLUMNS": "200"})
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr, res.stderr
    assert lines[0].startswith("error: ") and len(lines) <= 2 and "internal error" not in res.stderr, res.stderr
    assert HOSTILE[case][2] in lines[0] and not out.exists()
