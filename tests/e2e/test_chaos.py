"""The chaos suite's CI subset (tandem/local/chaos.py, CI_SCENARIOS) on a real supervised cluster of
2 coordinators, 2 prefill and 2 decode nodes under a seeded streaming load: a killed decode node, a
drained prefill node, a killed coordinator (one of two front doors), a cut KV path, a frozen etcd
(longer than the nodes' 3 s lease TTL) and a decode node switched to prefill and back (`tandem role`). The full suite, with the other freezes and kills and a
rolling restart of every node, is a command (`tandem chaos`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.local.chaos import CI_SCENARIOS
from tandem.local.chaos_cmd import chaos_cluster, run_scenarios

pytestmark = pytest.mark.e2e

REQUESTS = 30


@pytest.fixture(scope="module")
def results(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("chaos")
    # mutual TLS everywhere, the KV control connections too: the promises hold under it
    with chaos_cluster(str(tiny_model), str(out / "logs"), tls=True) as (cluster, proxy):
        res = {r.scenario: r for r in run_scenarios(cluster, list(CI_SCENARIOS), requests=REQUESTS, rate=3.0,
                                                     seed=0, out_dir=out, proxy=proxy)}
        res["proxy cuts"] = proxy.cuts  # type: ignore[assignment]
        yield res


@pytest.mark.parametrize("scenario", CI_SCENARIOS)
def test_nothing_hangs_nothing_is_lost_nothing_leaks(results, scenario: str) -> None:
    r = results[scenario]
    assert r.requests == REQUESTS
    assert r.hung == 0 and r.lost == 0, r
    assert r.token_mismatches == 0
    assert r.kv_blocks_held_after == 0
    assert r.recovery_s is not None, "the cluster did not reconverge"
    # Both coordinators carried the load: each completed requests.
    assert all(r.by_front[f].get("ok", 0) >= 1 for f in ("coordinator", "coordinator-1")), r.by_front


def test_an_etcd_outage_costs_no_request_and_membership_reconverges(results) -> None:
    r = results["freeze-etcd"]
    # The coordinators serve on their last view meanwhile; the supervisor restarts etcd (3 silent
    # probes), the nodes register again, and recovery_s (checked above) saw every node back.
    assert r.completed == r.requests, r.statuses
    assert any(" etcd ready" in e for e in r.supervisor_events), r.supervisor_events


@pytest.mark.parametrize("scenario", ["kill-decode", "drain-prefill"])
def test_a_node_that_dies_or_drains_costs_no_request(results, scenario: str) -> None:
    r = results[scenario]
    # A dead decode node's requests migrate; a drained node finishes its own: every request completes.
    assert r.completed == r.requests, r.statuses
    victim_events = [e for e in r.supervisor_events if f" {r.victim} " in e]
    # The victim left (killed, or drained and exited 0) and the supervisor brought it back.
    assert any(" exited" in e for e in victim_events) and any(" ready" in e for e in victim_events), victim_events


def test_a_drained_node_hands_back_no_request(results) -> None:
    r = results["drain-prefill"]
    assert r.migrated == 0 and r.ended_with_status == 0


def test_a_killed_coordinator_ends_only_its_own_streams_and_serves_again_once_restarted(results) -> None:
    r = results["kill-coordinator"]
    assert r.victim == "coordinator"
    # The other front door served every request sent to it, during the fault too.
    assert r.by_front["coordinator-1"] == {"ok": REQUESTS // 2}, r.by_front
    # Through the killed one: completed, or ended UNAVAILABLE (a clear status), nothing else.
    assert set(r.by_front["coordinator"]) <= {"ok", "UNAVAILABLE"}, r.by_front
    assert r.statuses.get("UNAVAILABLE", 0) >= 1, "the kill landed while nothing was in flight or sent there"
    assert any(" coordinator exited" in e for e in r.supervisor_events)
    assert any(" coordinator ready" in e for e in r.supervisor_events)


def test_a_cut_kv_path_migrates_its_requests_to_the_other_prefill_node(results) -> None:
    r = results["cut-kv"]
    assert results["proxy cuts"] == 1
    assert r.completed == r.requests, r.statuses
    assert r.migrated >= 1, "no request's KV went through the cut path while it was cut"
    assert not r.supervisor_events, "a cut KV path restarts no daemon"


def test_a_role_switch_keeps_every_request_and_its_greedy_output(results) -> None:
    r = results["switch-roles"]
    assert r.completed == r.requests, r.statuses
    assert r.migrated == 0 and r.ended_with_status == 0
    # Asked while it streamed, it finished those streams, went to prefill, served there (through the
    # real coordinator), and came back to decode, each time restarting in place (the supervisor
    # waited; it killed nothing).
    assert [s["role"] for s in r.switches] == ["prefill", "decode"], r.switches
    # It held streams when its drain began (its own log says how many), and served as a prefill node.
    assert (r.switches[0]["held_at_drain"] or 0) >= 1 and r.switches[0]["served"] >= 1, r.switches
    victim_events = [e for e in r.supervisor_events if f" {r.victim} " in e]
    assert sum(" restarting-in-place" in e for e in victim_events) == 2, victim_events
    assert not any(" exited" in e or " unresponsive" in e for e in victim_events), victim_events
    # Those streams finished where they were: replayed undisturbed, with every other request in
    # flight at a switch and those the switched node served, each gave the same tokens
    # (token_mismatches, checked above).
    assert r.in_flight_at_switch >= 1
