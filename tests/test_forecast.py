"""bench/forecast.py on a synthetic coordinator log whose TPOTs follow the batch exactly."""

from __future__ import annotations

import datetime
import random
from pathlib import Path

import pytest

from tandem.bench.forecast import Batch, Req, analyse, read, replay_factor
from tandem.bench.forecast_ttft import (replay_ttft, ttft_local_by_batch, ttft_local_by_credit, ttft_local_by_later,
                                        ttft_local_room, ttft_parts)


def test_the_batch_over_a_life_is_its_time_average() -> None:
    b = Batch([Req(0.0, 10.0, 100, 0.01, 0.01, "d"), Req(5.0, 15.0, 100, 0.01, 0.01, "d")])
    assert b.mean(0.0, 10.0) == pytest.approx(1.5)  # one stream, then two for the second half
    assert b.mean(10.0, 15.0) == pytest.approx(1.0)
    assert b.at(7.0) == 2 and b.at(20.0) == 0


def test_tpots_that_follow_the_batch_are_found_by_the_oracle_and_the_log_is_read(tmp_path: Path) -> None:
    # Requests every 2 s, each decoding 5 s: TPOT = 10 ms + 4 ms a stream of its life's mean batch.
    spans = [(2.0 * i, 2.0 * i + 5.0) for i in range(20)] + [(100.0, 103.0)]  # and one on another node
    reqs = [Req(a, b, 200, 0.0, 0.0, "decode-0" if a < 100 else "decode-1") for a, b in spans]
    for r in reqs:
        mine = [q for q in reqs if q.node == r.node]
        r.tpot = 0.010 + 0.004 * Batch(mine).mean(r.start, r.end)
    t0 = datetime.datetime(2026, 12, 1, 12, 0, 0).timestamp()
    lines = []
    for r in sorted(reqs, key=lambda r: r.end):
        stamp = datetime.datetime.fromtimestamp(t0 + r.end).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        ttft, e2e = 0.2, r.end - r.start + 0.2
        lines.append(f"{stamp} INFO coordinator tandem.coordinator.request: request req-x: length after 200 tokens "
                     f"(ttft {ttft:.3f} s, tpot {r.tpot * 1000:.1f} ms, e2e {e2e:.3f} s, prefill prefill-0, decode "
                     f"{r.node}, migrations 0, dispatch 0.100 s, prefill call 0.100 s; predicted ttft 0.250 s, tpot "
                     f"{r.tpot * 1100:.1f} ms, learned factors x1.00, x1.10, of the ttft waiting 0.150 s)")
    log = tmp_path / "coordinator.log"
    log.write_text("\n".join(lines) + "\n")
    got = read(str(log))
    assert len(got) == len(reqs) and {r.node for r in got} == {"decode-0", "decode-1"}
    res = analyse(got)
    assert res["fit"]["per_stream_s"] == pytest.approx(0.004, rel=0.05)
    assert res["oracle"]["p90"] < 0.02  # the batch over each life explains every TPOT
    assert res["admission"]["p50"] == pytest.approx(0.1, abs=0.01)  # predicted 10 % high throughout
    assert res["admission, no factor"]["p90"] < 0.01  # ... all of it the learned factor
    # The model alone is right here: a factor learned at any weight stays 1 (and so does the
    # calibration with its line, which these few requests leave a factor).
    assert replay_factor(got, 0.1)["p90"] < 0.01 and replay_factor(got, 0.1, lines=False)["p90"] < 0.01
    # TTFT 0.2 s predicted 0.25 s: all of the 25 % in the wait (0.15 s predicted, 0.1 s measured).
    t = ttft_parts(str(log))["prefill node"]
    assert t["p50"] == pytest.approx(0.25) and t["wait_p50"] == pytest.approx(0.25) and t["rest_p90"] == pytest.approx(0)


def finished(rid: str, ttft: float, pred: float, call: float = 0.3, stamp: str = "2026-12-02 06:30:57,833",
             e2e: float = 5.399, factor: float = 0.8717) -> str:
    """A coordinator log's line for a request that prefilled on its decode node and finished
    (at ``stamp``, its TTFT prediction carrying its node's learned ``factor``)."""
    return (f"{stamp} INFO coordinator tandem.coordinator.request: request {rid}: length after "
            f"51 tokens (ttft {ttft:.3f} s, tpot 72.9 ms, e2e {e2e:.3f} s, prefill decode-0 (local), decode "
            f"decode-0, migrations 0, dispatch 0.003 s, prefill call {call:.3f} s; predicted ttft {pred:.3f} s, tpot "
            f"69.8 ms, learned factors x{factor:.4f}, x0.7120, of the ttft waiting 0.000 s)")


def test_local_prefills_ttft_error_is_split_by_the_kv_room_wait_admission_predicted(tmp_path: Path) -> None:
    def admitted(rid: str, room: str) -> str:
        return (f"2026-12-02 06:30:52,435 INFO coordinator tandem.coordinator.admission: request {rid}: admitted, "
                f"prefills on decode node decode-0: decode-0 (prefill here): queue 0 prompts 0 ms + prefill 330 ms "
                f"+ 2 steps beside a batch of 14 56 ms{room} (x0.87, learned); decode-0 (prefill here): batch 14 "
                "now, 13.4 + 1 over its life, step 60.0 ms + 9 ms for KV room (1 tokens short)")

    log = tmp_path / "coordinator.log"
    log.write_text("\n".join([admitted("a", " + 900 ms for KV room (300 tokens short)"), finished("a", 1.5, 1.2, call=1.753),
                              admitted("b", ""), finished("b", 0.2, 0.25), admitted("c", ""), finished("c", 2.0, 0.5),
                              finished("d", 0.3, 0.3)]) + "\n")  # (d: no admission line, left out)
    got = ttft_local_room(str(log))
    assert got["KV room wait predicted"]["requests"] == 1 and got["KV room wait predicted"]["p50"] == pytest.approx(0.2)
    assert got["no KV room wait predicted"]["requests"] == 2  # (the TPOT part's room does not count)
    over = got["TTFT over 1 s"]
    assert over["requests"] == 2 and over["signed_p50"] == pytest.approx((-0.2 - 0.75) / 2)


def test_local_prefills_with_none_queued_ahead_have_their_ttft_error_split_by_the_batch(tmp_path: Path) -> None:
    def admitted(rid: str, queue: int, batch: int, step_ms: float, held: str = "") -> str:
        return (f"2026-12-02 06:30:52,435 INFO coordinator tandem.coordinator.admission: request {rid}: admitted, "
                f"prefills on decode node decode-0: decode-0 (prefill here): queue {queue} prompts 0 ms + prefill 200 ms "
                f"+ 2 steps beside a batch of {batch} 56 ms (x0.87, learned){held}; decode-0 (prefill here): batch "
                f"{batch} now, 13.4 + 1 over its life, step {step_ms:.1f} ms")

    log = tmp_path / "coordinator.log"
    log.write_text("\n".join([
        admitted("a", 0, 0, 20.0), finished("a", 0.200, 0.200),
        admitted("b", 0, 10, 60.0), finished("b", 0.330, 0.300),
        admitted("c", 0, 11, 60.0), finished("c", 0.320, 0.300),
        admitted("d", 0, 12, 80.0), finished("d", 0.340, 0.300),
        admitted("e", 1, 12, 60.0), finished("e", 0.900, 0.300),  # (a prompt queued ahead: left out)
        admitted("f", 0, 12, 60.0, ", 64 tokens held there"), finished("f", 0.350, 0.300),  # (held: counted)
        admitted("g", 0, 12, 60.0, " + 90 ms for KV room (40 tokens short)"), finished("g", 0.900, 0.300),  # (left out)
    ]) + "\n")
    got = ttft_local_by_batch(str(log))
    assert set(got) == {"batch 0", "batch 9-12"}
    assert got["batch 0"]["requests"] == 1 and got["batch 0"]["excess_ms_p50"] == pytest.approx(0.0)
    nine = got["batch 9-12"]
    assert nine["requests"] == 4 and nine["excess_ms_p50"] == pytest.approx(35.0)  # (30, 20, 40, 50)
    assert nine["step_ms_p50"] == pytest.approx(60.0) and nine["p50"] == pytest.approx((30 / 330 + 40 / 340) / 2)


def test_local_prefills_ttft_error_is_split_by_the_local_prefills_admitted_to_their_node_while_theirs_ran(
        tmp_path: Path) -> None:
    def admitted(at: str, rid: str, node: str, queue: int = 0) -> str:
        return (f"2026-12-02 06:30:{at} INFO coordinator tandem.coordinator.admission: request {rid}: admitted, "
                f"prefills on decode node {node}: {node} (prefill here): queue {queue} prompts 0 ms + prefill 200 ms "
                f"+ 2 steps beside a batch of 3 56 ms (x0.87, learned); {node} (prefill here): batch 3 now, "
                "3.4 + 1 over its life, step 40.0 ms")

    log = tmp_path / "coordinator.log"
    log.write_text("\n".join([
        admitted("50,000", "a", "decode-0"), finished("a", 0.500, 0.400),  # b after it (c: another node)
        admitted("50,200", "b", "decode-0"), finished("b", 0.200, 0.250),  # none after it (0.2-0.4 s)
        admitted("50,300", "c", "decode-1"), finished("c", 0.300, 0.300),
        admitted("50,600", "d", "decode-0"), finished("d", 0.200, 0.200),
        admitted("50,650", "e", "decode-0", queue=1), finished("e", 0.300, 0.100),  # (queued ahead: left out)
    ]) + "\n")
    got = ttft_local_by_later(str(log))
    assert set(got) == {"0 admitted after it", "1 admitted after it"}  # (e counts as one after d)
    one = got["1 admitted after it"]
    assert [one["requests"], one["ratio_p50"]] == [2, pytest.approx((1.25 + 1.0) / 2)]  # a, and d (e after it)
    none = got["0 admitted after it"]
    assert none["requests"] == 2 and none["ratio_p10"] == pytest.approx(0.82) and none["ratio_p90"] == pytest.approx(0.98)


def test_local_prefills_ttft_error_is_split_by_whether_the_credited_prefix_was_the_engines(tmp_path: Path) -> None:
    def admitted(rid: str, held: int) -> str:
        there = f", {held} tokens held there" if held else ""
        return (f"2026-12-02 06:30:52,435 INFO coordinator tandem.coordinator.admission: request {rid}: admitted, "
                f"prefills on decode node decode-0: decode-0 (prefill here): queue 0 prompts 0 ms + prefill 200 ms "
                f"+ 2 steps beside a batch of 3 56 ms (x0.87, learned){there}; decode-0 (prefill here): batch 3 now, "
                "3.4 + 1 over its life, step 40.0 ms, 999 tokens held there")  # (the TPOT part's: not read)

    def prefilled(rid: str, cached: int) -> str:
        return (f"2026-12-02 06:30:52,900 INFO decode tandem.decode_node.server: request {rid}-d0: prefilled 600 "
                f"tokens here ({cached} cached) in 0.300 s")

    log = tmp_path / "coordinator.log"
    log.write_text("\n".join([admitted("a", 256), finished("a", 0.3, 0.3), admitted("b", 0), finished("b", 0.2, 0.4),
                              admitted("c", 512), finished("c", 0.5, 0.25), admitted("d", 256),
                              finished("d", 0.4, 0.3)]) + "\n")
    node = tmp_path / "decode-0.log"
    node.write_text("\n".join([prefilled("a", 256), prefilled("b", 256), prefilled("c", 256)]) + "\n")  # (d: none)
    got = ttft_local_by_credit(str(log), [str(node)])
    assert {k: v["requests"] for k, v in got.items()} == {"as the engine had": 1, "less than the engine had": 1,
                                                         "more than the engine had": 1}
    assert got["less than the engine had"]["signed_p50"] == pytest.approx(1.0)  # (predicted 0.4 s, took 0.2 s)
    assert got["more than the engine had"]["signed_p50"] == pytest.approx(-0.5)


def test_tpot_that_follows_the_batch_and_the_nodes_own_prefills_is_fitted_with_both(tmp_path: Path) -> None:
    from tandem.bench.forecast_work import tpot_by_node_work

    # One decode node that prefills every request itself: arrivals every 1.5 s, prefill calls of
    # 0.1-0.7 s, decode lives of 2-4 s; TPOT = 10 ms + 4 ms a stream + 50 ms x the share of the
    # life spent in a local prefill call.
    t0 = datetime.datetime(2026, 12, 1, 12, 0, 0).timestamp()
    calls = [(1.5 * i, 1.5 * i + 0.01, 1.5 * i + 0.01 + 0.1 + 0.2 * (i % 4)) for i in range(40)]
    reqs = [Req(hi, hi + 2.0 + (i * 7 % 5) * 0.5, 100, 0.0, 0.0, "decode-0", admitted=adm)
            for i, (adm, _, hi) in enumerate(calls)]
    for r in reqs:
        busy = sum(max(0.0, min(r.end, hi) - max(r.start, lo)) for _, lo, hi in calls)
        r.tpot = 0.010 + 0.004 * Batch(reqs).mean(r.start, r.end) + 0.05 * busy / (r.end - r.start)
    lines = []
    for r, (adm, lo, hi) in sorted(zip(reqs, calls), key=lambda x: x[0].end):
        stamp = datetime.datetime.fromtimestamp(t0 + r.end).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        lines.append(f"{stamp} INFO coordinator tandem.coordinator.request: request req-x: length after 100 tokens "
                     f"(ttft {r.start - adm:.3f} s, tpot {r.tpot * 1000:.3f} ms, e2e {r.end - adm:.3f} s, prefill "
                     f"decode-0 (local), decode decode-0, migrations 0, dispatch {lo - adm:.3f} s, prefill call "
                     f"{hi - lo:.3f} s; predicted ttft 0.300 s, tpot 20.0 ms, learned factors x1.00, x1.00, of the "
                     "ttft waiting 0.000 s)")
    log = tmp_path / "coordinator.log"
    log.write_text("\n".join(lines) + "\n")
    res = tpot_by_node_work(str(log))
    assert res["shares: prefill"]["requests"] == 40 and 0.05 < res["shares: prefill"]["life_mean"] < 0.3
    assert res["shares: prefill"]["known_mean"] == 0.0  # every call overlapping a life was admitted after it
    assert "shares: fetch" not in res  # (no decode node's log given)
    assert res["batch and local prefills' share of its life (oracle)"]["p90"] < 0.01  # (the log's rounding)
    assert res["batch (oracle)"]["p90"] > 0.02  # the batch alone leaves the prefills' part out

    # The same TPOTs and lives, disaggregated: the decode node fetched each request's KV over the
    # same spans as the calls above (its log's lines end them).
    (tmp_path / "disaggregated.log").write_text("\n".join(ln.replace(" (local)", "") for ln in lines) + "\n")
    assert tpot_by_node_work(str(tmp_path / "disaggregated.log")) == {}  # no local prefills, no node logs
    node_log = tmp_path / "decode-0.log"
    node_log.write_text("".join(
        datetime.datetime.fromtimestamp(t0 + hi).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        + f" INFO decode-0 tandem.kvtransfer.fetcher: request req-{i}: fetched 9 blocks (1179648 bytes) in "
          f"{hi - lo:.4f} s over tcp\n" for i, (_, lo, hi) in enumerate(calls)))
    res = tpot_by_node_work(str(tmp_path / "disaggregated.log"), [str(node_log)])
    assert "shares: prefill" not in res and res["shares: fetch"]["requests"] == 40
    assert res["batch and KV fetches' share of its life (oracle)"]["p90"] < 0.01
    assert res["batch (oracle)"]["p90"] > 0.02


def test_ttft_calibration_replayed_learns_a_steady_bias_and_a_line_that_scores_worse_is_left(tmp_path: Path) -> None:
    # Local prefills every second, each answered in 1 s: the model says 0.1-0.4 s and they take
    # 1.3x that; one in ten waits 0.5 s more (for KV room). A factor learns the 1.3x; the line
    # through them (a positive intercept) would lift the short ones more, and scores worse.
    t0 = datetime.datetime(2026, 12, 4, 3, 0, 0).timestamp()
    lines = []
    rng = random.Random(3)
    for i in range(300):
        model = rng.uniform(0.1, 0.4)
        ttft = model * 1.3 + (0.5 if rng.random() < 0.1 else 0.0)
        stamp = datetime.datetime.fromtimestamp(t0 + i + 1.0).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        lines.append(finished(f"req-{i}", ttft, model * 1.1, call=ttft, stamp=stamp, e2e=1.0, factor=1.1))
    log = tmp_path / "coordinator.log"
    log.write_text("\n".join(lines) + "\n")
    got = replay_ttft(str(log))["decode node (local)"]
    assert got["requests"] == 300
    assert got["model_p50"] == pytest.approx(0.3 / 1.3, abs=0.005)  # 1.3x what the model says
    assert got["factor_p50"] < 0.1 and got["calibration_p50"] < 0.1  # (the waits lift the factor a little)
    assert got["calibration_p90"] <= got["factor_p90"] + 0.01
    assert got["line_p50"] > 0.1 > got["calibration_p50"]  # the line used whenever there was one: worse


def test_bench_compare_reports_the_calibration_replay_of_its_own_run(tmp_path: Path) -> None:
    # `tandem bench compare` keeps the replay of each Tandem system's coordinator log among its
    # facts, and the report shows it as a table (not in the facts' list).
    from tandem.bench.compare_report import _replay_lines
    from tandem.bench.systems import replay_facts

    t0 = datetime.datetime(2026, 12, 4, 3, 0, 0).timestamp()
    lines = []
    for i in range(300):
        model = 0.1 + 0.01 * (i % 7)
        stamp = datetime.datetime.fromtimestamp(t0 + i + 1.0).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        lines.append(finished(f"req-{i}", model * 1.25, model, call=model * 1.25, stamp=stamp, e2e=1.0, factor=1.0))
    log = tmp_path / "coordinator.log"
    log.write_text("\n".join(lines) + "\n")
    facts = replay_facts(log)
    got = facts["ttft_replay"]["decode node (local)"]
    assert got["requests"] == 300 and got["model_p50"] == pytest.approx(0.2, abs=0.001)  # the model: 1/1.25 the time
    assert got["factor_p50"] < 0.1 < got["model_p50"]  # a factor learns the 1.25x (at ~50 requests' memory)
    rows = [line for line in _replay_lines([{"name": "tandem-0:2", "facts": facts}]) if line.startswith("| tandem")]
    cells = [f"{got[f'{k}_p50']:.0%} / {got[f'{k}_p90']:.0%}" for k in ("factor", "line", "calibration")]
    assert rows == ["| tandem-0:2 | decode node (local) | 300 | 20% / 20% | " + " | ".join(cells) + " |"]
    assert replay_facts(tmp_path / "absent.log") == {} and _replay_lines([{"name": "vllm", "facts": {}}]) == []
    (tmp_path / "unreadable.log").mkdir()  # a log that cannot be read: said, not raised
    assert "ttft_replay_error" in replay_facts(tmp_path / "unreadable.log")


def test_the_least_tpot_error_at_admission_is_the_spread_the_arrivals_leave() -> None:
    import numpy as np

    from tandem.bench.forecast_bound import arrivals_bound, draw_tpots, weighted_median

    # The minimiser of sum(w · |v - x|): the value where the weights reach half.
    assert weighted_median(np.array([3.0, 1.0, 2.0]), np.array([1.0, 1.0, 1.0])) == 2.0
    assert weighted_median(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 5.0])) == 3.0
    rng = np.random.default_rng(0)
    # No arrivals: the batch known at the start is the whole story (2 streams for the life).
    assert np.allclose(draw_tpots(4.0, 8.0, 0.0, np.array([1.0]), 0.01, 0.002, 5, rng), 0.014)
    # Arrivals at 2/s each staying 1 s over a 10 s life: ~2 more streams for most of it (each one
    # arriving in the last second stays less), on top of the request alone.
    mean = draw_tpots(10.0, 10.0, 2.0, np.array([1.0]), 0.0, 1.0, 4000, rng).mean()
    assert mean == pytest.approx(1.0 + 2.0 * (1.0 - 0.5 / 10.0), rel=0.03)

    # Requests every second on one node, each decoding 4 s.
    def reqs(tpot: float) -> list[Req]:
        return [Req(float(i), i + 4.0, 200, tpot, tpot, "d") for i in range(60)]

    # A step that does not grow with the batch: nothing to forecast, no error at all.
    flat = arrivals_bound(reqs(0.01), 0.01, 0.0)
    assert flat["drawn"]["p90"] == 0.0 and flat["measured"]["p90"] == pytest.approx(0.0, abs=1e-12)
    # A step that grows with it: the arrivals' spread is an error no prediction removes, and it
    # grows with the step's share per stream.
    small, large = arrivals_bound(reqs(0.02), 0.01, 0.001), arrivals_bound(reqs(0.02), 0.01, 0.004)
    assert 0.0 < small["drawn"]["p90"] < large["drawn"]["p90"]
    assert small["arrivals_per_life"]["mean"] == pytest.approx(4.0, rel=0.1)


def test_the_streams_a_prefill_node_serves_whole_are_split_by_their_tpot_objective_with_the_prefills_beside_them(
        tmp_path: Path) -> None:
    from tandem.bench.forecast_whole import whole_streams

    def line(end: str, rid: str, tokens: int, ttft: float, tpot_ms: float, e2e: float, prefill: str, decode: str,
             call: float, pred_ms: float = 15.0) -> str:
        return (f"2026-12-06 08:00:{end} INFO coordinator tandem.coordinator.request: request {rid}: length after "
                f"{tokens} tokens (ttft {ttft:.3f} s, tpot {tpot_ms:.1f} ms, e2e {e2e:.3f} s, prefill {prefill}, "
                f"decode {decode}, migrations 0, dispatch 0.001 s, prefill call {call:.3f} s; predicted ttft 0.100 s, "
                f"tpot {pred_ms:.1f} ms, learned factors x1.0000, x1.0000, of the ttft waiting 0.000 s)")

    # "whole": received at 08:00:00, first token at 0.1 s, decoding until 3.1 s (101 tokens, 30 ms each).
    # "before" was admitted at -0.5 s (a prefill call of 0.4 s ending at 0.3 s: 0.2 s of it in the
    # decode); "after" at 1.0 s (0.5 s, all of it in the decode); "far" long after it ended.
    # "calm" is served whole later, with no prefill beside it, within the objective.
    def whole(rid: str) -> str:
        return (f"2026-12-06 08:00:00,000 INFO coordinator tandem.coordinator.admission: request {rid}: admitted, "
                "served whole on prefill node prefill-0: prefill-0 (prefill here): queue 0 prompts 0 ms")

    log = tmp_path / "coordinator.log"
    log.write_text("\n".join([
        whole("whole"), whole("calm"),
        line("00,800", "before", 20, 0.8, 10.0, 1.3, "prefill-0", "decode-0", 0.4),  # received 07:59:59.500
        line("03,100", "whole", 101, 0.1, 30.0, 3.1, "prefill-0 (local)", "prefill-0", 0.1, 18.0),
        line("03,500", "after", 20, 0.5, 10.0, 2.5, "prefill-0", "decode-0", 0.5),  # received 1.0 s, call 1.0-1.5 s
        line("30,000", "far", 20, 0.5, 10.0, 1.0, "prefill-0", "decode-0", 0.5),
        line("40,000", "calm", 21, 0.1, 12.0, 1.0, "prefill-0 (local)", "prefill-0", 0.1),
        line("41,000", "local", 21, 0.1, 40.0, 1.0, "decode-0 (local)", "decode-0", 0.1),  # a decode node's own
    ]) + "\n")
    got = whole_streams(str(log), 0.019)
    assert set(got) == {"over", "within"}
    over, within = got["over"], got["within"]
    assert over["streams"] == 1 and over["tpot_ms_p50"] == pytest.approx(30.0) and over["predicted_tpot_ms_p50"] == 18.0
    assert over["stall_known_s_p50"] == pytest.approx(0.2, abs=1e-3)
    assert over["stall_later_s_p50"] == pytest.approx(0.5, abs=1e-3)
    assert within == {"streams": 1, "tpot_ms_p50": 12.0, "predicted_tpot_ms_p50": 15.0, "stall_known_s_p50": 0.0,
                      "stall_later_s_p50": 0.0}
    # A node that served streams whole and no prefill call at all: they count too.
    log.write_text("\n".join([whole("calm"), line("40,000", "calm", 21, 0.1, 12.0, 1.0, "prefill-0 (local)",
                                                   "prefill-0", 0.1)]) + "\n")
    assert whole_streams(str(log), 0.019)["within"]["streams"] == 1
