"""`tandem bench coordinator`'s baseline: grpc.aio alone making the calls a request costs
(bench/grpc_floor.py), driven by the same load generator."""

from __future__ import annotations

import argparse
import os

import pytest

from tandem.bench.coordinator_load import measure_floor


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the baseline pins its relay and nodes apart")
@pytest.mark.parametrize("mode", ["call", "stream"])
def test_the_baseline_relays_what_the_coordinator_would_with_its_messages(mode: str) -> None:
    cores = sorted(os.sched_getaffinity(0))
    for interval, messages in ((16, 3), (4, 6)):
        args = argparse.Namespace(duration=1.0, prompt_tokens=16, output_tokens=16, stream_interval=interval)
        (row,) = measure_floor([20.0], args, {cores[0]}, set(cores[1:]), mode)
        assert row["requests"] > 5 and row["errors"] == 0
        # Every request: all its tokens, in the coordinator's messages at that --stream-interval: the
        # prefill's token, the decode's first, the other 14 `interval` at a time, the last with the
        # finish (16: one message; 4: four).
        assert row["tokens"] == 16 * row["requests"]
        assert row["messages"] == messages * row["requests"], interval
        assert row["cpu_us_per_request"] > 0


def test_the_admission_bench_times_decisions_on_a_cluster_whose_decode_nodes_are_busy(tmp_path) -> None:
    import asyncio
    import json

    from tandem.bench.admission_cost import busy_cluster, cmd_admission
    from tandem.coordinator.admission import Admission, Slo
    from tandem.coordinator.estimates import decode_view

    async def go() -> None:
        r = busy_cluster(4, 6)
        view = decode_view(r._nodes["d0"])
        # What each decision walks there: the streams with their budgets, a local prefill, a short cache.
        assert (view.batch, view.context, len(view.tpot_left), view.queue) == (6, 3600, 6, [300])
        plan = Admission(r, "off").plan("x", 512, 64, Slo(1.5, 0.1), count=False, prompt_ids=list(range(512)))
        assert plan.ttft_s is not None and plan.ttft_s > 0 and plan.tpot_s is not None and plan.tpot_s > 0

    asyncio.run(go())
    args = argparse.Namespace(pools="1,2", candidates="1,0", streams=2, iterations=2, repeats=1, out=str(tmp_path))
    assert cmd_admission(args) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [(r["pool"], r["candidates"]) for r in doc["rows"]] == [(1, 1), (2, 1), (1, 0), (2, 0)]
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "admission-cost.png").stat().st_size > 0
    assert "| 1 | " in report and "| 2 | " in report and "candidates 0 | candidates 1" in report


def test_the_relay_bench_sends_every_token_of_every_request_through_the_pipeline(tmp_path, tiny_model) -> None:
    import json

    from tandem.bench.relay_cost import cmd_relay

    args = argparse.Namespace(intervals="1,4", apis="grpc,http", requests=3, tokens=9, repeats=1,
                              model=str(tiny_model), out=str(tmp_path))
    # (it raises when a request's tokens did not all reach its client, or an HTTP stream's text is not theirs)
    assert cmd_relay(args) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    # gRPC: a message for the prefill's token, then the decode's 8 one or four at a time (the last with the
    # finish); HTTP: the same token events, then the finish's own.
    assert [(r["api"], r["interval"], r["messages"]) for r in doc["rows"]] == [
        ("grpc", 1, 3 * 9), ("http", 1, 3 * 10), ("grpc", 4, 3 * 3), ("http", 4, 3 * 4)]
    assert (tmp_path / "relay-cost.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "| grpc | 4 | 9 |" in report and "| http | 4 | 12 |" in report


def test_the_relay_bench_refuses_an_unknown_front_end(tmp_path, tiny_model) -> None:
    from tandem.bench.relay_cost import cmd_relay

    args = argparse.Namespace(intervals="1", apis="grpc,websocket", requests=1, tokens=2, repeats=1,
                              model=str(tiny_model), out=str(tmp_path))
    with pytest.raises(SystemExit, match="--apis: some of grpc, http"):
        cmd_relay(args)


def test_the_coordinator_bench_marks_probes_whose_load_side_was_saturated(tmp_path) -> None:
    from tandem.bench.coordinator_load import cores_busy_seconds
    from tandem.bench.coordinator_report import load_bound, write_report

    cores = set(os.sched_getaffinity(0))
    busy, every = cores_busy_seconds(cores)
    assert 0 < busy <= every
    assert cores_busy_seconds(set()) == (0.0, 0.0)

    def row(rate: float, lag_ms: float, busy: float, **kw: object) -> dict:
        return {"rate": rate, "sent_rate": rate, "added_ttft_p50_ms": 1.5, "added_ttft_p99_ms": 9.0,
                "ttft_p50_ms": 3.5, "send_lag_p99_ms": lag_ms, "load_cores_busy": busy, "cpu_share": 0.3,
                "cpu_us_per_request": 800.0, "cpu_us_per_token": 50.0, "tokens_per_s": 100.0, "errors": 0,
                "node_calls": "stream", **kw}

    calm, lagging, busy_side = row(100, 1.0, 0.4), row(200, 30.0, 0.6), row(300, 1.0, 0.97)
    assert not load_bound(calm) and load_bound(lagging) and load_bound(busy_side)
    rows = [dict(r, api="grpc", coordinator_cpu_share=0.5, cpu_us_per_request=1800.0)
            for r in (calm, lagging, busy_side)]
    write_report(tmp_path, {"rows": rows, "floor_rows": [calm, lagging, busy_side], "node_calls": ["stream"],
                            "apis": ["grpc"], "prefill_nodes": 4, "decode_nodes": 4, "profile": {},
                            "prompt_tokens": 64, "output_tokens": 16, "coordinator_cores": [0],
                            "other_cores": [1], "goal": "g", "top_functions": []})
    report = (tmp_path / "report.md").read_text()
    assert "| 1.0 ms, 40% |" in report and "| 30.0 ms, 60% † |" in report and "| 1.0 ms, 97% † |" in report
    # the baseline's own added TTFT and what Tandem's code costs beside it
    assert "| stream | 100 | 100 | 1.50 ms | 9.00 ms | 800 us | 1800 us | 1000 us | 1.0 ms, 40% |" in report


def test_the_coordinator_bench_times_inside_the_coordinator_from_the_finish_s_parts() -> None:
    from tandem.bench.coordinator_load import inside_s
    from tandem.proto import tandem_pb2 as pb

    # Remote prefill: 1 ms to the call, a 5 ms call, 0.5 ms to the first token's hand-off.
    assert inside_s(pb.Timings(ttft_s=0.0065, dispatch_s=0.001, prefill_call_s=0.005, prefill_s=0.004)) == \
        pytest.approx(0.0015)
    # A local prefill: its call is the whole span after the dispatch, nothing of it counted.
    assert inside_s(pb.Timings(ttft_s=0.05, dispatch_s=0.002, prefill_call_s=0.048, prefill_s=0.048,
                               local_prefill=True)) == pytest.approx(0.002)
    # Rounding that puts the call past the TTFT never counts time back.
    assert inside_s(pb.Timings(ttft_s=0.006, dispatch_s=0.001, prefill_call_s=0.0051)) == pytest.approx(0.001)
