"""`tandem bench coordinator`'s baseline: grpc.aio alone making the calls a request costs
(bench/grpc_floor.py), driven by the same load generator."""

from __future__ import annotations

import argparse
import os

import pytest

from tandem.bench.coordinator_load import measure_floor


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the baseline pins its relay and nodes apart")
def test_the_baseline_relays_what_the_coordinator_would_with_its_messages() -> None:
    cores = sorted(os.sched_getaffinity(0))
    args = argparse.Namespace(duration=1.0, prompt_tokens=16, output_tokens=16)
    (row,) = measure_floor([20.0], args, {cores[0]}, set(cores[1:]))
    assert row["requests"] > 5 and row["errors"] == 0
    # Every request: all its tokens, in the coordinator's messages with --stream-interval 16: the
    # prefill's token, the decode's first, the rest with the finish.
    assert row["tokens"] == 16 * row["requests"]
    assert row["messages"] == 3 * row["requests"]
    assert row["cpu_us_per_request"] > 0
