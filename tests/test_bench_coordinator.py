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
