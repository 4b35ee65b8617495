"""`mlora bench` through the real CLI: the CI command end to end, the gate, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.bench.report import BOUND_KEYS, RATIO_KEYS


def run_cli(*args: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "MLORA_BENCH_CACHE": str(cache)}
    env.pop("MLORA_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mlora_cli.main", "bench", *args],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out.json"
    res = run_cli("--quick", "--preset", "tiny", "--repeat", "1", "--json", str(out), "--plot", str(tmp / "plot.png"),
                  cache=tmp / "cache")
    return res, out, tmp


def test_quick_bench_exits_0_and_writes_every_number(quick_run):
    res, out, tmp = quick_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    rep = json.loads(out.read_text())
    assert list(rep["ratios"]) == list(RATIO_KEYS)
    assert list(rep["bounds"]) == list(BOUND_KEYS)
    for key in ("mixed_over_homogeneous", "homogeneous_over_base", "mlora_over_peft", "mlora_over_separate"):
        assert isinstance(rep["ratios"][key], float) and rep["ratios"][key] > 0, key
    for key in BOUND_KEYS:
        assert 0 < rep["bounds"][key] <= 1
        assert rep["efficiency"][key] == pytest.approx(rep["ratios"][key] / rep["bounds"][key])
    assert rep["largest_n"] == 4
    names = {(w["system"], w["name"]) for w in rep["workloads"]}
    assert {("mlora", n) for n in ("base", "homogeneous", "mixed-2", "mixed-4", "churn-8")} <= names
    assert {("separate", "mixed-4"), ("peft", "homogeneous"), ("peft", "mixed-4")} <= names
    for w in rep["workloads"]:
        assert w["output_tokens"] == 16 * 12  # same requests, EOS ignored: same token count everywhere
        assert w["output_tokens_per_s"] > 0 and w["requests_per_s"] > 0
    churn = next(w for w in rep["workloads"] if w["name"] == "churn-8")
    assert churn["adapter_loads"] >= 8 - 4 and churn["adapter_evictions"] >= 1  # 8 adapters through 4 slots
    # 16 requests over 8 adapters, 2 each: 4 slots hold 8 of them at once (seats are 16: the slots bound it)
    assert 7 <= churn["mean_decode_batch"] <= 8
    assert next(w for w in rep["workloads"] if w["name"] == "mixed-4")["mean_decode_batch"] == 16
    assert rep["config"]["quick"] is True and rep["machine"]["device"] == "cpu"


def test_quick_bench_prints_the_table_and_the_plot(quick_run):
    res, out, tmp = quick_run
    assert res.returncode == 0
    assert "mixed-4 / homogeneous" in res.stdout and "homogeneous / base" in res.stdout
    assert (tmp / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_min_mixed_ratio_gate_exits_1_with_the_ratio(tmp_path):
    res = run_cli("--preset", "tiny", "--num-requests", "4", "--max-tokens", "3", "--max-loras", "2",
                  "--no-alternatives", "--min-mixed-ratio", "50", "--json", str(tmp_path / "o.json"),
                  cache=tmp_path / "cache")  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]
    assert "mixed-2/homogeneous ratio" in res.stderr and "below --min-mixed-ratio 50" in res.stderr
    rep = json.loads((tmp_path / "o.json").read_text())  # the numbers are still written
    assert rep["ratios"]["mlora_over_peft"] is None and rep["largest_n"] == 2


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--preset", "tiny", "--model", "x"], "either --preset or --model", 2),  # usage errors exit 2
        (["--preset", "tiny", "--zipf", "0"], "--zipf must be > 0", 2),
        (["--model", "/no/such/model/dir"], "does not exist", 1),
    ],
)
def test_bad_input_is_one_line_exit_1_bad_flags_exit_2(tmp_path, args, message, code):
    res = run_cli(*args, cache=tmp_path)
    assert res.returncode == code
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_poisson_arrivals_stream_through_async_engine_and_static_peft(tmp_path):
    out = tmp_path / "rate.json"
    res = run_cli("--preset", "tiny", "--rate", "40", "--num-requests", "6", "--max-tokens", "5", "--max-loras", "2",
                  "--repeat", "1", "--dtype", "bfloat16", "--peft-dtype", "float32", "--json", str(out),
                  cache=tmp_path / "cache")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["config"]["rate"] == 40.0
    assert (rep["config"]["dtype"], rep["config"]["peft_dtype"], rep["machine"]["dtype"]) == ("bfloat16", "float32", "bfloat16")
    assert any("PEFT ran in float32, mlora and separate in bfloat16" in n for n in rep["notes"])
    assert rep["ratio_metrics"]["mixed_over_homogeneous"] == "output_tokens_per_s"
    mlora = [w for w in rep["workloads"] if w["system"] == "mlora"]
    lengths = {w["output_tokens"] for w in rep["workloads"]}
    assert len(lengths) == 1 and lengths.pop() < 6 * 5 + 1  # varied lengths, identical across systems
    for w in mlora:
        assert w["num_requests"] == 6
        assert w["ttft_s"]["p50"] is not None and w["itl_s"]["p99"] is not None  # streamed token times
    assert {w["system"] for w in rep["workloads"]} == {"mlora", "separate", "peft"}
    assert rep["ratios"]["mlora_over_peft"] > 0


def test_kernels_flag_prints_the_kernel_table_and_writes_its_rows(tmp_path):
    out = tmp_path / "k.json"
    res = run_cli("--kernels", "--quick", "--threads", "1", "--json", str(out), cache=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "shrink" in res.stdout and "expand" in res.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"shrink", "expand"} and all(r["hidden"] == 768 for r in rows)
