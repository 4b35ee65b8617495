"""What `mlora bench` prints can be trusted: rounds are picked and labelled by the same metric,
implausible efficiencies and disagreeing rounds are flagged, and piped output is not cut at 80 columns."""

from __future__ import annotations

import io

from engine.bench.report import build_report, render
from engine.bench.runner import _best, ratio_metric
from engine.bench.stats import RequestTiming, summarize


def _run(name, kind, n, decode_s, *, total_s=None, system="mlora", tokens=64):
    """8 requests; decode takes `decode_s` after a 0.1 s prefill; the run ends at `total_s`."""
    per = tokens // 8
    end = total_s if total_s is not None else 0.1 + decode_s
    ts = [RequestTiming(arrival=0.0, first_token=0.1, last_token=0.1 + decode_s, finished=end, num_tokens=per)
          for _ in range(8)]  # fmt: skip
    return summarize(name, kind, system, n, ts, start=0.0, end=end, adapter_loads=0, adapter_evictions=0)


def test_best_round_is_picked_and_labelled_by_the_ratio_metric():
    # round 1: faster decode, slower end to end; round 2 the other way round
    r1, r2 = _run("mixed-4", "mixed", 4, 1.0, total_s=3.0), _run("mixed-4", "mixed", 4, 2.0, total_s=2.2)
    assert r1.decode_tokens_per_s > r2.decode_tokens_per_s and r1.output_tokens_per_s < r2.output_tokens_per_s
    best = _best([r1, r2], ratio_metric(None))  # offline: decode tok/s
    assert best is r1 and best.round_metric == "decode_tokens_per_s"
    assert best.round_values == [r1.decode_tokens_per_s, r2.decode_tokens_per_s]
    assert f"best of 2 rounds by decode tok/s; decode tok/s per round: {r1.decode_tokens_per_s:.1f}, " \
           f"{r2.decode_tokens_per_s:.1f}" in best.notes[-1]
    r1b, r2b = _run("mixed-4", "mixed", 4, 1.0, total_s=3.0), _run("mixed-4", "mixed", 4, 2.0, total_s=2.2)
    best = _best([r1b, r2b], ratio_metric(40.0))  # Poisson arrivals: end-to-end tok/s
    assert best is r2b and "by e2e tok/s; e2e tok/s per round" in best.notes[-1]


def _report(homog_decode_s, mixed_rounds=None):
    results = [_run("base", "base", 0, 1.0), _run("homogeneous", "homogeneous", 1, homog_decode_s),
               _run("mixed-4", "mixed", 4, 1.3)]  # fmt: skip
    if mixed_rounds:
        rounds = [_run("mixed-4", "mixed", 4, s) for s in mixed_rounds]
        results[2] = _best(rounds, "decode_tokens_per_s")
    return build_report(config={}, machine={}, model={}, results=results, w=1000, a=100,
                        metric="decode_tokens_per_s", notes=[])  # fmt: skip


def test_sound_run_has_no_warnings():
    rep = _report(1.1, mixed_rounds=[1.3, 1.35])
    assert rep["warnings"] == []


def test_efficiency_far_above_the_bound_is_warned_about():
    rep = _report(4.0)  # a homogeneous run slowed by noise: mixed-4 looks 3x faster than its bound allows
    eff = rep["efficiency"]["mixed_over_homogeneous"]
    assert eff > 1.5
    assert any(w.startswith(f"mixed-4 / homogeneous: efficiency {eff:.0%} is far above") for w in rep["warnings"])
    out = io.StringIO()
    from rich.console import Console

    render(rep, Console(file=out, width=300))
    assert f"warning: mixed-4 / homogeneous: efficiency {eff:.0%}" in out.getvalue()


def test_disagreeing_rounds_are_warned_about():
    rep = _report(1.1, mixed_rounds=[1.3, 3.0])
    assert any(w.startswith("mixed-4 (mlora): rounds disagree by 57% (decode tok/s: ") for w in rep["warnings"])


def test_piped_output_is_not_cut_at_80_columns(monkeypatch):
    from mlora_cli import _common

    monkeypatch.delenv("COLUMNS", raising=False)
    console = _common._console()
    assert not console.is_terminal and console.width == _common.PIPE_WIDTH
    buf = io.StringIO()
    console.file = buf
    rep = _report(1.1)
    render(rep, console)
    text = buf.getvalue()
    assert "…" not in text
    for w in rep["workloads"]:  # every number whole, e.g. "10186.2", not "10186…"
        assert f"{w['decode_tokens_per_s']:.1f}" in text
    monkeypatch.setenv("COLUMNS", "100")
    assert _common._console().width == 100  # an explicit COLUMNS still wins
