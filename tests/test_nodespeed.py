"""How far a node's times stray from its fit: measured (SpeedTracker), exported by a node, drawn by
the simulator (NodeSpeed)."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import replace

import pytest

from tandem.nodespeed import NodeSpeed, Speed, SpeedTracker, window_correlation, window_share
from tandem.simconfig import SimConfig
from tandem.timings import Timings


def _track(speed: Speed, seed: int, seconds: float = 600.0, step_s: float = 0.03) -> SpeedTracker:
    """Steps of a node whose fit says ``step_s``, run at ``speed``'s factors, into a tracker."""
    drawn, tracker, t = NodeSpeed(speed, random.Random(seed)), SpeedTracker(), 0.0
    while t < seconds:
        took = step_s * drawn.factor(t)
        t += took
        tracker.add(t, took, step_s)
    return tracker


@pytest.mark.parametrize("speed", [Speed(0.14, 1.0, 0.09, 0.05), Speed(0.1, 5.0, 0.1, -0.03), Speed(0.05, 0.5, 0.15)])
def test_the_tracker_reads_back_the_speed_a_node_ran_at(speed: Speed) -> None:
    got = [_track(speed, seed).estimate() for seed in range(4)]
    assert all(g is not None for g in got)
    sd = statistics.mean(g.sd for g in got)  # type: ignore[union-attr]
    tau = statistics.mean(g.tau_s for g in got)  # type: ignore[union-attr]
    jitter = statistics.mean(g.jitter_sd for g in got)  # type: ignore[union-attr]
    assert sd == pytest.approx(speed.sd, rel=0.2)
    assert tau == pytest.approx(speed.tau_s, rel=0.35)
    assert jitter == pytest.approx(speed.jitter_sd, rel=0.1)
    # the bias a time average (a fast second holds more steps than a slow one, and is not worth more)
    assert statistics.mean(g.bias for g in got) == pytest.approx(speed.bias, abs=0.015)  # type: ignore[union-attr]


def test_a_node_that_only_jitters_has_no_slow_part_and_a_fresh_tracker_says_nothing() -> None:
    got = _track(Speed(0.0, 1.0, 0.1), 0).estimate()
    assert got is not None and got.sd < 0.02 and got.jitter_sd == pytest.approx(0.1, rel=0.1)
    fresh = SpeedTracker()
    for k in range(10):
        fresh.add(k * 0.5, 0.03, 0.03)
    assert fresh.estimate() is None  # too few windows


def test_a_tracker_forgets_windows_older_than_it_keeps() -> None:
    tracker = _track(Speed(0.1, 1.0, 0.1), 0, seconds=100.0)
    assert tracker.estimate(100.0) is not None
    assert tracker.estimate(100.0 + tracker.keep_s - 50.0) is not None  # the last ~50 windows are still kept
    assert len(tracker.windows) < 60
    assert tracker.estimate(102.0 + tracker.keep_s) is None and not tracker.windows  # idle for longer: nothing


def test_sparse_work_reads_as_jitter_not_as_a_node_at_its_fit() -> None:
    # a prefill every 2-3 s: windows of one piece each, the jitter cannot be told from a slow part
    rng, drawn, tracker, t = random.Random(5), NodeSpeed(Speed(0.0, 1.0, 0.2), random.Random(6)), SpeedTracker(), 0.0
    for _ in range(60):
        t += rng.uniform(2.0, 3.0)
        took = 0.3 * drawn.factor(t)
        tracker.add(t, took, 0.3)
    got = tracker.estimate()
    assert got is not None and got.sd == 0.0 and got.jitter_sd == pytest.approx(0.2, rel=0.3)
    assert abs(got.bias) < 0.08


def test_window_formulas_at_their_limits() -> None:
    assert window_correlation(1e-3) == pytest.approx(1.0, abs=1e-3) and window_correlation(50.0) < 0.02
    assert window_share(1e-3) == pytest.approx(1.0, abs=1e-3) and window_share(50.0) == pytest.approx(2 / 50, rel=0.05)


def test_drawn_factors_average_one_and_keep_their_time_constant() -> None:
    speed = Speed(0.12, 2.0, 0.0)
    drawn = NodeSpeed(speed, random.Random(3))
    xs = [drawn.factor(0.1 * k) for k in range(50_000)]
    assert statistics.mean(xs) == pytest.approx(1.0, abs=0.03)
    logs = [math.log(x) for x in xs]
    m = statistics.mean(logs)
    lag = 20  # 2 s, one time constant: correlation e^-1
    cov = statistics.mean((a - m) * (b - m) for a, b in zip(logs, logs[lag:]))
    assert cov / statistics.pvariance(logs) == pytest.approx(math.exp(-1), abs=0.08)
    assert statistics.pstdev(logs) == pytest.approx(0.12, rel=0.15)


def test_speed_checks_and_pool_mean() -> None:
    with pytest.raises(ValueError):
        Speed(-0.1)
    with pytest.raises(ValueError):
        Speed(0.1, 0.0)
    assert not Speed().varies and Speed(0.0, 1.0, 0.1).varies and Speed(bias=0.05).varies
    pool = Speed.mean([Speed(0.3, 1.0, 0.0), Speed(0.4, 3.0, 0.0)])
    assert pool.sd == pytest.approx(math.sqrt((0.09 + 0.16) / 2)) and pool.tau_s == 2.0
    assert Speed.mean([]) == Speed()


def test_a_node_measures_and_exports_how_far_its_steps_stray_from_its_fit() -> None:
    from tests.test_node_perf import Clock

    from tandem.node.perf import NodePerf

    clock, perf = Clock(), NodePerf(Clock())
    perf._clock = clock  # (one clock for the perf and this test)
    drawn = NodeSpeed(Speed(0.15, 1.0, 0.05), random.Random(1))
    perf.decode_started("a", 500)
    perf.decode_output("a", 1)
    start = clock.t
    while clock.t < start + 120:
        clock.t += (0.02 + 1e-6 * perf._batch_context) * drawn.factor(clock.t)
        perf.decode_output("a", 1)
    perf.decode_ended("a")  # idle: exported now
    idle_at = clock.t
    speeds = {f.name: f for f in perf.load().speeds}
    assert "prefill" not in speeds  # no prefill timed here
    d = speeds["decode"]
    assert list(d.terms) == ["sd", "tau_s", "jitter_sd", "bias"] and d.samples > 3000
    assert 0.08 < d.coefficients[0] < 0.25 and 0.3 < d.coefficients[1] < 3.0 and abs(d.coefficients[3]) < 0.05
    assert d.coefficients[2] < d.coefficients[0]  # the jitter (0.05) read below the slow part (0.15)
    assert perf.speeds()["decode"] == Speed(*d.coefficients)
    # idle past what a tracker keeps: no speed exported, rather than an old one
    clock.t = idle_at + 700.0  # (nothing more served: its load, asked, ages them out)
    assert perf.load().speeds == [] and perf.speeds() == {}
    # the startup profile's runs are not the node's speed: measured afresh once it holds its profile
    perf.hold_profile()
    assert perf.load().speeds == [] and perf.speed["decode"].samples == 0


def test_the_simulator_runs_nodes_at_their_drawn_speeds_unseen_by_admission() -> None:
    from tests.test_sim import Req

    from tandem.sim import simulate, simulate_summary

    t = Timings((0.01, 1e-4, 0.0), (0.02, 0.001, 0.0))
    reqs = [Req(0.5 * k, 200, 50) for k in range(200)]
    base = SimConfig(1, 1, t, t, order="fifo")
    still = simulate(base, reqs)
    speedy = SimConfig(1, 1, t, t, order="fifo", decode_speed=Speed(0.2, 1.0, 0.05), prefill_speed=Speed(0.2, 1.0))
    a, b = simulate(speedy, reqs), simulate(speedy, reqs)
    assert [o.tpot_s for o in a] == [o.tpot_s for o in b]  # seeded: the same every time
    other = simulate(SimConfig(1, 1, t, t, order="fifo", decode_speed=Speed(0.2, 1.0, 0.05),
                               prefill_speed=Speed(0.2, 1.0), speed_seed=1), reqs)
    assert [o.tpot_s for o in other] != [o.tpot_s for o in a]
    assert len({round(o.ttft_s, 9) for o in still}) == 1  # alone each time: at its fit exactly
    assert statistics.pstdev(o.ttft_s for o in a) > 0.002  # strays
    # on average at the fit: each factor's mean is 1
    assert statistics.mean(o.tpot_s for o in a) == pytest.approx(statistics.mean(o.tpot_s for o in still), rel=0.05)
    # a summary averages its draws; without variation it is one run's
    assert simulate_summary(base, reqs, 1.0, 0.1)["attainment"] == 1.0
    mean = simulate_summary(speedy, reqs, 1.0, 0.025, draws=3)
    assert 0.0 < mean["attainment"] < 1.0 and mean["missed"]["tpot"] > 0


def test_plan_takes_a_node_speed_and_a_node_that_strays_serves_less_within_tpot(tmp_path) -> None:
    from tandem.plan import parse_speed, plan
    from tandem.plan_report import write_report

    assert parse_speed("") == Speed() and parse_speed("0.1") == Speed(0.1)
    assert parse_speed("0.11,2,0.1") == Speed(0.11, 2.0, 0.1)
    for bad in ("x", "0.1,1,0.1,0,4", "-0.1", "0.1,0"):
        with pytest.raises(ValueError):
            parse_speed(bad)
    # decode-bound, with admission packing batches up to the TPOT objective by the profile: where
    # the steps stray, streams go over it
    from tandem.plan import probe_attainment

    t = Timings((0.005, 0.00001, 0.0), (0.01, 0.004, 0.0))
    cfg = SimConfig(1, 1, t, t, slo_ttft_s=2.0, slo_tpot_s=0.05, admission=True)
    strayed = replace(cfg, prefill_speed=Speed(0.2, 1.0, 0.1), decode_speed=Speed(0.2, 1.0, 0.1))
    for rate in (0.5, 1.0):
        assert probe_attainment(strayed, "chat", 2.0, 0.05, rate, 0, requests=300) < probe_attainment(
            cfg, "chat", 2.0, 0.05, rate, 0, requests=300)
    kw = dict(requests=300, seeds=1, admission=True)
    exact = plan(t, t, 2, "chat", 2.0, 0.05, **kw)
    strays = plan(t, t, 2, "chat", 2.0, 0.05, speed=Speed(0.2, 1.0, 0.1), **kw)
    assert strays["node_speed"] == [0.2, 1.0, 0.1, 0.0] and exact["node_speed"] == [0.0, 1.0, 0.0, 0.0]
    assert strays["rows"][0]["probes"] != exact["rows"][0]["probes"]
    assert "slow part sd 0.200 over 1.0 s" in write_report(tmp_path, strays).read_text()
    assert "stray" not in write_report(tmp_path / "x", exact).read_text()


def test_a_node_speed_is_refused_where_a_plan_would_not_use_it(capsys) -> None:
    import argparse

    from tandem.plan import add_args, cmd_plan

    ap = argparse.ArgumentParser()
    add_args(ap)
    for extra in (["--validate"], ["--parallel", "a=1:x.json"]):
        args = ap.parse_args(["--slo-ttft", "1", "--slo-tpot", "0.1", "--node-speed", "0.1,1,0.1", *extra])
        assert cmd_plan(args) == 2
        assert "--node-speed is for a plan" in capsys.readouterr().err
    args = ap.parse_args(["--slo-ttft", "1", "--slo-tpot", "0.1", "--node-speed", "0.1,x"])
    assert cmd_plan(args) == 2 and "want numbers" in capsys.readouterr().err
