"""`mlora merge` on the command line: errors are one line, exit 1, nothing written; --json; --verify."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.adapters import validate_adapter
from engine.merge import AdapterSpec, MergeConfig
from engine.merge.plan import build_plan
from engine.merge.verify import verify_merge
from tests.merge.conftest import hash_dir, run_cli
from tests.tiny import build_peft_adapter, build_tiny_model


def _one_line_error(code: int, err: str, expected: int = 1) -> str:
    assert code == expected, (code, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and len(lines) <= 2
    return lines[0]


def test_adapter_for_a_different_architecture_is_refused(bases, tmp_path, capsys) -> None:
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", r=4)
    wide = build_tiny_model(tmp_path / "wide", "llama", hidden_size=96, intermediate_size=128)
    out = tmp_path / "out"
    line = _one_line_error(*run_cli("--base", str(wide), "--adapter", str(adapter), "--out", str(out), capsys=capsys)[::2])
    assert "different base model" in line and "[96, 128]" in line
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    gpt2_adapter = build_peft_adapter(bases["gpt2"], tmp_path / "g", r=4, target_modules=["c_attn"])
    line = _one_line_error(*run_cli("--base", str(bases["llama"]), "-a", str(gpt2_adapter), "-o", str(out), capsys=capsys)[::2])
    assert "which the base model does not have" in line and not out.exists()


def test_missing_base_files_are_refused(bases, tmp_path, capsys) -> None:
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", r=4)
    out = tmp_path / "out"
    line = _one_line_error(*run_cli("--base", str(tmp_path / "nope"), "-a", str(adapter), "-o", str(out), capsys=capsys)[::2])
    assert "does not exist" in line
    no_config = tmp_path / "noconfig"
    shutil.copytree(bases["llama"], no_config)
    (no_config / "config.json").unlink()
    line = _one_line_error(*run_cli("--base", str(no_config), "-a", str(adapter), "-o", str(out), capsys=capsys)[::2])
    assert "no config.json" in line
    lost_shard = tmp_path / "lost"
    shutil.copytree(bases["llama"], lost_shard)
    (lost_shard / "model.safetensors").rename(lost_shard / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (lost_shard / "model.safetensors.index.json").write_text(json.dumps(index))
    line = _one_line_error(*run_cli("--base", str(lost_shard), "-a", str(adapter), "-o", str(out), capsys=capsys)[::2])
    assert "model-00002-of-00002.safetensors" in line and "missing" in line
    truncated = tmp_path / "trunc"
    shutil.copytree(bases["llama"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = _one_line_error(*run_cli("--base", str(truncated), "-a", str(adapter), "-o", str(out), capsys=capsys)[::2])
    assert "truncated" in line
    assert not out.exists()


def test_hostile_base_config_is_one_line_error(bases, tmp_path, capsys) -> None:
    """A config.json nested 100,000 deep was an internal RecursionError; a 5000-digit integer printed Python's
    multi-clause ValueError. Both are one line now, and nothing is written."""
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", r=4)
    out = tmp_path / "out"
    for text, fragment in (("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)"),
                           ('{"x": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)")):
        base = tmp_path / "base"
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(bases["llama"], base)
        (base / "config.json").write_text(text)
        line = _one_line_error(*run_cli("--base", str(base), "-a", str(adapter), "-o", str(out), capsys=capsys)[::2])
        assert fragment in line and "internal error" not in line, line
    assert not out.exists()


def test_existing_output_needs_force_and_force_replaces_it(bases, tmp_path, capsys) -> None:
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", r=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = hash_dir(out)
    line = _one_line_error(*run_cli("--base", str(bases["llama"]), "-a", str(adapter), "-o", str(out), capsys=capsys)[::2])
    assert "already exists" in line
    assert hash_dir(out) == before
    code, text, err = run_cli("--base", str(bases["llama"]), "-a", str(adapter), "-o", str(out), "--force", capsys=capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging/old dirs left
    # --force never deletes an input: an --out that contains the base is refused
    line = _one_line_error(*run_cli("--base", str(bases["llama"]), "-a", str(adapter), "-o", str(bases["llama"].parent), "--force", capsys=capsys)[::2])
    assert "overlaps an input" in line and (bases["llama"] / "config.json").is_file()


def test_positional_adapter_uses_its_base_and_json_summary(bases, tmp_path, capsys) -> None:
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", r=4, target_modules=["q_proj", "v_proj"])  # names its base dir
    out, summary = tmp_path / "m", tmp_path / "s.json"
    code, text, err = run_cli(str(adapter), "--out", str(out), "--json", str(summary), capsys=capsys)
    assert code == 0, err
    assert "merged 4 tensors (4 LoRA) from 1 adapter(s)" in text
    s = json.loads(summary.read_text())
    assert s["shards"] == 1 and s["tensors_merged"] == 4 and s["lora_modules"] == 4 and s["tensors"] == 21
    assert s["bytes_written"] == sum(p.stat().st_size for p in out.iterdir())
    assert s["seconds"] > 0 and s["peak_rss_bytes"] > 0
    assert s["adapters"] == [{"path": str(adapter), "weight": 1.0}] and s["base"] == str(bases["llama"])
    code, text, err = run_cli("-a", str(adapter), "-a", str(adapter), "-w", "1", "-o", str(tmp_path / "x"), capsys=capsys)
    assert "2 adapter(s) but 1 --weight" in _one_line_error(code, err, expected=2)  # a usage error


@pytest.mark.parametrize(
    "arch,kw,method",
    [("llama", dict(r=8), "mlora-engine"), ("qwen2", dict(r=4, use_dora=True), "mlora-engine"),
     ("qwen2", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], train_saved_modules=True), "transformers+peft"),
     ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"]), "transformers+peft")],
)  # fmt: skip
def test_verify_reports_the_logit_difference(bases, tmp_path, capsys, arch, kw, method) -> None:
    adapter = build_peft_adapter(bases[arch], tmp_path / "a", seed=4, **kw)
    summary = tmp_path / "s.json"
    code, text, err = run_cli("--base", str(bases[arch]), "-a", str(adapter), "-o", str(tmp_path / "m"), "--verify",
                              "--json", str(summary), capsys=capsys)  # fmt: skip
    assert code == 0, err
    v = json.loads(summary.read_text())["verify"]
    assert v["method"] == method and v["passed"] and v["max_abs_diff"] <= v["tolerance"] == 1e-3
    assert f"verify ok ({method})" in text


def test_verify_fails_on_a_model_that_is_not_base_plus_adapter(bases, tmp_path, capsys) -> None:
    base = bases["llama"]
    a = build_peft_adapter(base, tmp_path / "a", seed=1, r=8)
    b = build_peft_adapter(base, tmp_path / "b", seed=2, r=8)
    code, _, err = run_cli("--base", str(base), "-a", str(b), "-o", str(tmp_path / "mb"), capsys=capsys)
    assert code == 0, err
    plan = build_plan(MergeConfig(base=str(base), adapters=(AdapterSpec(str(a)),), out=tmp_path / "unused"))
    result = verify_merge(plan, tmp_path / "mb", None, "auto")  # merged with b, checked against base + a
    assert not result.passed and result.max_abs_diff > 100 * result.tolerance


def test_readme_shorthand_merges_a_shipped_demo_adapter(tmp_path):
    """`mlora merge ADAPTER --out DIR` on a demo adapter: its base, 'mlora-demo', is the built-in demo
    model (not a Hub lookup), and the merged model behaves as base + adapter."""
    from engine import LLM, SamplingParams
    from engine.demo import DEMO_ADAPTERS
    from tests.test_cli import run_cli

    out = tmp_path / "merged"
    res = run_cli("merge", str(DEMO_ADAPTERS["upper"]), "--out", str(out))
    assert res.returncode == 0, res.stderr
    llm = LLM(str(out), device="cpu", enable_lora=False)
    got = llm.generate(["hello world"], SamplingParams(max_tokens=16, temperature=0.0))
    assert got[0].outputs[0].text == "HELLO WORLD"


@pytest.mark.parametrize(
    ("case", "fragment"),
    [("int8", "LoRA tensors of dtype torch.int8 (quantised adapters must be dequantised first)"),
     ("bool", "LoRA tensors of dtype torch.bool"),
     ("float8_e4m3fn", "LoRA tensors of dtype torch.float8_e4m3fn"),
     ("dora_no_magnitude", "use_dora is set but some modules have no lora_magnitude_vector"),
     ("dora_one_magnitude_missing", "use_dora is set but some modules have no lora_magnitude_vector (model.layers.0.self_attn.q_proj)")],
)  # fmt: skip
def test_merge_refuses_what_validate_fails_as_unservable(bases, tmp_path, capsys, case, fragment) -> None:
    """Integer/bool/F8 LoRA tensors were merged as if they were weights, and use_dora without magnitude vectors
    was merged as plain LoRA; validate fails both. Merge refuses them by the same rule: exit 1, one line."""
    dora = case.startswith("dora")
    adapter = build_peft_adapter(bases["llama"], tmp_path / "a", r=4, use_dora=dora, target_modules=["q_proj", "v_proj"])
    weights = adapter / "adapter_model.safetensors"
    sd = load_file(str(weights))
    if dora:
        mags = sorted(k for k in sd if "lora_magnitude_vector" in k)
        sd = {k: v for k, v in sd.items() if k not in (mags if case == "dora_no_magnitude" else mags[:1])}
    else:
        sd = {k: v.to(getattr(torch, case)) for k, v in sd.items()}
    save_file(sd, str(weights), metadata={"format": "pt"})
    assert not validate_adapter(adapter).valid  # validate fails it (dtype / servable)
    out = tmp_path / "out"
    code, _, err = run_cli("--base", str(bases["llama"]), "--adapter", str(adapter), "--out", str(out), capsys=capsys)
    line = _one_line_error(code, err)
    assert fragment in line and str(adapter) in line, line
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
