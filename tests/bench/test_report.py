"""Report math: traffic bounds from the budget functions, ratios, efficiency, JSON keys, plot."""

from __future__ import annotations

import json

import pytest

from engine.bench.presets import preset_config_dict
from engine.bench.report import (
    BOUND_KEYS,
    RATIO_KEYS,
    bound_homogeneous_over_base,
    bound_mixed_over_homogeneous,
    build_report,
    check_min_mixed_ratio,
    compute_ratios,
    plot,
    render,
    traffic_bytes,
)
from engine.bench.stats import RequestTiming, summarize
from engine.planning.budget import ModelDims, adapter_slot_bytes, linear_weight_bytes
from engine.planning.presets import load_model_preset

HIDDEN_768 = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=32000)  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_issue_worked_example_hidden_768_rank_16(dtype):
    w, a = traffic_bytes(HIDDEN_768, rank=16, dtype=dtype)
    dims = ModelDims.from_hf_config(HIDDEN_768)
    assert (w, a) == (linear_weight_bytes(dims, dtype), adapter_slot_bytes(dims, rank=16, dtype=dtype))
    # The issue: "a Llama with hidden 768 at r=16 has bound 0.91 for N=4 and 0.67 for N=16".
    assert round(bound_mixed_over_homogeneous(w, a, 4), 2) == 0.91
    assert bound_mixed_over_homogeneous(w, a, 16) == pytest.approx(0.67, abs=0.01)


def test_small_preset_is_the_worked_example_model():
    w, a = traffic_bytes(preset_config_dict("small"), rank=16, dtype="float32")
    assert (w, a) == traffic_bytes(HIDDEN_768, rank=16, dtype="float32")


def test_llama_8b_bound_for_16_adapters_is_about_090():
    w, a = traffic_bytes(load_model_preset("llama-3.1-8b"), rank=16, dtype="bfloat16")
    assert bound_mixed_over_homogeneous(w, a, 16) == pytest.approx(0.90, abs=0.02)


def test_bounds_formulas_and_limits():
    w, a = 1000, 10
    assert bound_mixed_over_homogeneous(w, a, 1) == 1.0
    assert bound_mixed_over_homogeneous(w, a, 4) == pytest.approx(1010 / 1040)
    assert bound_homogeneous_over_base(w, a) == pytest.approx(1000 / 1010)
    with pytest.raises(ValueError):
        bound_mixed_over_homogeneous(w, a, 0)


def _result(name, kind, system, n, seconds, tokens=64):
    # 8 requests of tokens/8 tokens each; decode over `seconds` after a 0.1 s prefill.
    per = tokens // 8
    ts = [RequestTiming(arrival=0.0, first_token=0.1, last_token=0.1 + seconds, finished=0.1 + seconds, num_tokens=per)
          for _ in range(8)]  # fmt: skip
    return summarize(name, kind, system, n, ts, start=0.0, end=0.1 + seconds, adapter_loads=0, adapter_evictions=0)


def _results():
    return [
        _result("base", "base", "mlora", 0, 1.0),
        _result("homogeneous", "homogeneous", "mlora", 1, 1.25),
        _result("mixed-2", "mixed", "mlora", 2, 1.3),
        _result("mixed-4", "mixed", "mlora", 4, 1.6),
        _result("mixed-4", "mixed", "separate", 4, 4.9),
        _result("homogeneous", "homogeneous", "peft", 1, 2.9),
        _result("mixed-4", "mixed", "peft", 4, 3.9),
    ]


def test_ratios_use_the_largest_n_and_efficiency_is_measured_over_bound():
    w, a = 1000, 50
    out = compute_ratios(_results(), w=w, a=a, metric="decode_tokens_per_s")
    r, b, e = out["ratios"], out["bounds"], out["efficiency"]
    assert set(r) == set(RATIO_KEYS) and set(b) == set(BOUND_KEYS) == set(e)
    assert out["largest_n"] == 4
    assert r["mixed_over_homogeneous"] == pytest.approx(1.25 / 1.6)  # decode time ratio, same tokens
    assert r["homogeneous_over_base"] == pytest.approx(1.0 / 1.25)
    assert r["mlora_over_peft"] == pytest.approx(4.0 / 1.7)  # end-to-end: (0.1 + 3.9) / (0.1 + 1.6)
    assert r["mlora_over_separate"] == pytest.approx(5.0 / 1.7)
    assert b["mixed_over_homogeneous"] == pytest.approx((w + a) / (w + 4 * a))
    assert b["homogeneous_over_base"] == pytest.approx(w / (w + a))
    assert e["mixed_over_homogeneous"] == pytest.approx(r["mixed_over_homogeneous"] / b["mixed_over_homogeneous"])
    assert [m["n"] for m in out["mixed"]] == [2, 4]
    assert out["mixed"][0]["ratio"] == pytest.approx(1.25 / 1.3)


def test_missing_alternatives_give_null_ratios():
    out = compute_ratios([r for r in _results() if r.system == "mlora"], w=1000, a=50, metric="output_tokens_per_s")
    assert out["ratios"]["mlora_over_peft"] is None and out["ratios"]["mlora_over_separate"] is None
    assert out["ratios"]["mixed_over_homogeneous"] == pytest.approx(1.35 / 1.7)


def _report():
    return build_report(config={"preset": "tiny"}, machine={"cpu_count": 2}, model={"hidden": 64},
                        results=_results(), w=1000, a=50, metric="decode_tokens_per_s", notes=["a note"])  # fmt: skip


def test_report_json_schema_keys_are_stable():
    rep = json.loads(json.dumps(_report()))  # JSON-serialisable as is
    assert set(rep) >= {"schema_version", "config", "machine", "model", "traffic", "workloads", "ratios", "bounds",
                        "efficiency", "mixed", "largest_n", "ratio_metrics", "notes"}  # fmt: skip
    assert list(rep["ratios"]) == list(RATIO_KEYS)
    assert list(rep["bounds"]) == list(BOUND_KEYS)
    assert set(rep["traffic"]) == {"W_bytes", "a_bytes"}
    wl = rep["workloads"][0]
    assert set(wl) >= {"name", "kind", "system", "num_adapters", "num_requests", "output_tokens", "duration_s",
                       "output_tokens_per_s", "requests_per_s", "decode_tokens_per_s", "ttft_s", "itl_s",
                       "e2e_latency_s", "adapter_loads", "adapter_evictions"}  # fmt: skip
    assert set(wl["ttft_s"]) == {"p50", "p99"} and set(wl["itl_s"]) == {"p50", "p99"}


def test_min_mixed_ratio_gate():
    rep = _report()
    ratio = rep["ratios"]["mixed_over_homogeneous"]
    assert check_min_mixed_ratio(rep, None) is None
    assert check_min_mixed_ratio(rep, ratio - 0.01) is None
    msg = check_min_mixed_ratio(rep, ratio + 0.01)
    assert msg is not None and "mixed-4/homogeneous" in msg and "below --min-mixed-ratio" in msg


def test_table_shows_ratios_and_bounds():
    from rich.console import Console

    console = Console(record=True, width=200)
    render(_report(), console)
    text = console.export_text()
    assert "mixed-4 / homogeneous" in text and "homogeneous / base" in text
    assert f"{_report()['bounds']['mixed_over_homogeneous']:.3f}" in text
    assert "note: a note" in text


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    plot(_report(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
