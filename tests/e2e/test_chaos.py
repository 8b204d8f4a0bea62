"""The chaos suite's CI subset: kill-decode and drain-prefill (tandem/local/chaos.py, CI_SCENARIOS) on a
real supervised 2 prefill + 2 decode cluster under a seeded streaming load. The full suite is a
command (`tandem chaos`), not a test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.local.chaos import CI_SCENARIOS, chaos_cluster_spec, run_scenarios
from tandem.local.cluster import LocalCluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def results(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("chaos")
    with LocalCluster(chaos_cluster_spec(str(tiny_model), str(out / "logs"))) as cluster:
        yield {r.scenario: r for r in run_scenarios(cluster, list(CI_SCENARIOS), requests=30, rate=3.0, seed=0,
                                                     out_dir=out)}


@pytest.mark.parametrize("scenario", CI_SCENARIOS)
def test_nothing_hangs_nothing_is_lost_nothing_leaks(results, scenario: str) -> None:
    r = results[scenario]
    assert r.requests == 30
    assert r.hung == 0 and r.lost == 0, r
    # A dead decode node's requests migrate; a drained node finishes its own: every request completes.
    assert r.completed == r.requests, r.statuses
    assert r.token_mismatches == 0
    assert r.kv_blocks_held_after == 0
    assert r.recovery_s is not None, "the cluster did not reconverge"
    victim_events = [e for e in r.supervisor_events if f" {r.victim} " in e]
    # The victim left (killed, or drained and exited 0) and the supervisor brought it back.
    assert any(" exited" in e for e in victim_events) and any(" ready" in e for e in victim_events), victim_events


def test_a_drained_node_hands_back_no_request(results) -> None:
    r = results["drain-prefill"]
    assert r.migrated == 0 and r.ended_with_status == 0
