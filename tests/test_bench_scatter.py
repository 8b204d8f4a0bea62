"""`tandem bench scatter`'s arithmetic on timings with known answers, its report, and its refusals
(the engine run itself is a benchmark: bench/prefill_scatter.py)."""

from __future__ import annotations

import argparse
import math

import pytest

from tandem.bench.prefill_scatter import (best_constant, carried, cmd_scatter, fit_relative, poly, summarize,
                                          write_report)


def test_the_best_constant_is_the_typical_time_and_leaves_no_error_when_only_a_tenth_stray() -> None:
    times = [0.3] * 19 + [0.6]
    const, p90 = best_constant(times)
    assert const == pytest.approx(0.3) and p90 == pytest.approx(0.0)
    # half slow by a fifth: the best single number sits between, a tenth off each way at most
    const, p90 = best_constant([1.0] * 10 + [1.2] * 10, steps=200)
    assert 1.0 < const < 1.2 and p90 == pytest.approx(0.2 / 2.2, abs=0.01)


def test_the_fits_recover_known_coefficients() -> None:
    tokens = list(range(32, 1032, 50))
    line = [0.01 + 0.001 * k for k in tokens]
    assert fit_relative(tokens, line, 1) == pytest.approx([0.01, 0.001], rel=1e-6)
    quad = [0.02 + 0.0005 * k + 3e-7 * k * k for k in tokens]
    coef = fit_relative(tokens, quad, 2)
    assert coef == pytest.approx([0.02, 0.0005, 3e-7], rel=1e-5)
    assert poly(coef, 500) == pytest.approx(0.02 + 0.25 + 0.075)


def test_a_phase_summary_reports_the_fits_error_and_the_hosts_drift(tmp_path) -> None:
    # 80 prefills of 50..840 tokens in a scrambled order, a second apart; the second half of the run 10 % slower
    tokens = [50 + 10 * (i * 37 % 80) for i in range(80)]
    varied = [(k, (0.01 + 0.001 * k) * (1.0 if i < 40 else 1.1), float(i)) for i, k in enumerate(tokens)]
    fixed = [0.3] * 40 + [0.33] * 40
    s = summarize(varied, fixed)
    assert s["fixed"]["n"] == 80 and s["fixed"]["p10_s"] == pytest.approx(0.3)
    drift = s["fixed"]["drift"]
    assert len(drift) == 4 and drift[3] / drift[0] == pytest.approx(1.1)
    q = s["varied"]["quadratic"]
    assert q["drift"][3] / q["drift"][0] == pytest.approx(1.1, rel=0.02)
    assert 0.03 < q["p90"] < 0.1  # the slow half is the error no fit in tokens removes
    # ... and the previous prefill's deviation, carried (at the pace's gain, faded by its age: the
    # prefills here are under a second apart), takes much of the step off
    assert s["varied"]["carried"]["p90"] < 0.75 * q["p90"]
    assert "fixed" not in summarize(varied)
    doc = {"model": "/m/bench-model", "core": 0, "n": 80, "fixed_tokens": 300, "min_tokens": 50, "max_tokens": 840,
           "phases": {"engine-idle": {**s, "fixed_times_s": fixed, "varied_samples": varied},
                      "node-open": {**summarize(varied), "varied_samples": varied}}}
    write_report(tmp_path, doc)
    report = (tmp_path / "report.md").read_text()
    assert "| engine-idle | " in report and f"{q['p90'] * 100:.1f} %" in report and "| node-open | " in report
    assert "| engine-idle | 300 / " in report  # the fixed table: the engine phase only
    assert (tmp_path / "scatter.png").stat().st_size > 1000


def test_the_carried_pace_scales_a_prediction_by_the_previous_deviation_faded_with_its_age() -> None:
    from tandem.coordinator.nodeclient import PACE_GAIN, PACE_HOLD_S

    # the first 20 % slow, ending at 1.2 s; the second starts at 3.2 s, 2 s later
    samples = [(100, 1.2, 0.0), (100, 1.0, 3.2)]
    got = carried([1.0, 1.0], samples)
    assert got[0] == 1.0
    assert got[1] == pytest.approx(math.exp(PACE_GAIN * math.log(1.2) * math.exp(-2.0 / PACE_HOLD_S)))


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(model="", phases="engine-idle", core=None, n=200, fixed_tokens=300, min_tokens=32, max_tokens=1000,
                stream_tokens=64, gap_s=1.0, seed=0, out=str(tmp_path))
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw, message", [
    ({"phases": "engine-idle,engine-cpu"}, "--phases: some of node-serial, node-open, engine-idle"),
    ({"phases": "node-open,node-open"}, "each once"),
    ({"gap_s": 0.0}, "--gap-s > 0"),
    ({"n": 3}, "--n must be at least 8"),
    ({"min_tokens": 500, "max_tokens": 100}, "--min-tokens <= --max-tokens"),
    ({"core": 10_000}, "--core 10000: not a core this process may use"),
])
def test_the_scatter_bench_refuses_bad_flags_before_any_engine_starts(tmp_path, kw, message) -> None:
    with pytest.raises(SystemExit, match=message):
        cmd_scatter(_args(tmp_path, **kw))
    assert not (tmp_path / "model-bench-seed0").exists()
