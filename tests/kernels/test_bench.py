"""The kernel micro-benchmark's numbers come from one function: check what it reports (not how fast)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kernels.bench import format_kernel_bench, run_kernel_bench


def test_run_kernel_bench_reports_every_case_and_method() -> None:
    res = run_kernel_bench(device="cpu", hidden_sizes=(64,), rank=4, tokens=(1, 4), adapters=(1, 2),
                           repeats=1, rotate_bytes=1 << 16, bandwidth_bytes=1 << 20)
    assert res["device"] == "cpu" and res["dtype"] == "float32" and res["bandwidth_gbs"] > 0
    # cases (T, N): (1, 1), (4, 1), (4, 2)  (N > T skipped); 2 ops x 4 methods each
    assert len(res["rows"]) == 3 * 2 * 4
    assert {r["method"] for r in res["rows"]} == {"chosen", "row-gather", "bmm", "adapter-loop"}
    assert res["copy_gbs"] > 0
    row = next(r for r in res["rows"] if r["op"] == "shrink" and r["T"] == 4 and r["N"] == 2)
    assert row["bytes"] == (4 * 64 + 4 * 4 + 2 * 4 * 64) * 4  # x + h + the 2 adapters' A
    assert row["gbs"] == pytest.approx(row["bytes"] / (row["us"] * 1e-6) / 1e9)
    assert row["bound_fraction"] == pytest.approx(row["gbs"] / res["bandwidth_gbs"])
    assert row["copy_fraction"] == pytest.approx(row["gbs"] / res["copy_gbs"])
    bmm = next(r for r in res["rows"] if r["op"] == "shrink" and r["T"] == 4 and r["N"] == 2 and r["method"] == "bmm")
    assert bmm["vs_bmm"] == pytest.approx(1.0) and row["vs_bmm"] == pytest.approx(row["us"] / bmm["us"])
    assert row["tokens_per_s"] == pytest.approx(4 / (row["us"] * 1e-6))
    loops = [r for r in res["rows"] if r["method"] == "adapter-loop"]
    assert all(r["speedup_vs_loop"] == pytest.approx(1.0) for r in loops)
    table = format_kernel_bench(res)
    assert "read bandwidth=" in table and table.count("\n") == len(res["rows"]) + 1


def test_benchmark_script_runs() -> None:
    res = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--device", "cpu", "--hidden", "32",
                          "--rank", "4", "--tokens", "2", "--adapters", "2", "--repeats", "1", "--rotate-mb", "1",
                          "--bandwidth-mb", "4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "shrink" in res.stdout and "expand" in res.stdout and "adapter-loop" in res.stdout
