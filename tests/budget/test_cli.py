"""`mlora budget` end to end through the real console entry point: numbers, exit codes, messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.planning.budget import ModelDims, adapter_slot_bytes, base_weight_bytes
from engine.planning.presets import gpu_memory_bytes, load_model_preset
from tests.tiny import build_peft_adapter, build_tiny_model


def mlora(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env.pop("MLORA_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "mlora_cli.main", "budget", *args],
        capture_output=True, text=True, env=full_env, timeout=120,
    )  # fmt: skip


def budget_json(*args: str) -> dict:
    res = mlora(*args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def assert_one_line_error(res: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2, res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)


def test_default_model_json_has_the_acceptance_numbers_and_stable_keys():
    out = budget_json("--rank", "16", "--max-loras", "16", "--dtype", "bf16")
    assert out["model_source"] == "preset llama-3.1-8b"  # the documented default
    assert out["bytes_per_adapter"] == 83_886_080
    assert out["total_slot_bytes"] == 1_342_177_280
    assert out["kv_bytes_per_token"] == 131_072
    for key in ("base_weight_bytes", "kv_tokens", "max_concurrent_sequences", "cpu_cache_bytes", "fits"):
        assert key in out
    dims = ModelDims.from_hf_config(load_model_preset("llama-3.1-8b"))
    assert out["base_weight_bytes"] == base_weight_bytes(dims, "bf16")
    budget = int(gpu_memory_bytes("H100-80GB") * 0.9)  # the documented default GPU and utilization
    assert out["gpu_budget_bytes"] == budget
    available = budget - out["base_weight_bytes"] - out["total_slot_bytes"]
    assert out["kv_available_bytes"] == available
    tokens, block = out["kv_tokens"], out["block_size"]
    assert block == 16 and tokens % block == 0
    assert tokens * 131_072 <= available < (tokens + block) * 131_072  # whole blocks, rounded down
    assert out["max_model_len"] == 8192  # max_position_embeddings 131072, capped at 8192 by default
    assert out["max_concurrent_sequences"] == tokens // 8192 > 0
    assert out["fits"] is True and out["shortfall_bytes"] == 0
    assert [m["module"] for m in out["modules"]][:2] == ["q_proj", "k_proj"]


def test_lora_dtype_sizes_the_slots_as_serve_does():
    """--lora-dtype fp32 on a bf16 model: 2x the slot bytes (what `mlora serve --lora-dtype float32` allocates);
    weights and KV stay bf16. auto (the default) = --dtype."""
    bf16 = budget_json("--rank", "16", "--max-loras", "16", "--dtype", "bf16")
    auto = budget_json("--rank", "16", "--max-loras", "16", "--dtype", "bf16", "--lora-dtype", "auto")
    fp32 = budget_json("--rank", "16", "--max-loras", "16", "--dtype", "bf16", "--lora-dtype", "fp32")
    assert bf16["lora_dtype"] == auto["lora_dtype"] == "bfloat16" and fp32["lora_dtype"] == "float32"
    assert auto == bf16
    assert fp32["dtype"] == "bfloat16" and fp32["bytes_per_adapter"] == 2 * 83_886_080
    assert fp32["total_slot_bytes"] == 2 * bf16["total_slot_bytes"]
    assert fp32["modules"][0]["bytes_per_slot_per_layer"] == 2 * bf16["modules"][0]["bytes_per_slot_per_layer"]
    for key in ("base_weight_bytes", "kv_bytes_per_token", "gpu_budget_bytes"):
        assert fp32[key] == bf16[key], key
    assert fp32["kv_available_bytes"] == bf16["kv_available_bytes"] - bf16["total_slot_bytes"]
    text = mlora("--rank", "16", "--dtype", "bf16", "--lora-dtype", "fp32").stdout
    assert "dtype bfloat16, LoRA slots float32" in " ".join(text.split())


def test_table_output_shows_slot_kv_and_module_breakdown():
    res = mlora("--model", "qwen3-8b", "--rank", "8", "--max-loras", "2", "--gpu", "A100-80GB", "--target-modules", "q,v")
    assert res.returncode == 0, res.stderr
    dims = ModelDims.from_hf_config(load_model_preset("qwen3-8b"))
    per_slot = adapter_slot_bytes(dims, rank=8, modules=("q_proj", "v_proj"), dtype="bf16")
    assert f"{per_slot:,}" in res.stdout
    assert "q_proj" in res.stdout and "v_proj" in res.stdout and "gate_proj" not in res.stdout
    assert "head_dim 128" in res.stdout and "A100-80GB" in res.stdout


def test_weights_plus_slots_over_budget_exit_3_and_say_by_how_much():
    res = mlora("--model", "llama-3.1-70b", "--gpu", "L4", "--json")
    assert res.returncode == 3
    out = json.loads(res.stdout)
    assert out["fits"] is False
    assert out["shortfall_bytes"] == out["base_weight_bytes"] + out["total_slot_bytes"] - out["gpu_budget_bytes"]
    assert "does not fit" in res.stderr and f"{out['shortfall_bytes']:,} bytes" in res.stderr
    assert "Traceback" not in res.stderr


def test_kv_too_small_for_one_sequence_exit_3():
    res = mlora("--gpu", "L4", "--max-model-len", "131072", "--json")
    assert res.returncode == 3
    out = json.loads(res.stdout)
    assert out["kv_available_bytes"] > 0 and out["max_concurrent_sequences"] == 0
    assert out["shortfall_bytes"] == 131072 * out["kv_bytes_per_token"] - out["kv_available_bytes"]
    assert "cannot hold one 131,072-token sequence" in res.stderr


def test_local_model_dir_and_real_adapters_report_true_size_and_padding(tmp_path):
    base = build_tiny_model(tmp_path / "base", "qwen2")
    small = build_peft_adapter(base, tmp_path / "r4", r=4)
    big = build_peft_adapter(base, tmp_path / "r16", r=16, target_modules=["q_proj", "v_proj"])
    res = mlora("--model", str(base), "--rank", "8", "--max-loras", "3", "--gpu-memory", "1",
                "--adapter", str(small), "--adapter", str(big), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    dims = ModelDims.from_hf_config(json.loads((base / "config.json").read_text()))
    assert out["dtype"] == "float32"  # the tiny model's own dtype
    assert out["model"]["tie_word_embeddings"] is True
    assert out["base_weight_bytes"] == base_weight_bytes(dims, "fp32")
    assert out["gpu_memory_bytes"] == 2**30
    slot = adapter_slot_bytes(dims, rank=8, dtype="fp32")
    true_r4 = adapter_slot_bytes(dims, rank=4, dtype="fp32")  # r=4 on all modules == a rank-4 slot
    a4, a16 = out["adapters"]
    assert (a4["rank"], a4["fits_slot"], a4["bytes_at_slot_dtype"]) == (4, True, true_r4)
    assert a4["padding_waste_bytes"] == slot - true_r4 and a4["padding_waste_fraction"] == pytest.approx(0.5)
    assert a16["fits_slot"] is False and "rank 16 exceeds the slot rank 8" in a16["problems"][0]
    table = mlora("--model", str(base), "--rank", "8", "--gpu-memory", "1", "--adapter", str(small))
    assert table.returncode == 0 and "fits" in table.stdout and "(50%)" in table.stdout


def test_adapter_for_another_base_is_flagged(tmp_path):
    base = build_tiny_model(tmp_path / "base", "llama")
    other = build_tiny_model(tmp_path / "other", "llama", hidden_size=32, intermediate_size=64)
    adapter = build_peft_adapter(other, tmp_path / "ad", r=2, target_modules=["q_proj"])
    out = budget_json("--model", str(base / "config.json"), "--gpu-memory", "1", "--adapter", str(adapter))
    row = out["adapters"][0]
    assert row["fits_slot"] is False and "base expects [r, 64]" in row["problems"][0]


def test_trace_recommends_the_working_set_and_its_memory(tmp_path):
    trace = tmp_path / "cyclic.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": i, "adapter": f"a{i % 5}"}) + "\n" for i in range(2000)))
    out = budget_json("--trace", str(trace), "--max-loras", "2")
    t = out["trace"]
    assert t["recommended_max_loras"] == 5 and t["distinct_adapters"] == 5
    assert t["recommended_slot_bytes"] == 5 * out["bytes_per_adapter"]
    assert [r["max_loras"] for r in t["rows"]] == [1, 2, 4, 8]
    assert [r["hit_rate"] for r in t["rows"]] == [0.0, 0.0, 0.0, (2000 - 5) / 2000]
    assert t["rows"][-1]["loads_per_second"] == pytest.approx(5 / 1999)
    res = mlora("--trace", str(trace))
    assert res.returncode == 0 and "recommended --max-loras 5" in res.stdout


def test_trace_target_unreachable_says_best_possible(tmp_path):
    trace = tmp_path / "short.jsonl"
    trace.write_text("".join(json.dumps({"adapter": f"a{i % 4}"}) + "\n" for i in range(20)))
    out = budget_json("--trace", str(trace))
    assert out["trace"]["recommended_max_loras"] is None and out["trace"]["best_hit_rate"] == 16 / 20
    res = mlora("--trace", str(trace))
    assert res.returncode == 0 and "best possible is 0.8000" in res.stdout


def test_malformed_trace_line_is_one_line_error_with_line_number(tmp_path):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"adapter": "a"}\n{"adapter": "b"}\n{"adapter": "c",\n')
    assert_one_line_error(mlora("--trace", str(trace)), 1, "bad.jsonl line 3: malformed JSON")


def test_unknown_preset_lists_known_ones():
    assert_one_line_error(mlora("--model", "llama-9"), 1, "unknown model 'llama-9'", "llama-3.1-8b", "qwen3-8b")


def test_missing_config_fields_one_line(tmp_path):
    cfg = load_model_preset("mistral-7b")
    del cfg["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(mlora("--model", str(tmp_path)), 1, "missing required field(s): num_hidden_layers")


def test_hub_id_offline_is_one_line_error(tmp_path):
    res = mlora("--model", "some-org/some-model", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_one_line_error(res, 1, "cannot fetch config.json of hub model 'some-org/some-model'")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--rank", "-4"), "--rank"),
        (("--max-loras", "0"), "--max-loras"),
        (("--target-modules", "q,lm_head"), "unknown target module 'lm_head'"),
        (("--dtype", "int4"), "unsupported dtype int4"),
        (("--gpu", "L4", "--gpu-memory", "24"), "either --gpu or --gpu-memory"),
        (("--gpu-memory", "inf"), "--gpu-memory must be a finite number of GiB, got inf"),  # was an internal OverflowError
        (("--gpu-memory", "1e308"), "--gpu-memory must be a finite number of GiB"),
    ],
)
def test_usage_errors_exit_2(args, fragment):
    res = mlora(*args)
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr and "Traceback" not in res.stderr


def test_unknown_gpu_lists_presets():
    assert_one_line_error(mlora("--gpu", "V100"), 1, "unknown GPU preset 'V100'", "H100-80GB", "RTX-4090")


def test_help_names_the_default_preset():
    res = mlora("--help")
    text = " ".join(res.stdout.split())
    assert res.returncode == 0 and "mlora budget" in text
    assert "Default: llama-3.1-8b." in text and "Default: H100-80GB." in text and "capped at 8192" in text


def test_trace_lines_naming_the_base_model_are_base_requests(tmp_path):
    """An OpenAI request log names the base model in `model`: those lines need no slot."""
    base = build_tiny_model(tmp_path / "base", "llama")
    lines = [{"model": name} for name in ["a", "b", "meta-llama/Llama-3.1-8B", "a", "llama-3.1-8b", "b", "", "served"]]
    trace = tmp_path / "log.jsonl"
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    t = budget_json("--trace", str(trace))["trace"]  # default preset llama-3.1-8b (meta-llama/Llama-3.1-8B)
    assert (t["adapter_requests"], t["base_requests"], t["distinct_adapters"]) == (5, 3, 3)  # 'served' is an adapter
    t = budget_json("--trace", str(trace), "--served-model-name", "served")["trace"]
    assert (t["adapter_requests"], t["base_requests"], t["distinct_adapters"]) == (4, 4, 2)
    assert "served" in t["base_model_names"]
    res = mlora("--trace", str(trace), "--served-model-name", "served")
    assert res.returncode == 0 and "4 adapter requests, 2 adapters, 4 base-model requests" in res.stdout
    # a local model dir: the path as given and resolved both name the base
    trace.write_text("".join(json.dumps({"model": m}) + "\n" for m in [str(base), "x", str(base.resolve()), "x"]))
    t = budget_json("--model", str(base), "--gpu-memory", "1", "--trace", str(trace))["trace"]
    assert (t["adapter_requests"], t["base_requests"], t["distinct_adapters"]) == (2, 2, 1)


def test_demo_model_trace_counts_mlora_demo_as_base(tmp_path):
    from engine.demo import DEMO_MODEL_DIR

    trace = tmp_path / "demo.jsonl"
    trace.write_text("".join(json.dumps({"model": m}) + "\n" for m in ["mlora-demo", "upper", "rot13", "mlora-demo"]))
    t = budget_json("--model", str(DEMO_MODEL_DIR), "--gpu-memory", "1", "--trace", str(trace))["trace"]
    assert (t["adapter_requests"], t["base_requests"], t["distinct_adapters"]) == (2, 2, 2)


def test_max_cpu_loras_defaults_to_serves_default():
    """The CPU tier as serve sizes it: 2 x --max-loras adapters, and more while they fit in 1 GiB."""
    from engine.config import CPU_LORA_BYTES, EngineConfig, default_max_cpu_loras

    out = budget_json("--max-loras", "3")
    assert out["max_cpu_loras"] == default_max_cpu_loras(3) == EngineConfig(max_loras=3).max_cpu_loras == 6
    assert out["max_cpu_lora_bytes"] == EngineConfig(max_loras=3).max_cpu_lora_bytes == CPU_LORA_BYTES
    assert out["cpu_cache_adapters"] == 12  # llama-3.1-8b r16 bf16 adapters (80 MiB each) in 1 GiB
    assert out["cpu_cache_bytes"] == 12 * out["bytes_per_adapter"]
    explicit = budget_json("--max-loras", "3", "--max-cpu-loras", "5")  # vLLM's count cap, as serve
    assert (explicit["max_cpu_loras"], explicit["max_cpu_lora_bytes"], explicit["cpu_cache_adapters"]) == (5, 0, 5)
    res = mlora("--max-loras", "3")
    assert res.returncode == 0 and "CPU cache (12 adapters)" in res.stdout


def _header(tensors: dict) -> bytes:
    import struct

    raw = json.dumps(tensors).encode()
    return struct.pack("<Q", len(raw)) + raw


_QA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
_QB = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        # budget once parsed the header itself: these were internal ValueError / TypeError / RecursionError
        (_header({_QA: {"dtype": "F32", "shape": "ab", "data_offsets": [0, 0]}}), "has an invalid shape 'ab'"),
        (_header({_QA: {"dtype": "F32", "shape": 5, "data_offsets": [0, 0]}}), "has an invalid shape 5"),
        (_header({_QA: {"dtype": "F32", "shape": [None], "data_offsets": [0, 0]}}), "has an invalid shape [None]"),
        (b"\x40\x0d\x03\x00\x00\x00\x00\x00" + b"[" * 100_000 + b"]" * 100_000, "its header is not valid JSON"),
        # and accepted these with made-up numbers (negative params, overlapping data, a truncated file)
        (_header({_QA: {"dtype": "F32", "shape": [-8, 64], "data_offsets": [0, 0]}}), "has an invalid shape [-8, 64]"),
        (_header({_QA: {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]},
                  _QB: {"dtype": "F32", "shape": [64, 8], "data_offsets": [0, 2048]}}) + bytes(2048), "overlaps another"),
        (_header({_QA: {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]}}) + bytes(100), "is truncated"),
    ],
)
def test_hostile_adapter_header_is_one_line_error(tmp_path, weights, fragment):
    adapter = tmp_path / "hostile"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    res = mlora("--model", "llama-3.2-1b", "--adapter", str(adapter))
    assert_one_line_error(res, 1, f"adapter '{adapter}'", fragment)
    assert "internal error" not in res.stderr


@pytest.mark.parametrize(
    ("config_text", "fragment"),
    [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)"),  # was an internal RecursionError
        (None, "hidden_size must be an integer, got nan"),  # was an internal "cannot convert float NaN to integer"
    ],
)
def test_hostile_model_config_is_one_line_error(tmp_path, config_text, fragment):
    if config_text is None:
        cfg = load_model_preset("llama-3.2-1b")
        cfg["hidden_size"] = float("nan")
        config_text = json.dumps(cfg)  # json writes NaN, and reads it back
    (tmp_path / "config.json").write_text(config_text)
    res = mlora("--model", str(tmp_path))
    assert_one_line_error(res, 1, fragment)
    assert "internal error" not in res.stderr


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"timestamp": Infinity, "adapter": "a"}', "line 2: timestamp must be a finite number of unix seconds, got inf"),
        ('{"timestamp": NaN, "adapter": "a"}', "line 2: timestamp must be a finite number of unix seconds, got nan"),
        ('{"timestamp": "1e999", "adapter": "a"}', "line 2: timestamp must be a finite number of unix seconds, got '1e999'"),
        ('{"timestamp": ' + "9" * 400 + ', "adapter": "a"}', "line 2: timestamp must be a finite number of unix seconds"),
        ("[" * 100_000 + "]" * 100_000, "line 2: malformed JSON (nested too deeply)"),
    ],
)
def test_non_finite_or_hostile_trace_line_is_one_line_error(tmp_path, line, fragment):
    """Infinity once gave `"duration_s": Infinity` (not JSON) and a 400-digit integer an internal OverflowError."""
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0.5, "adapter": "b"}\n' + line + "\n")
    res = mlora("--trace", str(trace), "--json")
    assert_one_line_error(res, 1, fragment)
    assert "internal error" not in res.stderr and res.stdout == ""
