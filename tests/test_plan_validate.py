"""`tandem plan --validate`'s own logic: the split it runs, a pool's times as one, repetitions
summed up (the real cluster's runs stubbed; the e2e path is `tandem plan --validate` itself)."""

from __future__ import annotations

import argparse
import math

import pytest

from tandem.simconfig import SimConfig
from tandem.timings import Timings


def test_a_pools_times_are_the_mean_of_its_nodes_and_a_missing_fit_does_not_dilute_it() -> None:
    a = Timings((0.01, 1e-4, 0.0), (0.02, 1e-3, 1e-6), (0.001, 1e-9), "a", (0.02, 1e-5, 3e-5))
    b = Timings((0.03, 3e-4, 2e-8), (0.04, 3e-3, 3e-6), (0.0, 0.0), "b")
    m = Timings.mean([a, b])
    assert m.prefill == pytest.approx((0.02, 2e-4, 1e-8)) and m.decode == pytest.approx((0.03, 2e-3, 2e-6, 0.0))
    # the mean of the predictions (the forms are linear in their coefficients)
    assert m.step_s(12, 3000) == pytest.approx((a.step_s(12, 3000) + b.step_s(12, 3000)) / 2)
    assert m.prefill_s(700, 64) == pytest.approx((a.prefill_s(700, 64) + b.prefill_s(700, 64)) / 2)
    # b learned no transfer and no KV store load: a's stand, not halved
    assert m.transfer == a.transfer and m.store_load == a.store_load
    assert m.source == "a + b" and Timings.mean([a], "pool").source == "pool"
    with pytest.raises(ValueError, match="no timings"):
        Timings.mean([])


def test_the_split_validated_must_fit_this_host_and_have_a_way_to_prefill() -> None:
    from tandem.plan_validate import parse_split

    assert parse_split("1:1", False, 2) == (1, 1)
    assert parse_split("0:2", True, 2) == (0, 2)
    for split, local, cores, said in (("0:2", False, 2, "--conditional-disagg on"),
                                      ("1:2", True, 2, "3 nodes on 2 cores"),
                                      ("2:0", True, 4, "needs a decode node"),
                                      ("one-one", True, 2, "want P:D")):
        with pytest.raises(ValueError, match=said):
            parse_split(split, local, cores)


def _row(rate: float, rep: int, measured_tpot: float, predicted_tpot: float, attainment: float) -> dict:
    from tandem.plan_validate import rel_error

    m = {"attainment": attainment, "ttft_p50_s": 0.2, "ttft_p90_s": 0.3, "tpot_p50_s": measured_tpot,
         "tpot_p90_s": math.nan}
    p = {"attainment": 0.9, "ttft_p50_s": 0.22, "ttft_p90_s": 0.3, "tpot_p50_s": predicted_tpot, "tpot_p90_s": 0.05}
    return {"rate": rate, "rep": rep, "measured": m, "predicted": p,
            "error": {k: rel_error(p[k], m[k]) for k in p}, "measured_attainment": attainment,
            "predicted_attainment": 0.9,
            "missed": {"measured": {"refused": 2, "failed": 0, "ttft": 1, "tpot": 3},
                       "predicted": {"refused": 1, "failed": 0, "ttft": 1, "tpot": 1}}}


def test_repetitions_give_each_rate_its_means_and_the_spread_of_single_errors(tmp_path) -> None:
    from tandem.plan_validate import over_reps, write_report

    # one repetition 20 % low on TPOT, the other 20 % high: each misses 15 %, their means agree
    rows = [_row(1.0, 0, 0.030, 0.024, 0.95), _row(1.0, 1, 0.020, 0.024, 0.85),
            _row(2.0, 0, 0.040, 0.036, 0.70), _row(2.0, 1, 0.040, 0.044, 0.80)]
    one, two = over_reps(rows)
    assert one["rate"] == 1.0 and one["reps"] == 2
    assert one["measured"]["tpot_p50_s"] == pytest.approx(0.025)
    assert one["predicted"]["tpot_p50_s"] == pytest.approx(0.024)
    assert one["error"]["tpot_p50_s"] == pytest.approx(0.04)
    assert one["error_range"]["tpot_p50_s"] == pytest.approx([0.2, 0.2])  # both 20 % off, in opposite ways
    assert two["error_range"]["tpot_p50_s"] == pytest.approx([0.1, 0.1])
    assert one["measured_attainment"] == pytest.approx(0.9)
    # a figure no repetition measured has no mean and no error, not a crash
    assert math.isnan(one["measured"]["tpot_p90_s"]) and math.isnan(one["error"]["tpot_p90_s"])
    doc = {"workload": "chat", "split": "0:2", "reps": 2, "slo": {"ttft_s": 0.5, "tpot_s": 0.05},
           "duration_s": 60.0, "fits": "learned", "goal": "within 15 %", "rows": rows, "over_reps": [one, two],
           "goodput": {"measured": 1.0, "predicted": 2.0, "of": "the mean over 2 repetitions"},
           "transfer_modelled": True, "conditional_disagg": True, "admission": True}
    write_report(tmp_path, doc)
    text = (tmp_path / "validate.md").read_text()
    assert "chat, 0:2 on this host" in text
    assert "Repetition 1 (seeds from 7000)" in text and "Repetition 2 (seeds from 8000)" in text
    assert "| 1 | 2 | 90% / 90% (0%; 5%–6%) | 200 / 220 (10%; 10%–10%) |" in text
    assert "25.0 / 24.0 (4%; 20%–20%) | – / 50.0 (–; –) | 4-2-6 / 2-2-2 |" in text  # misses summed
    assert "| 100% / 100% | 2-1-3 / 1-1-1 |" not in text and "| – / – | 2-1-3 / 1-1-1 |" in text  # a repetition's
    assert "(the mean over 2 repetitions): measured 1 req/s, predicted 2 req/s" in text


def test_a_repetition_plays_fresh_seeded_traces(monkeypatch) -> None:
    from tandem.bench import compare
    from tandem.plan_validate import rate_rows

    sent: list[tuple[float, int]] = []
    measured = {"slo_attainment": 1.0, "ttft_s": {"p50": 0.05, "p90": 0.09}, "tpot_s": {"p50": 0.02, "p90": 0.03},
                "failed": 0}

    def run(target, entries, slo):  # type: ignore[no-untyped-def]
        sent.append((round(entries[0].arrival_s, 9), entries[0].input_len))
        return measured

    monkeypatch.setattr(compare, "_run", run)
    t = Timings((0.002, 4e-4, 5e-8), (0.008, 5e-4, 1e-6))
    cfg = SimConfig(1, 1, t, t, order="slack", slo_ttft_s=1.5, slo_tpot_s=0.1)
    args = argparse.Namespace(slo_ttft=1.5, slo_tpot=0.1, workload="chat", duration=20.0, max_model_len=2048)
    rate_rows("http://x", cfg, args, [1.0, 2.0])
    rate_rows("http://x", cfg, args, [1.0, 2.0])
    rate_rows("http://x", cfg, args, [1.0, 2.0], seed=8000)
    assert sent[:2] == sent[2:4]  # the same seed, the same traces
    assert sent[4] != sent[0] and sent[5] != sent[1]  # another repetition's are its own


def test_the_report_says_what_the_planner_says_of_the_split_at_the_rates_measured(tmp_path) -> None:
    from tandem.plan_validate import planner_view, write_report

    # one core's worth of a small model: the plan's probes meet the objectives at 0.5 req/s, and
    # its goodput search finds where they stop
    t = Timings((0.01, 2e-4, 0.0), (0.012, 5e-4, 1e-6))
    cfg = SimConfig(1, 1, t, t, order="slack", slo_ttft_s=1.0, slo_tpot_s=0.05, admission=True)
    args = argparse.Namespace(slo_ttft=1.0, slo_tpot=0.05, workload="chat", max_model_len=2048)
    view = planner_view(cfg, args, [0.5, 50.0])
    assert view["attainment"]["0.5"] >= 0.9 > view["attainment"]["50"]
    assert 0.5 <= view["goodput_rps"] < 50
    doc = {"workload": "chat", "split": "0:2", "slo": {"ttft_s": 1.0, "tpot_s": 0.05}, "duration_s": 60.0,
           "fits": "profile", "goal": "within 15 %", "rows": [], "goodput": {"measured": 0.5, "predicted": 0.5},
           "transfer_modelled": True, "kv_capacity_tokens": 20000, "prefill_cache_tokens": 20000,
           "prefix_cache": True, "planner": {**view, "attainment": {"0.5": 0.95, "50": 0.1}}}
    write_report(tmp_path, doc)
    text = (tmp_path / "validate.md").read_text()
    assert "KV memory, the same on both sides: each decode engine's cache 20,000 tokens." in text  # no prefill pool
    assert f"puts this split's goodput at {view['goodput_rps']:.3g} req/s" in text
    assert "its attainment at these rates: 0.5 req/s 95%, 50 req/s 10%." in text


def test_a_plan_warns_when_its_best_splits_attainment_never_gets_far_above_the_target(tmp_path) -> None:
    from tandem.plan_report import ceiling, sensitivity_note, table

    flat = {"prefill": 0, "decode": 2, "goodput_rps": 2.1, "per_node_rps": 1.05, "limited_by": "TTFT (prefill)",
            "probes": [[0.5, 0.936], [1.0, 0.93], [2.0, 0.907], [2.5, 0.862]]}
    steep = {**flat, "prefill": 1, "decode": 1, "probes": [[0.5, 1.0], [1.0, 0.99], [2.0, 0.5]]}
    assert ceiling(flat) == 0.936 and ceiling(steep) == 1.0
    doc = {"rows": [flat, steep], "best": "0:2"}
    note = " ".join(sensitivity_note(doc))
    assert "0:2 never gets above 94% of requests in SLO" in note
    assert not sensitivity_note({**doc, "best": "1:1"})  # 10 points of room: no warning
    assert not sensitivity_note({**doc, "best": "none"})
    assert table(doc)[2].endswith("| TTFT (prefill) | 94% |")


def test_misses_are_counted_by_why_alike_in_a_run_and_in_the_simulator() -> None:
    from tandem.bench.metrics import RequestTiming, summarize
    from tandem.simresults import Outcome, summary

    def req(ttft: float, tpot: float, **kw) -> RequestTiming:  # type: ignore[no-untyped-def]
        return RequestTiming(sent=0.0, first_token=ttft, token_times=[ttft, ttft + 10 * tpot], output_tokens=11, **kw)

    reqs = [req(0.1, 0.02), req(0.9, 0.02), req(0.1, 0.09), req(0.9, 0.09),  # met, late, slow, late (first)
            RequestTiming(sent=0.0, ok=False, rejected=True), RequestTiming(sent=0.0, ok=False, error="reset"),
            req(0.9, 0.02, slo_ttft=1.0)]  # its own objective: met
    got = summarize(reqs, 10.0, 0.5, 0.05)
    assert got["missed"] == {"refused": 1, "failed": 1, "ttft": 2, "tpot": 1}
    assert got["slo_attainment"] == pytest.approx(2 / 7)
    outs = [Outcome(0.0, 0.1, 0.02, completed=True), Outcome(0.0, 0.9, 0.02, completed=True),
            Outcome(0.0, 0.1, 0.09, completed=True), Outcome(0.0, 0.9, 0.09, completed=True),
            Outcome(0.0, refused=True), Outcome(0.0, never_fits=True)]
    assert summary(outs, 0.5, 0.05)["missed"] == {"refused": 1, "failed": 1, "ttft": 2, "tpot": 1}


def test_with_the_nodes_measured_speeds_a_rate_is_simulated_at_them_and_at_the_fits_beside(monkeypatch, tmp_path) -> None:
    from dataclasses import replace

    from tandem.bench import compare
    from tandem.nodespeed import Speed
    from tandem.plan_validate import rate_rows, write_report

    measured = {"slo_attainment": 0.8, "ttft_s": {"p50": 0.05, "p90": 0.09}, "tpot_s": {"p50": 0.02, "p90": 0.03},
                "failed": 0}
    monkeypatch.setattr(compare, "_run", lambda target, entries, slo: measured)
    t = Timings((0.002, 4e-4, 5e-8), (0.008, 5e-4, 1e-6))
    cfg = SimConfig(1, 1, t, t, order="slack", slo_ttft_s=1.5, slo_tpot_s=0.1, prefix_cache=False)
    args = argparse.Namespace(slo_ttft=1.5, slo_tpot=0.1, workload="chat", duration=20.0, max_model_len=2048)
    still = rate_rows("http://x", cfg, args, [2.0])[0]
    assert "predicted_at_fit" not in still and still["speed"]["decode"] == (0.0, 1.0, 0.0, 0.0)
    strays = replace(cfg, decode_speed=Speed(0.2, 1.0, 0.1, 0.1), prefill_speed=Speed(0.0, 1.0, 0.2))
    row = rate_rows("http://x", strays, args, [2.0])[0]
    assert row["speed"] == {"prefill": (0.0, 1.0, 0.2, 0.0), "decode": (0.2, 1.0, 0.1, 0.1)}
    assert row["predicted_at_fit"]["tpot_p50_s"] == pytest.approx(still["predicted"]["tpot_p50_s"])
    assert row["predicted"]["tpot_p50_s"] > still["predicted"]["tpot_p50_s"]  # +10 % on average
    doc = {"workload": "chat", "split": "1:1", "slo": {"ttft_s": 1.5, "tpot_s": 0.1}, "duration_s": 20.0,
           "fits": "learned", "goal": "within 15 %", "rows": [still, row], "goodput": {"measured": 2, "predicted": 2},
           "transfer_modelled": True}
    write_report(tmp_path, doc)
    text = (tmp_path / "validate.md").read_text()
    assert ("before 2 req/s prefill slow part sd 0.000 over 1.0 s, jitter sd 0.200, +0.0% on average, decode slow "
            "part sd 0.200 over 1.0 s, jitter sd 0.100, +10.5% on average.") in text
    assert "Without the nodes' speeds varying (every node exactly at its fit) the simulator would have said" in text
    # the rate before any speed was measured is named: the simulator ran steadier than the cluster there
    assert "No node had measured its speed yet before 2 req/s (a node needs 30 one-second windows" in text
    write_report(tmp_path, {**doc, "rows": [row]})
    assert "No node had measured" not in (tmp_path / "validate.md").read_text()


def test_with_admission_a_rate_is_simulated_calibrated_as_the_coordinator_and_raw_beside(monkeypatch, tmp_path) -> None:
    from dataclasses import replace

    from tandem.bench import compare
    from tandem.nodespeed import Speed
    from tandem.plan_validate import rate_rows, write_report

    measured = {"slo_attainment": 0.8, "ttft_s": {"p50": 0.05, "p90": 0.09}, "tpot_s": {"p50": 0.02, "p90": 0.03},
                "failed": 0}
    monkeypatch.setattr(compare, "_run", lambda target, entries, slo: measured)
    t = Timings((0.002, 4e-4, 5e-8), (0.008, 5e-4, 1e-6))
    args = argparse.Namespace(slo_ttft=1.5, slo_tpot=0.03, workload="chat", duration=60.0, max_model_len=2048)
    cfg = SimConfig(1, 1, t, t, order="slack", slo_ttft_s=1.5, slo_tpot_s=0.03, admission=True, prefix_cache=False,
                    decode_speed=Speed(bias=math.log(1.5)))  # slower than its fit: calibration learns it
    carry: list = []  # what the simulated coordinator learned: each rate starts from the one before's
    row = rate_rows("http://x", cfg, args, [2.0], carry=carry)[0]
    assert len(carry) == 4 and carry[0].decode[0]["tpot"].samples > 50
    raw, cal = row["predicted_uncalibrated"], row["predicted"]
    assert cal["attainment"] > raw["attainment"] + 0.15 and cal["tpot_p90_s"] < raw["tpot_p90_s"]
    assert "predicted_uncalibrated" not in rate_rows("http://x", replace(cfg, calibrate=False), args, [2.0])[0]
    doc = {"workload": "chat", "split": "1:1", "slo": {"ttft_s": 1.5, "tpot_s": 0.03}, "duration_s": 60.0,
           "fits": "learned", "goal": "within 15 %", "rows": [row], "goodput": {"measured": 2, "predicted": 2},
           "transfer_modelled": True}
    write_report(tmp_path, doc)
    assert ("Without the coordinator's calibration (every prediction raw) the simulator would have said"
            in (tmp_path / "validate.md").read_text())


def test_with_learned_fits_the_nodes_get_enough_work_to_measure_their_speeds_before_the_first_rate(monkeypatch) -> None:
    from tandem.bench import compare
    from tandem.nodespeed import MIN_WINDOWS
    from tandem.plan_validate import SPEED_WARM_S, warm_speeds

    sent = []
    monkeypatch.setattr(compare, "_run", lambda target, entries, slo: sent.append((entries, slo)) or {})
    warm_speeds("http://x", "chat", 2048)
    (entries, slo), = sent
    assert slo == (None, None)  # unmeasured
    assert len(entries) == SPEED_WARM_S
    arrivals = [e.arrival_s for e in entries]
    assert arrivals == [float(i) for i in range(SPEED_WARM_S)]  # one a second
    assert arrivals[-1] >= MIN_WINDOWS + 1  # more one-second windows with work than a speed needs, and their pairs
