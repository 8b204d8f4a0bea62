"""Admission decisions on a synthetic cluster state: known models, known queues, known answers.
(Tests of the choice between prefill nodes turn local prefill off: the decode nodes here could
prefill as fast.)"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import re
import time

import grpc
import pytest

from tandem.coordinator.admission import Admission, Slo
from tandem.coordinator.choice import candidates
from tandem.coordinator.estimates import (beside_whole_s, decode_estimate, decode_load, decode_view, kv_wait,
                                          local_estimate, prefill_estimate, queued_prefill_s)
from tandem.coordinator.calibration import MAX_RATIO, MIN_SAMPLES, MIN_SLOPE, RATE, Calibration
from tandem.coordinator.nodeclient import Arrivals, Tally
from tandem.coordinator.prefillq import PrefillOrder
from tandem.coordinator.prefix import Held
from tandem.coordinator.router import Router
from tandem.errors import InvalidRequest, Rejected, openai_error_body
from tandem.membership import NodeRecord
from tandem.proto import tandem_pb2 as pb

LAYOUT = {"num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_size": 64, "dtype": "float32"}


def fits(prefill: tuple[float, float, float] = (0.01, 0.001, 0.0), decode: tuple[float, float, float] = (0.005, 0.001, 0.0),
         transfer: tuple[float, float] | None = None) -> list[pb.PerfFit]:
    out = [pb.PerfFit(name="prefill", terms=["const", "tokens", "tokens2"], coefficients=list(prefill), samples=20),
           pb.PerfFit(name="decode", terms=["const", "batch", "context"], coefficients=list(decode), samples=50)]
    if transfer is not None:
        out.append(pb.PerfFit(name="transfer", terms=["const", "bytes"], coefficients=list(transfer), samples=5))
    return out


def cluster(loads: dict[str, pb.NodeLoad | None]) -> Router:
    """A router whose nodes (``p*`` prefill, ``d*`` decode) have the given loads; no network."""
    r = Router("tiny", watch_loads=False)
    for i, (node_id, load) in enumerate(loads.items()):
        role = "prefill" if node_id.startswith("p") else "decode"
        r.on_membership(node_id, NodeRecord(node_id, role, f"127.0.0.1:{9300 + i}", "x:1", "tiny", 4096,
                                            layout=LAYOUT, serves_whole=role == "prefill"))
        if load is not None:
            r._nodes[node_id].saw_load(load)
    return r


def run(fn):
    async def go():
        return fn()

    return asyncio.run(go())


def test_the_prefill_node_with_the_shortest_predicted_ttft_is_chosen_and_the_queue_counts() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[1000, 1000], fits=fits()),  # 2 x 1.01 s queued
                     "p1": pb.NodeLoad(prefill_queue=[200], fits=fits(prefill=(0.01, 0.002, 0.0))),  # 0.41 s
                     "d0": pb.NodeLoad(fits=fits())})
        plan = Admission(r, local=False).plan("r", 100, 16, Slo())
        assert plan.prefill is not None and plan.prefill.node_id == "p1"
        # p1: queue 0.01 + 0.4 = 0.41, then 0.01 + 0.2 = 0.21 for this prompt.
        assert plan.ttft_s == pytest.approx(0.62)
        # p0's queue as this coordinator saw it: its own requests count when they are more.
        with r.track(r._nodes["p1"], 3000):
            assert prefill_estimate(r._nodes["p1"], 100).seconds == pytest.approx(6.01 + 0.21)
            assert Admission(r, local=False).plan("r", 100, 16, Slo()).prefill.node_id == "p0"
    run(go)


def test_tpot_is_the_fetch_plus_the_steps_of_the_batch_with_the_request_added() -> None:
    def go():
        # step = 0.005 + 0.001 * batch + 1e-6 * context; transfer = 0.002 + 1e-9 * bytes
        r = cluster({"p0": pb.NodeLoad(fits=fits()),
                     "d0": pb.NodeLoad(decode_batch=9, decode_context=10_000,
                                       fits=fits(decode=(0.005, 0.001, 1e-6), transfer=(0.002, 1e-9)))})
        d = decode_estimate(r._nodes["d0"], 100, 11)
        kv = 112 * 2 * 2 * 2 * 64 * 4  # 100 tokens -> 7 blocks of 16 tokens
        step = 0.005 + 0.001 * 10 + 1e-6 * (10_000 + 100 + 5)
        assert d.seconds == pytest.approx((0.002 + 1e-9 * kv + 9 * step) / 10)
        # On an idle node the same request is faster.
        assert d.idle_seconds < d.seconds
    run(go)


def test_nodes_predicted_alike_share_the_work() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits(prefill=(0.0100, 0.001, 0.0))),
                     "p1": pb.NodeLoad(fits=fits(prefill=(0.0101, 0.001, 0.0))),
                     "p2": pb.NodeLoad(fits=fits(prefill=(0.5, 0.001, 0.0))),  # clearly slower: never
                     "d0": pb.NodeLoad(fits=fits())})
        chosen = []
        for _ in range(4):
            plan = Admission(r).plan("r", 100, 1, Slo())
            chosen.append(plan.prefill.node_id)
            r.track(plan.prefill).__enter__()  # still in flight (its queue alone would not tell)
        assert sorted(chosen) == ["p0", "p0", "p1", "p1"]
    run(go)


def test_a_request_no_node_can_meet_is_refused_with_the_predictions_and_no_retry_after() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        with pytest.raises(Rejected) as err:
            Admission(r).plan("r", 100, 16, Slo(ttft_s=0.05))
        e = err.value
        assert e.ttft_s == pytest.approx(0.11) and e.tpot_s is not None
        assert "not met even on an idle node" in str(e)
        assert e.retry_after_s is None and "retry-after" not in e.details()
        assert e.details()["x-tandem-predicted-ttft-ms"] == "110.0"
        assert e.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
        status, body = openai_error_body(e)
        assert status == 429 and body["error"]["predicted_ttft_ms"] == 110.0
        # The same request with admission off goes ahead on the same nodes.
        plan = Admission(r, "off").plan("r", 100, 16, Slo(ttft_s=0.05))
        assert plan.prefill.node_id == "p0" and plan.ttft_s == pytest.approx(0.11)
    run(go)


def test_a_miss_from_queued_work_says_when_to_retry() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[2000, 2000], fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        with pytest.raises(Rejected) as err:
            Admission(r, local=False).plan("r", 100, 16, Slo(ttft_s=0.5))
        # Queue 2 x 2.01 s + 0.11 s = 4.13 s against 0.5 s: about 4 s until the queue has drained enough.
        assert err.value.retry_after_s == 4
        assert err.value.details()["retry-after"] == "4"
        # A decode batch too big for the TPOT objective: waiting helps too.
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(decode_batch=60, fits=fits())})
        with pytest.raises(Rejected) as err:
            Admission(r, local=False).plan("r", 100, 16, Slo(tpot_s=0.02))
        assert "TPOT" in str(err.value) and err.value.retry_after_s == 1
        # max_tokens 1: no decode, so no TPOT to miss.
        assert Admission(r, local=False).plan("r", 100, 1, Slo(tpot_s=0.02)).decode is None
    run(go)


def test_a_close_miss_on_idle_nodes_is_tried_at_most_once_an_interval_and_a_far_miss_never() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        now = [100.0]
        adm = Admission(r, local=False, trial_s=10.0, clock=lambda: now[0])
        # A TTFT of 0.11 s predicted: against 0.05 s a far miss (2.2x), refused whenever asked.
        with pytest.raises(Rejected, match="not met even on an idle node"):
            adm.plan("far", 100, 16, Slo(ttft_s=0.05))
        # Against 0.08 s a close one (1.4x): the nodes are idle, so it goes ahead, predictions and all.
        plan = adm.plan("close", 100, 16, Slo(ttft_s=0.08))
        assert plan.prefill.node_id == "p0" and plan.decode.node_id == "d0" and plan.ttft_s == pytest.approx(0.11)
        # The next within the interval is refused.
        now[0] += 9.9
        with pytest.raises(Rejected):
            adm.plan("close-2", 100, 16, Slo(ttft_s=0.08))
        now[0] += 0.1
        # Not while a node it would start on has work: this coordinator's request on the decode node,
        # or a prefill queued in the prefill node's report (then 0.17 s against 0.15 s).
        with r.track(r._nodes["d0"]):
            with pytest.raises(Rejected):
                adm.plan("busy", 100, 16, Slo(ttft_s=0.08))
        r._nodes["p0"].saw_load(pb.NodeLoad(prefill_queue=[50], fits=fits()))
        with pytest.raises(Rejected) as err:
            adm.plan("queued", 100, 16, Slo(ttft_s=0.15))
        assert err.value.retry_after_s is not None  # waiting helps: the queue ends
        r._nodes["p0"].saw_load(pb.NodeLoad(fits=fits()))
        assert adm.plan("idle-again", 100, 16, Slo(ttft_s=0.08)).prefill.node_id == "p0"
        # Trials off (0): the same close miss is refused.
        now[0] += 60
        with pytest.raises(Rejected):
            Admission(r, local=False, trial_s=0, clock=lambda: now[0]).plan("off", 100, 16, Slo(ttft_s=0.08))
        with pytest.raises(ValueError, match="admission-trial-s"):
            Admission(r, trial_s=-1)
    run(go)


def test_the_cluster_default_fills_what_the_request_leaves_unset() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        adm = Admission(r, default_slo=Slo(ttft_s=0.05))
        with pytest.raises(Rejected):
            adm.plan("r", 100, 16, Slo())
        assert adm.plan("r", 100, 16, Slo(ttft_s=1.0)).ttft_s == pytest.approx(0.11)
    run(go)


def test_nodes_without_a_model_are_picked_by_load_and_never_refuse() -> None:
    def go():
        r = cluster({"p0": None, "p1": None, "d0": pb.NodeLoad()})
        with r.track(r._nodes["p0"]):
            plan = Admission(r).plan("r", 100, 16, Slo(ttft_s=0.001, tpot_s=0.001))
        assert plan.prefill.node_id == "p1" and plan.ttft_s is None and plan.tpot_s is None
        # A stale load message does not count.
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[5000], fits=fits()), "d0": None})
        r._nodes["p0"].load_at -= 60
        assert prefill_estimate(r._nodes["p0"], 100).seconds == pytest.approx(0.11)
    run(go)


@pytest.mark.parametrize("ttft,tpot", [(0, None), (-5, None), (None, float("nan")), (None, 1e12), ("x", None)])
def test_bad_slo_values_are_invalid_requests(ttft, tpot) -> None:
    with pytest.raises(InvalidRequest):
        Slo.from_ms(ttft, tpot)


def test_slo_in_milliseconds_becomes_seconds() -> None:
    assert Slo.from_ms(250, None) == Slo(0.25, None)
    assert Slo(None, 0.05).over(Slo(1.0, 1.0)) == Slo(1.0, 0.05)


def test_a_long_prefill_queue_sends_a_short_prompt_to_prefill_on_the_decode_node() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[2000, 2000], fits=fits()),  # 4.02 s queued
                     "d0": pb.NodeLoad(fits=fits(), step_tokens=256)})
        plan = Admission(r).plan("r", 100, 16, Slo())
        assert plan.local and plan.prefill is None and plan.decode.node_id == "d0"
        assert plan.ttft_s == pytest.approx(0.11)  # d0 is idle: its own prefill of 100 tokens
        assert plan.tpot_s == pytest.approx(0.005 + 0.001)  # one step, batch of 1; no fetch
        # Off: always disaggregated.
        assert not Admission(r, local=False).plan("r", 100, 16, Slo()).local
        # An idle prefill pool: disaggregated, even where the decode node's fit says it is faster.
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits(prefill=(0.001, 0.0005, 0.0)))})
        assert not Admission(r).plan("r", 100, 16, Slo()).local
        # ... unless only the decode node meets the objective.
        assert Admission(r).plan("r", 100, 16, Slo(ttft_s=0.1)).local
    run(go)


def test_the_decode_node_prefills_only_when_its_streams_keep_their_tpot() -> None:
    def go():
        busy = pb.NodeLoad(decode_batch=20, decode_context=20_000, fits=fits(decode=(0.005, 0.001, 1e-6)),
                           step_tokens=256)
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[2000, 2000], fits=fits()), "d0": busy})
        # The batch's step is 0.045 s; a prefill of 1000 tokens (1.01 s + 5 steps beside the batch of
        # 20, which takes 20 of each step's 256 tokens: 0.2 s) spread over 16 tokens adds 0.076 s a
        # token: over a 0.1 s objective.
        plan = Admission(r, "off").plan("r", 1000, 16, Slo(tpot_s=0.1))
        assert not plan.local
        # A looser objective allows it; the chunks beside the batch count in its TTFT.
        plan = Admission(r).plan("r", 1000, 16, Slo(tpot_s=0.2))
        assert plan.local and plan.ttft_s == pytest.approx(1.01 + 5 * 0.04)
        # With no TPOT objective, one local prefill at a time on a node that is decoding.
        with r.track_prefill(r._nodes["d0"], 500):
            assert not Admission(r).plan("r", 1000, 16, Slo()).local
        assert Admission(r).plan("r", 1000, 16, Slo()).local
    run(go)


def test_meeting_the_ttft_objective_decides_before_the_margin() -> None:
    def go():
        # Remote 0.62 s; local 0.51 s: under the 20 % margin, but only local meets 0.55 s.
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[500], fits=fits()),
                     "d0": pb.NodeLoad(fits=fits(prefill=(0.41, 0.001, 0.0)))})
        assert not Admission(r).plan("r", 100, 16, Slo()).local
        plan = Admission(r).plan("r", 100, 16, Slo(ttft_s=0.55))
        assert plan.local and plan.ttft_s == pytest.approx(0.51)
        # Neither meets 0.3 s: refused with the prefill pool's prediction; with admission off it
        # is served there (a prefill that misses anyway must not also stall the decode node).
        with pytest.raises(Rejected) as err:
            Admission(r).plan("r", 100, 16, Slo(ttft_s=0.3))
        assert "p0" in str(err.value) and err.value.ttft_s == pytest.approx(0.62)
        off = Admission(r, "off").plan("r", 100, 16, Slo(ttft_s=0.3))
        assert not off.local and off.prefill.node_id == "p0"
    run(go)


def test_an_empty_prefill_pool_is_served_by_the_decode_node() -> None:
    def go():
        r = cluster({"d0": pb.NodeLoad(fits=fits())})
        plan = Admission(r).plan("r", 100, 16, Slo())
        assert plan.local and plan.decode.node_id == "d0"
        # With local prefill off the pipeline waits for a prefill node; with no model to predict it
        # with, the decode node takes it unpredicted (and learns from it).
        assert Admission(r, local=False).plan("r", 100, 16, Slo()).prefill is None
        r = cluster({"d0": None})
        plan = Admission(r).plan("r", 100, 16, Slo())
        assert plan.local and plan.prefill is None and plan.decode.node_id == "d0" and plan.ttft_s is None
    run(go)


def test_with_no_prefill_pool_a_prefill_that_would_slow_the_streams_past_their_tpot_is_refused() -> None:
    def go():
        busy = pb.NodeLoad(decode_batch=20, decode_context=20_000, fits=fits(decode=(0.005, 0.001, 1e-6)),
                           step_tokens=256)
        r = cluster({"d0": busy})
        # As in the test above: 1,000 tokens' prefill spread over 16 tokens adds 0.076 s a token to
        # the batch's 0.045 s step. With a prefill node it would go there; with none it is refused.
        with pytest.raises(Rejected) as err:
            Admission(r).plan("r", 1000, 16, Slo(tpot_s=0.1))
        assert "slow the running streams to 121 ms a token > 100 ms" in str(err.value)
        assert "no prefill node to send it to" in str(err.value) and err.value.retry_after_s == 1
        # A short prompt's stall is small enough: served there.
        assert Admission(r).plan("r", 50, 16, Slo(tpot_s=0.1)).local
        # Admission off: served there all the same (and counted over its objective).
        assert Admission(r, "off").plan("r", 1000, 16, Slo(tpot_s=0.1)).local
        # A decode node with no model yet takes it instead, unpredicted (it learns from it), and the
        # least loaded of such nodes.
        r = cluster({"d0": busy, "d1": None, "d2": None})
        r._nodes["d1"].outstanding = 2
        plan = Admission(r).plan("r", 1000, 16, Slo(tpot_s=0.1))
        assert plan.local and plan.decode.node_id == "d2" and plan.ttft_s is None and plan.tpot_s is None
    run(go)


def test_a_local_prefill_goes_where_both_objectives_are_met_before_where_it_starts_soonest() -> None:
    def go():
        # d0 starts it sooner (a fast prefill, one chunk beside its 44 streams: 45 ms) but its batch
        # steps at 50 ms with it, over the 49.5 ms objective; d1 is idle and slow to prefill (200 ms).
        r = cluster({"d0": pb.NodeLoad(decode_batch=44, fits=fits(prefill=(0.001, 1e-5, 0.0)), step_tokens=256),
                     "d1": pb.NodeLoad(fits=fits(prefill=(0.19, 0.001, 0.0)), step_tokens=256)})
        plan = Admission(r).plan("r", 10, 1000, Slo(tpot_s=0.0495))
        assert plan.local and plan.decode.node_id == "d1" and plan.ttft_s == pytest.approx(0.2)
        # With no objective to meet, the soonest start.
        assert Admission(r).plan("r", 10, 1000, Slo()).decode.node_id == "d0"
    run(go)


def test_a_node_without_a_model_gets_work_while_idle_so_it_can_learn() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "p1": None, "d0": pb.NodeLoad(fits=fits())})
        adm = Admission(r, local=False)
        assert adm.plan("r", 100, 16, Slo()).prefill.node_id == "p1"  # idle: it learns
        with r.track(r._nodes["p1"], 100):
            plan = adm.plan("r", 100, 16, Slo(ttft_s=0.5))
            assert plan.prefill.node_id == "p0" and plan.ttft_s == pytest.approx(0.11)
    run(go)


def test_headroom_and_a_decode_node_busy_with_local_prefills() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        # TPOT 6 ms predicted against 6.5 ms: met, but not with 10 % kept for the batch to grow.
        assert Admission(r, local=False).plan("r", 100, 16, Slo(tpot_s=0.0065)).tpot_s == pytest.approx(0.006)
        # (Not met on an idle node at 90 % of the objective either: no retry-after, unlike a miss
        # only by the overload margin.)
        with pytest.raises(Rejected, match="less 10% headroom.*not met even on an idle node") as err:
            Admission(r, local=False, headroom=0.1).plan("r", 100, 16, Slo(tpot_s=0.0065))
        assert err.value.retry_after_s is None
        # TTFT keeps no headroom: its queue does not grow ahead of it.
        assert Admission(r, local=False, headroom=0.1).plan("r", 100, 16, Slo(ttft_s=0.111)).ttft_s == \
            pytest.approx(0.11)
        # A decode node that spent half of its recent time on steps carrying local prefill chunks:
        # its streams step through both kinds, a token a step. A pure step of the batch with this
        # request 6 ms; one with a chunk of 255 tokens (256 a step, less the stream's) 265 ms of
        # prefill + 1 ms the stream adds: 1 / (0.5 / 6 ms + 0.5 / 266 ms) a token.
        calm = decode_estimate(r._nodes["d0"], 100, 16).seconds
        r._nodes["d0"].saw_load(pb.NodeLoad(fits=fits(), prefill_busy=0.5))
        each = 1 / (0.5 / 0.006 + 0.5 / 0.266)
        assert decode_estimate(r._nodes["d0"], 100, 16).seconds == pytest.approx((0.006 + 14 * each) / 15)
        assert calm == pytest.approx(0.006)
        # Small chunks (a 16-token step budget) cost little more than a pure step: far less than
        # the stretch by 1 / (1 - busy) that counted no stream as stepping while a prefill ran.
        r._nodes["d0"].saw_load(pb.NodeLoad(fits=fits(), prefill_busy=0.5, step_tokens=16))
        mixed = 0.01 + 0.001 * 15 + 0.001
        each = 1 / (0.5 / 0.006 + 0.5 / mixed)
        assert decode_estimate(r._nodes["d0"], 100, 16).seconds == pytest.approx((0.006 + 14 * each) / 15)
        assert each < 0.006 / 0.5
        # A node with no prefill model yet: that stretch, busy capped at 0.8.
        r._nodes["d0"].saw_load(pb.NodeLoad(fits=fits()[1:], prefill_busy=0.9))
        assert decode_estimate(r._nodes["d0"], 100, 16).seconds == pytest.approx((0.006 + 14 * 0.006 / 0.2) / 15)
    run(go)


def test_the_overload_margin_tightens_tpot_by_the_recent_share_of_load_refusals() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        now = [100.0]
        adm = Admission(r, local=False, overload_margin=0.25, clock=lambda: now[0])
        # No refusals yet, no margin: TPOT 6 ms against 6.5 ms is met.
        assert adm.plan("calm", 100, 16, Slo(tpot_s=0.0065)).tpot_s == pytest.approx(0.006)
        assert adm.pressure.margin() == 0.0
        # Refusals no idle node would avoid are not load: no margin from them.
        for i in range(20):
            with pytest.raises(Rejected, match="not met even on an idle node"):
                adm.plan(f"never-{i}", 100, 16, Slo(tpot_s=0.002))
        assert adm.pressure.margin() == 0.0
        # A decode batch of 60 refuses twenty requests for load (waiting helps): after one admission,
        # 20 load refusals of 21 decisions, over one more (22), so the margin is 0.25 x 20 / 22.
        r._nodes["d0"].saw_load(pb.NodeLoad(decode_batch=60, fits=fits()))
        for i in range(20):
            with pytest.raises(Rejected):
                adm.plan(f"load-{i}", 100, 16, Slo(tpot_s=0.02))
        assert adm.pressure.margin() == pytest.approx(0.25 * 20 / 22)
        # Back to idle: the same request is now refused, 6 ms against 6.5 ms less the margin, as
        # load (a Retry-After, not "not met even on an idle node": the whole objective is). The
        # margin alone refused it: not counted as load, or the margin would feed itself.
        r._nodes["d0"].saw_load(pb.NodeLoad(fits=fits()))
        with pytest.raises(Rejected, match="overload margin") as err:
            adm.plan("tight", 100, 16, Slo(tpot_s=0.0065))
        assert err.value.retry_after_s == 1 and "idle node" not in str(err.value)
        assert adm.pressure.margin() == pytest.approx(0.25 * 20 / 22)
        # TTFT keeps no margin.
        assert adm.plan("ttft", 100, 16, Slo(ttft_s=0.111)).ttft_s == pytest.approx(0.11)
        # A quiet two minutes and the pressure is gone (its weights decay over 10 s).
        now[0] += 120
        assert adm.pressure.margin() < 0.001
        assert adm.plan("calm-again", 100, 16, Slo(tpot_s=0.0065)).tpot_s == pytest.approx(0.006)
        # Off (0, the default of the class): never a margin.
        off = Admission(r, local=False)
        r._nodes["d0"].saw_load(pb.NodeLoad(decode_batch=60, fits=fits()))
        for i in range(20):
            with pytest.raises(Rejected):
                off.plan(f"load-{i}", 100, 16, Slo(tpot_s=0.02))
        r._nodes["d0"].saw_load(pb.NodeLoad(fits=fits()))
        assert off.plan("calm", 100, 16, Slo(tpot_s=0.0065)).tpot_s == pytest.approx(0.006)
        with pytest.raises(ValueError, match="overload-margin"):
            Admission(r, overload_margin=1.0)
        with pytest.raises(ValueError, match="below 1"):
            Admission(r, headroom=0.5, overload_margin=0.5)
    run(go)


def test_idle_nodes_whose_fits_differ_take_turns_and_a_queue_still_decides() -> None:
    def go():
        # p1 restarted from its cached profile: it predicts 2.5x what p0, warm, does. Both idle.
        r = cluster({"p0": pb.NodeLoad(fits=fits(prefill=(0.004, 0.0001, 0.0))),
                     "p1": pb.NodeLoad(fits=fits(prefill=(0.010, 0.00025, 0.0))), "d0": pb.NodeLoad(fits=fits())})
        adm = Admission(r, local=False)
        with r.track(r._nodes["p0"]):  # p0 busy with a request whose prompt is not queued yet
            assert adm.plan("r", 100, 16, Slo()).prefill.node_id == "p1"
        # With a prefill queued, p1 is no longer idle: the queue, not the fit, decides again.
        r._nodes["p1"].saw_load(pb.NodeLoad(prefill_queue=[100], fits=fits(prefill=(0.010, 0.00025, 0.0))))
        with r.track(r._nodes["p0"]):
            assert adm.plan("r", 100, 16, Slo()).prefill.node_id == "p0"
        # Far apart (a node many times slower) even idle nodes are not alike.
        r = cluster({"p0": pb.NodeLoad(fits=fits(prefill=(0.004, 0.0001, 0.0))),
                     "p1": pb.NodeLoad(fits=fits(prefill=(0.1, 0.001, 0.0))), "d0": pb.NodeLoad(fits=fits())})
        with r.track(r._nodes["p0"]):
            assert Admission(r, local=False).plan("r", 100, 16, Slo()).prefill.node_id == "p0"
    run(go)


def test_a_nodes_steady_bias_is_learned_from_finished_requests_and_outliers_move_it_little() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        node = r._nodes["p0"]
        raw = prefill_estimate(node, 100).seconds  # 0.01 + 0.1 = 0.11 s
        assert raw == pytest.approx(0.11) and node.factor("ttft", raw) == 1.0
        # Every request takes 30 % longer than the fit says (time the fit leaves out). The node
        # learns from the model's own prediction, whatever factor was in use when each request
        # was admitted (on a busy node, many finishes ago): no feedback loop to swing.
        for _ in range(300):  # (some 50 requests make most of it; 300, all but 0.2 %)
            node.calibrate("ttft", raw, raw * 1.3)
        # (Every raw prediction alike: no line through one point, a factor.)
        assert node.factor("ttft", raw) == pytest.approx(1.3, rel=0.01)
        est = prefill_estimate(node, 100)
        assert est.seconds == pytest.approx(raw * 1.3, rel=0.01) and "learned" in est.detail
        # Idle-node predictions (which decide "never met, no Retry-After") stay the model's own.
        assert est.idle_seconds == pytest.approx(raw)
        # Admission's plan says which factor its predictions carry, so the model-only value
        # can be recovered at the finish.
        plan = Admission(r, local=False).plan("r", 100, 1, Slo())
        assert plan.ttft_s / plan.ttft_factor == pytest.approx(raw)
        # One request 100x off counts as 3x, with the weight of one request.
        before = node.factor("ttft", raw)
        node.calibrate("ttft", raw, raw * 100)
        assert node.factor("ttft", raw) / before == pytest.approx((3 / before) ** RATE)
        # Kinds are apart: the decode node's TPOT is untouched.
        assert r._nodes["d0"].factor("tpot", 0.05) == 1.0
    run(go)


def test_tpot_counts_the_batch_over_the_requests_life_not_only_now() -> None:
    def go():
        # Two streams now, ten on average lately: over its life it decodes beside (2 + 10) / 2 = 6.
        r = cluster({"p0": pb.NodeLoad(fits=fits()),
                     "d0": pb.NodeLoad(decode_batch=2, decode_context=200, decode_batch_mean=10.0,
                                       decode_context_mean=1000.0, fits=fits(decode=(0.005, 0.001, 0.0)))})
        d = decode_estimate(r._nodes["d0"], 100, 11)
        # No transfer samples: the first step (batch now + 1) stands in for the fetch.
        assert d.seconds == pytest.approx((0.005 + 0.001 * 3 + 9 * (0.005 + 0.001 * 7)) / 10)
        assert "6.0 + 1 over its life" in d.detail
    run(go)


def test_tpot_looks_ahead_with_the_tokens_its_streams_have_to_come_and_the_arrival_rate() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits(decode=(0.005, 0.001, 0.0)))})
        node = r._nodes["d0"]
        # Two streams there: one ends in 5 steps, the other outlasts a new request of 11 tokens.
        with r.track(node, 100, lambda: 5), r.track(node, 100, lambda: 100):
            d = decode_estimate(node, 100, 11)
            staying = (5 + 11) / 11
            # They arrived just now, after an idle window: 2 counted over the least span (5 s), asking
            # 52.5 tokens on average; a step of the batch with the request is 8 ms, so 0.0032 arrive
            # a step, each staying past its 11 steps.
            arriving = 2 / 5 * 0.008 * 11 / 2
            each = 0.005 + 0.001 * (staying + arriving + 1)
            assert d.seconds == pytest.approx((0.008 + 9 * each) / 10)
            assert f"{staying + arriving:.1f} + 1 over its life" in d.detail
            # A request of 200 tokens outlasts the arrivals' mean of 52.5: each stays 52.5 of its
            # steps, so 52.5 - 52.5^2 / 400 of them are there on average, a step's worth each.
            d = decode_estimate(node, 100, 200)
            staying = (5 + 100) / 200
            arriving = 2 / 5 * 0.008 * (52.5 - 52.5 ** 2 / 400)
            assert f"{staying + arriving:.1f} + 1 over its life" in d.detail
            each = 0.005 + 0.001 * (staying + arriving + 1)
            assert d.seconds == pytest.approx((0.008 + 198 * each) / 199)
        assert not node.left  # they left with their requests
    run(go)


def test_arrivals_count_the_requests_of_the_last_window() -> None:
    a = Arrivals(window_s=10.0, least_s=2.5)
    a.add(100, now=0.0)
    a.add(300, now=5.0)
    a.add(200, now=10.5)
    assert a.rate(now=11.0) == (0.2, 250.0)  # the first is out of the window
    assert a.rate(now=16.0) == (0.1, 200.0)
    assert a.rate(now=21.0) == (0.0, 0.0)


def test_arrivals_after_an_idle_window_are_counted_over_the_time_since_they_began() -> None:
    a = Arrivals(window_s=10.0, least_s=2.5)
    a.add(100, now=100.0)
    assert a.rate(now=101.0) == (1 / 2.5, 100.0)  # not less than least_s
    a.add(300, now=103.0)
    a.add(200, now=104.0)
    assert a.rate(now=104.0) == (3 / 4.0, 200.0)  # over the 4 s since they began, not the idle window
    assert a.rate(now=112.0) == (2 / 10.0, 250.0)  # a whole window since they began: the window
    a.add(100, now=113.0)  # the window still holds some: the arrivals go on, no new beginning
    assert a.rate(now=113.5) == (2 / 10.0, 150.0)
    assert a.rate(now=124.0) == (0.0, 0.0)
    a.add(100, now=130.0)  # a new beginning
    assert a.rate(now=131.0) == (1 / 2.5, 100.0)
    assert Arrivals(window_s=8.0).least_s == 2.0  # a quarter of the window by default
    with pytest.raises(ValueError, match="least_s"):
        Arrivals(window_s=10.0, least_s=0.0)


def test_the_engines_own_prefix_cache_is_credited_without_a_load_and_the_store_beyond_it_with_one() -> None:
    from tandem.coordinator.prefix import Held, held_prefixes
    from tandem.kvstore.held import HeldChunks
    from tandem.kvstore.keys import chunk_keys, namespace

    prompt = list(range(5, 1029))  # 1024 tokens
    store_ns, eng_ns = namespace("tiny", LAYOUT, 256), namespace("tiny", {"engine_block": 32}, 32)
    chunks, blocks = chunk_keys(store_ns, prompt, 256), chunk_keys(eng_ns, prompt, 32)

    def load(n_chunks: int, n_blocks: int, queue: list[int] | None = None) -> pb.NodeLoad:
        msg = pb.NodeLoad(prefill_queue=queue or [], fits=fits(prefill=(0.01, 0.0005, 0.0)))
        for keys, n, ns, size, eng in ((chunks, n_chunks, store_ns, 256, False), (blocks, n_blocks, eng_ns, 32, True)):
            h = HeldChunks()
            h.apply([("ns", ns.hex(), str(size))] + [("+", k.hex(), "ram") for k in keys[:n]])
            whole, changes, _ = h.since(None)
            if eng:
                msg.eng_whole, msg.eng_namespace, msg.eng_block_tokens = whole, ns, size
                msg.eng_held.extend(changes)
            else:
                msg.kv_whole, msg.kv_namespace, msg.kv_chunk_tokens = whole, ns, size
                msg.kv_ram.extend(changes)
        return msg

    def go():
        # p0: 10 blocks (320 tokens) in its engine's cache, 2 chunks (512) in its store; p1: 20 blocks, no store.
        r = cluster({"p0": load(2, 10), "p1": load(0, 20), "d0": pb.NodeLoad(fits=fits())})
        held = held_prefixes([r._nodes["p0"], r._nodes["p1"]], prompt)
        assert held == {"p0": Held(512, 0, 320), "p1": Held(640, 0, 640)}
        plan = Admission(r, local=False).plan("r", len(prompt), 16, Slo(), prompt_ids=prompt)
        # p1: 640 tokens cached in its engine, nothing to load; p0 would load 192 from its store.
        assert plan.prefill.node_id == "p1" and plan.prefill_held == 640
        assert plan.ttft_s == pytest.approx(0.01 + 0.0005 * (1024 - 640))
        # Capped at what is computed (the last prompt token never is held): the engine's part first.
        assert Held(640, 0, 640).capped(100) == Held(100, 0, 100)
        assert Held(512, 256, 320).capped(1023) == Held(512, 192, 320)
    run(go)


def test_a_local_prefill_on_a_decode_node_is_credited_with_what_its_engine_cache_holds() -> None:
    from tandem.coordinator.estimates import local_estimate
    from tandem.coordinator.prefix import Held, held_prefixes
    from tandem.kvstore.held import HeldChunks
    from tandem.kvstore.keys import chunk_keys, namespace

    prompt = list(range(5, 1029))
    ns = namespace("tiny", {"engine_block": 32}, 32)
    h = HeldChunks()
    h.apply([("ns", ns.hex(), "32")] + [("+", k.hex(), "ram") for k in chunk_keys(ns, prompt, 32)[:20]])
    whole, changes, _ = h.since(None)

    def go():
        # The decode node decoded this conversation's last turn: its engine's cache has 640 tokens of it.
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(
            fits=fits(), eng_whole=whole, eng_namespace=ns, eng_block_tokens=32, eng_held=list(changes))})
        d0 = r._nodes["d0"]
        assert held_prefixes([r._nodes["p0"], d0], prompt) == {"d0": Held(640, 0, 640)}
        blind, credited = local_estimate(d0, 1024, 16), local_estimate(d0, 1024, 16, Held(640, 0, 640))
        assert blind.ttft.seconds == pytest.approx(0.01 + 0.001 * 1024)
        assert credited.ttft.seconds == pytest.approx(0.01 + 0.001 * 384) and "640 tokens held there" in \
            credited.ttft.detail
        # The pool's node holds nothing of it, the decode node most of it: the decode node prefills it.
        plan = Admission(r).plan("r", len(prompt), 16, Slo(ttft_s=0.5), prompt_ids=prompt)
        assert plan.local and plan.decode.node_id == "d0"
    run(go)


def test_prefix_routing_sends_a_prompt_where_its_prefix_is_held_unless_that_queue_costs_more() -> None:
    import random

    from tandem.kvstore.held import HeldChunks
    from tandem.kvstore.keys import chunk_keys, namespace

    ns = namespace("tiny", LAYOUT, 256)
    prompt = list(range(5, 1029))  # 1024 tokens: four chunks of 256
    keys = chunk_keys(ns, prompt, 256)

    def held(n_ram: int, n_disk: int = 0, queue: list[int] | None = None) -> pb.NodeLoad:
        # What the node's NodeMonitor stream carries: HeldChunks fed the store's events, read whole.
        h = HeldChunks()
        h.apply([("ns", ns.hex(), "256")] + [("+", k.hex(), "ram") for k in keys[:n_ram]]
                + [("+", k.hex(), "disk") for k in keys[n_ram:n_ram + n_disk]])
        whole, changes, _ = h.since(None)
        return pb.NodeLoad(prefill_queue=queue or [], fits=fits(prefill=(0.01, 0.0005, 0.0)), kv_whole=whole,
                           kv_namespace=h.namespace, kv_chunk_tokens=h.chunk_tokens,
                           kv_ram=[k for k, s in changes.items() if s == "ram"],
                           kv_disk=[k for k, s in changes.items() if s == "disk"])

    def go():
        r = cluster({"p0": held(0), "p1": held(3, 1), "d0": pb.NodeLoad(fits=fits())})
        assert r._nodes["p1"].chunks.cached_tokens(keys) == (1024, 256)
        plan = Admission(r, local=False).plan("r", len(prompt), 16, Slo(), prompt_ids=prompt)
        # ... and says how much of the prompt is held there: its prefill queues as that much less work.
        assert plan.prefill.node_id == "p1" and plan.prefill_held == 1023
        # 1023 tokens loaded (the last one computed): 0.01 + 0.0005 x 1 + 767 x 6 us + 256 x 42 us.
        assert plan.ttft_s == pytest.approx(0.01 + 0.0005 + 767 * 6e-6 + 256 * 4.2e-5)
        # Without the credit the two idle nodes are alike: the load decides, not the cache.
        blind = Admission(r, local=False, routing="least-loaded").plan("r", len(prompt), 16, Slo(), prompt_ids=prompt)
        assert blind.ttft_s == pytest.approx(0.01 + 0.0005 * 1024)
        # The holder's queue costs more than computing the prompt elsewhere: it goes elsewhere.
        r2 = cluster({"p0": held(0), "p1": held(4, queue=[4000]), "d0": pb.NodeLoad(fits=fits())})
        assert Admission(r2, local=False).plan("r", len(prompt), 16, Slo(), prompt_ids=prompt).prefill.node_id == "p0"
        # Random picks among the routable nodes, seeded.
        picks = {Admission(r, local=False, routing="random", rng=random.Random(s)).plan(
            "r", len(prompt), 16, Slo(), prompt_ids=prompt).prefill.node_id for s in range(20)}
        assert picks == {"p0", "p1"}
        # What changes later arrives as deltas: p1 loses its first chunk, and with it the whole prefix.
        r._nodes["p1"].saw_load(pb.NodeLoad(fits=fits(prefill=(0.01, 0.0005, 0.0)), kv_gone=[keys[0]]))
        assert r._nodes["p1"].chunks.cached_tokens(keys) == (0, 0)
        with pytest.raises(ValueError, match="--routing"):
            Admission(r, routing="sticky")
    run(go)


def test_held_chunks_give_each_stream_the_whole_picture_once_then_the_changes() -> None:
    from tandem.kvstore import held as held_mod
    from tandem.kvstore.held import HeldChunks

    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    woke = []
    h = HeldChunks(on_change=lambda: woke.append(1))
    h.apply([("+", a.hex(), "ram"), ("+", a.hex(), "disk"), ("+", b.hex(), "disk")])
    whole, changes, pos = h.since(None)
    assert whole and changes == {a: "ram", b: "disk"} and woke == [1]
    h.apply([("-", a.hex(), "ram"), ("+", c.hex(), "ram"), ("-", b.hex(), "disk")])
    whole, changes, pos2 = h.since(pos)
    assert not whole and changes == {a: "disk", c: "ram", b: ""}
    assert h.since(pos2)[1] == {}
    # A stream that fell behind the kept log gets the whole picture again.
    old_max = held_mod.LOG_MAX
    held_mod.LOG_MAX = 4
    try:
        h.apply([("+", (bytes([i]) * 32).hex(), "ram") for i in range(10)])
        whole, changes, _ = h.since(pos2)
        assert whole and len(changes) == 12  # a (disk), c and the ten new ones (ram)
    finally:
        held_mod.LOG_MAX = old_max


def test_a_tally_keeps_the_sum_of_its_tokens_as_requests_come_and_go() -> None:
    t = Tally()
    t[1], t[2] = 500, 700
    t[1] = 300  # a request's tokens changed
    del t[2]
    t[3] = 40
    assert t.total == 340 == sum(t.values()) and len(t) == 2
    with pytest.raises(KeyError):
        del t[2]
    assert t.total == 340


def test_raw_predictions_that_scatter_wider_than_outcomes_are_drawn_to_what_happened() -> None:
    # Raw TPOT predictions 20..100 ms whose outcomes are 50 ms, whatever was predicted (the
    # fifteenth sitting's 0:1 run: what arrives after admission decides the TPOT, not what the
    # node held then). A factor can only scale them; the line learns that a raw 95 ms means ~50.
    rng = random.Random(0)
    cal, factor = Calibration.of("tpot"), Calibration(lines=False)
    for _ in range(MIN_SAMPLES - 1):
        raw = rng.uniform(0.02, 0.1)
        cal.learn(raw, 0.05)
        factor.learn(raw, 0.05)
    assert cal.line() is None and cal(0.095) == pytest.approx(factor(0.095))  # too few yet: a factor
    for _ in range(300):
        raw = rng.uniform(0.02, 0.1)
        cal.learn(raw, 0.05 + rng.uniform(-0.005, 0.005))
        factor.learn(raw, 0.05)
    a, b = cal.line()
    # The outcomes do not follow the raw predictions at all: the slope is held at its floor (a raw
    # prediction still carries the node's state: a sudden load moves it before any finish does).
    assert b == MIN_SLOPE["tpot"]
    assert cal(0.095) == pytest.approx(0.05 + b * (0.095 - 0.06), abs=0.004)
    assert cal(0.095) < 0.087 < factor(0.095)  # admitted against an 87 ms objective; the factor refused it
    # Outcomes that do follow the raw predictions (a steady bias of 30 %): the line is that factor.
    steady = Calibration.of("tpot")
    for _ in range(300):
        raw = rng.uniform(0.02, 0.1)
        steady.learn(raw, raw * 1.3)
    a, b = steady.line()
    assert b == pytest.approx(1.3, rel=0.01) and a == pytest.approx(0.0, abs=1e-4)


def test_a_line_that_predicts_the_finished_requests_worse_than_the_factor_is_not_used() -> None:
    # Local prefills (the twenty-sixth sitting's 0:2 logs): most take what the model says, one in
    # ten waits ~0.5 s more (for KV room, behind a queue). A line through them has a positive
    # intercept that triples the short prefills' predictions; the factor scales them by ~1.1.
    rng = random.Random(5)
    cal = Calibration.of("ttft_local")
    for i in range(400):
        raw = rng.uniform(0.05, 0.4)
        cal.learn(raw, raw + (0.5 if i % 10 == 0 else 0.0))
    a, b = cal._fit()
    assert a > 0.01  # the line there is, the one that used to be used
    assert cal.line() is None and cal.line_err > cal.factor_err
    assert cal(0.06) == pytest.approx(0.06 * math.exp(cal.log_bias)) and cal(0.06) < 0.06 * 1.2 < a + b * 0.06


def test_a_decode_node_refusal_on_tpot_uses_its_calibrated_prediction() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(
            decode_batch=30, decode_context=3000, decode_batch_mean=30, decode_context_mean=3000, fits=fits())})
        adm = Admission(r, local=False)
        slo = Slo(tpot_s=0.03)
        with pytest.raises(Rejected):
            adm.plan("r", 100, 16, slo)  # raw: 31 streams' step, 36 ms
        d0 = r._nodes["d0"]
        raw = decode_estimate(d0, 100, 16).seconds
        assert raw > 0.03
        rng = random.Random(1)
        for _ in range(200):  # what such predictions turned out to be on this node: ~25 ms
            d0.calibrate("tpot", rng.uniform(raw * 0.3, raw * 1.2), 0.025)
        plan = adm.plan("r", 100, 16, slo)
        assert plan.tpot_s < 0.03 and plan.decode.node_id == "d0"
        assert plan.tpot_s / plan.tpot_factor == pytest.approx(raw)  # the raw value is still recovered
    run(go)


def test_a_local_prefill_running_for_a_while_counts_only_what_is_left_of_it() -> None:
    def go():
        # An idle decode node (prefill 0.01 s + 1 ms a token): a 500-token local prefill takes 0.51 s.
        r = cluster({"d0": pb.NodeLoad(fits=fits(), step_tokens=1000)})
        d0 = r._nodes["d0"]
        alone = local_estimate(d0, 100, 16).ttft.seconds  # 0.11 s
        with r.track_prefill(d0, 500):
            key = next(iter(d0.prefilling))
            just_sent = local_estimate(d0, 100, 16).ttft.seconds
            # All of it ahead, less the prefill's constant: its last chunk's step carries this one's first.
            assert just_sent == pytest.approx(alone + 0.50, abs=0.005)
            d0.prefilling_since[key] -= 0.255  # half way through
            assert local_estimate(d0, 100, 16).ttft.seconds == pytest.approx(alone + 0.25, abs=0.005)
            d0.prefilling_since[key] -= 10.0  # overdue: nothing of it counted
            assert local_estimate(d0, 100, 16).ttft.seconds == pytest.approx(alone, abs=0.001)
        assert not d0.prefilling and not d0.prefilling_since
        # The node's own report of it (its whole prompt, as nodes report them) counts the same.
        with r.track_prefill(d0, 500):
            key = next(iter(d0.prefilling))
            d0.saw_load(pb.NodeLoad(fits=fits(), step_tokens=1000, prefill_queue=[500]))
            assert local_estimate(d0, 100, 16).ttft.seconds == pytest.approx(alone + 0.50, abs=0.005)
            d0.prefilling_since[key] -= 0.255
            d0.prefilled_at -= 10.0  # (the one before ended long before this one was sent)
            assert local_estimate(d0, 100, 16).ttft.seconds == pytest.approx(alone + 0.25, abs=0.005)
        # Reported with none of this coordinator's there (another's, or one that just ended): whole.
        assert local_estimate(d0, 100, 16).ttft.seconds == pytest.approx(alone + 0.50, abs=0.005)
        d0.saw_load(pb.NodeLoad(fits=fits(), step_tokens=1000))
        # The next one waited for the one before: it runs from when that one ended, not from when sent.
        first, second = r.track_prefill(d0, 500), r.track_prefill(d0, 300)
        first.__enter__()
        second.__enter__()
        for key in d0.prefilling_since:
            d0.prefilling_since[key] -= 10.0  # both sent long ago
        first.__exit__(None, None, None)  # the 500-token one ends now: the 300-token one starts
        assert local_estimate(d0, 100, 16).ttft.seconds == pytest.approx(alone + 0.30, abs=0.005)
        second.__exit__(None, None, None)
    run(go)


def test_a_request_looks_at_the_prefix_holders_and_the_least_loaded_nodes_of_a_big_pool() -> None:
    def go():
        r = cluster({f"p{i}": pb.NodeLoad(fits=fits()) for i in range(6)} | {"d0": pb.NodeLoad(fits=fits())})
        nodes = r.routable_nodes("prefill")
        by_id = {n.node_id: n for n in nodes}
        with r.track(by_id["p0"], 900), r.track(by_id["p1"], 700), r.track(by_id["p2"], 500), \
                r.track(by_id["p5"], 5000):
            tokens = lambda n: n.prefills.total  # noqa: E731
            # Up to k, all of them; 0: all of them.
            assert candidates(nodes, {}, 6, tokens) == nodes and candidates(nodes, {}, 0, tokens) == nodes
            # Past k: the least loaded (p3, p4 idle, then p2).
            assert [n.node_id for n in candidates(nodes, {}, 3, tokens)] == ["p3", "p4", "p2"]
            # A node holding the prompt's prefix is looked at however loaded (up to half of k).
            held = {"p5": Held(512), "p1": Held(256)}
            assert [n.node_id for n in candidates(nodes, held, 3, tokens)] == ["p5", "p3", "p4"]
            assert [n.node_id for n in candidates(nodes, held, 4, tokens)] == ["p5", "p1", "p3", "p4"]
            # Admission predicts among them only: its choice is one of the idle ones.
            plan = Admission(r, local=False, candidates=2).plan("r", 100, 16, Slo())
            assert plan.prefill.node_id in ("p3", "p4")
        with pytest.raises(ValueError, match="--admission-candidates"):
            Admission(r, candidates=-1)
    run(go)


def test_queued_local_prefills_share_the_steps_fixed_cost() -> None:
    def go():
        # Prefill 0.01 s + 1 ms a token + 1 us a token squared: two queued prompts of 100 and 200
        # tokens add their tokens' time (0.11 + 0.24 s), the constant once: with this prompt's own.
        r = cluster({"d0": pb.NodeLoad(fits=fits(prefill=(0.01, 0.001, 1e-6)), step_tokens=1000)})
        d0 = r._nodes["d0"]
        assert queued_prefill_s(d0.model, [100, 0, 200]) == pytest.approx(0.35)
        # An engine that starts each prompt in a step of its own (--prompt-steps own): the constant each.
        assert queued_prefill_s(d0.model, [100, 0, 200], own_steps=True) == pytest.approx(0.37)
        alone = local_estimate(d0, 50, 16).ttft.seconds
        with r.track_prefill(d0, 100), r.track_prefill(d0, 200):
            assert local_estimate(d0, 50, 16).ttft.seconds == pytest.approx(alone + 0.35, abs=0.005)
    run(go)


def test_one_stalled_request_moves_a_fitted_line_little() -> None:
    rng = random.Random(3)
    cal = Calibration.of("ttft")
    for _ in range(300):
        raw = rng.uniform(0.1, 0.5)
        cal.learn(raw, raw)  # the model is right
    before = cal(0.3)
    cal.learn(0.3, 30.0)  # a 100x stall (a VM hiccup) counts as 3x, with the weight of one request
    assert cal(0.3) == pytest.approx(before, rel=0.05)
    # And no line takes a prediction past 3x (or under a third) of the model's own.
    steep = Calibration.of("ttft")
    for _ in range(300):
        raw = rng.uniform(0.1, 0.5)
        steep.learn(raw, 0.5 + raw)  # a large intercept
    assert steep(0.01) == pytest.approx(0.01 * MAX_RATIO)


def test_the_harm_check_calibrates_the_streams_step_but_not_the_prefills_stall() -> None:
    def go():
        busy = pb.NodeLoad(decode_batch=20, decode_context=20_000, fits=fits(decode=(0.005, 0.001, 1e-6)),
                           step_tokens=256)
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[2000, 2000], fits=fits()), "d0": busy})
        d0 = r._nodes["d0"]
        rng = random.Random(4)
        for _ in range(300):  # this node's TPOT predictions turned out ~30 ms whatever they said
            d0.calibrate("tpot", rng.uniform(0.02, 0.1), 0.03)
        # The batch's step is 0.045 s raw (~0.026 calibrated); a 1000-token prefill adds 0.076 s to each
        # of their tokens (a prefill time: the TPOT line does not shrink it): over a 0.1 s objective.
        assert not Admission(r, "off").plan("r", 1000, 16, Slo(tpot_s=0.1)).local
        # Beside a short prompt (stall 0.01 s) the calibrated step leaves room: it prefills there.
        assert Admission(r, "off").plan("r", 40, 16, Slo(tpot_s=0.1)).local
    run(go)


def test_a_line_stays_a_line_until_the_spread_falls_well_below_what_made_it_one() -> None:
    rng = random.Random(4)
    cal = Calibration.of("ttft")

    def feed(n: int, spread: float) -> None:
        for _ in range(n):
            raw = 0.3 * (1.0 + rng.uniform(-spread, spread) * 3 ** 0.5)  # standard deviation: spread x 0.3
            cal.learn(raw, 0.1 + 0.5 * raw)

    feed(20, 0.02)
    assert cal.line() is None  # too few yet
    feed(200, 0.2)
    a, b = cal.line()
    assert (a, b) == (pytest.approx(0.1, abs=0.01), pytest.approx(0.5, abs=0.02))
    feed(300, 0.07)  # under the 10 % that makes a line, over the 5 % that keeps one
    assert cal.line() is not None
    feed(300, 0.01)  # hardly varying: a factor (of what they took, 0.25 s for 0.3 s raw)
    assert cal.line() is None and cal(0.3) == pytest.approx(0.25, rel=0.02)
    feed(300, 0.07)  # and from a factor, 7 % does not make a line again
    assert cal.line() is None


def test_a_queued_prefill_counts_what_it_computes_not_the_whole_prompt_the_node_reports() -> None:
    def go():
        # An idle decode node (prefill 0.01 s + 1 ms a token); a local prefill of a 1,000-token
        # prompt whose first 900 tokens it holds: 100 to compute.
        r = cluster({"d0": pb.NodeLoad(fits=fits(), step_tokens=1000)})
        d0 = r._nodes["d0"]
        alone = local_estimate(d0, 100, 16).ttft.seconds
        with r.track_prefill(d0, 100):
            d0.saw_load(pb.NodeLoad(fits=fits(), step_tokens=1000, prefill_queue=[1000]))  # the node: whole
            # (Queued prompts add their tokens' time; the constant comes once, with this one's.)
            assert local_estimate(d0, 100, 16).ttft.seconds == pytest.approx(alone + 0.10, abs=0.005)
            # A second prefill there that this coordinator did not send (another coordinator's): its
            # own as it counts it, and the other as the node reports it, its whole prompt.
            d0.saw_load(pb.NodeLoad(fits=fits(), step_tokens=1000, prefill_queue=[1000, 300]))
            assert local_estimate(d0, 100, 16).ttft.seconds == pytest.approx(alone + 0.10 + 0.30, abs=0.005)
    run(go)


def test_a_queued_local_prefill_counts_what_admission_predicted_for_it_not_its_tokens() -> None:
    def go():
        # The prefill ahead computes 100 tokens, but after a held prefix (their attention over it)
        # and a load from the node's store: admission predicted 0.25 s for it alone, where 100
        # tokens alone take 0.11 s (0.01 s + 1 ms a token).
        r = cluster({"d0": pb.NodeLoad(fits=fits(), step_tokens=1000)})
        d0 = r._nodes["d0"]
        alone = local_estimate(d0, 100, 16).ttft.seconds
        with r.track_prefill(d0, 100, run_s=0.25):
            # (The constant comes once, with this one's.)
            assert local_estimate(d0, 100, 16).ttft.seconds == pytest.approx(alone + 0.24, abs=0.005)
        with r.track_prefill(d0, 100):  # not predicted (a migrated leg): its tokens say
            assert local_estimate(d0, 100, 16).ttft.seconds == pytest.approx(alone + 0.10, abs=0.005)
        assert not d0.prefilling_run_s
        # What admission predicts for a local prefill alone is what its plan carries.
        plan = Admission(r).plan("r", 100, 16, Slo())
        assert plan.local and plan.prefill_run_s == pytest.approx(local_estimate(d0, 100, 16).ttft.idle_seconds)
    run(go)


def _stream(r: Router, node_id: str, secs: float, tokens: int):  # type: ignore[no-untyped-def]
    """A running stream of this coordinator's on a decode node with ``secs`` left of its TPOT
    objective for ``tokens`` more tokens (held until the returned context exits)."""
    return r.track(r._nodes[node_id], 100, lambda: tokens, lambda now: (secs, tokens))


def test_a_newcomer_that_would_push_a_running_stream_past_its_tpot_goes_elsewhere_or_is_refused() -> None:
    def go():
        # step = 0.005 + 0.001 * batch: 14 ms a token at the reported batch of 9, 15 ms with one more.
        busy = dict(decode_batch=9, fits=fits(decode=(0.005, 0.001, 0.0)))
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(**busy)})
        edge = _stream(r, "d0", 1.45, 100)  # meets its objective at 14 ms a token, not at 15
        doomed = _stream(r, "d0", 1.3, 100)  # misses it already: not the newcomer's doing
        easy = _stream(r, "d0", 5.0, 100)
        with edge, doomed, easy:
            d = decode_estimate(r._nodes["d0"], 100, 16)
            assert d.pushes == 1
            with pytest.raises(Rejected) as err:
                Admission(r, local=False).plan("r", 100, 16, Slo(tpot_s=0.1))
            assert "only by pushing 1 running stream(s) past theirs" in str(err.value)
            assert err.value.retry_after_s == 1
            # Off (for comparison), or admission off: admitted on its own objective.
            assert Admission(r, local=False, protect=False).plan("r", 100, 16, Slo(tpot_s=0.1)).decode.node_id == "d0"
            assert Admission(r, "off", local=False).plan("r", 100, 16, Slo(tpot_s=0.1)).decode.node_id == "d0"
            # Without a TPOT objective nothing is protected.
            Admission(r, local=False).plan("r", 100, 16, Slo())
            # The node's TPOT calibration, a flat line reading both steps lower (requests of every raw
            # prediction took ~10 ms a token), does not hide the push: the steps are the fit's.
            rng = random.Random(0)
            for _ in range(60):
                r._nodes["d0"].calibrate("tpot", rng.uniform(0.01, 0.05), 0.010)
            assert r._nodes["d0"].calibrated("tpot", 0.015) < 0.013
            assert decode_estimate(r._nodes["d0"], 100, 16).pushes == 1
        # A second decode node, busier (more of this coordinator's streams) but pushing nobody, takes it.
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(**busy), "d1": pb.NodeLoad(**busy)})
        with _stream(r, "d1", 9.0, 100), _stream(r, "d1", 9.0, 100), _stream(r, "d1", 9.0, 100):
            with _stream(r, "d0", 1.45, 100):
                assert Admission(r, local=False).plan("r", 100, 16, Slo(tpot_s=0.1)).decode.node_id == "d1"
            # Once that stream has more time left, the less loaded d0 takes it again.
            with _stream(r, "d0", 1.6, 100):
                assert Admission(r, local=False).plan("r", 100, 16, Slo(tpot_s=0.1)).decode.node_id == "d0"
    run(go)


def test_a_decision_reads_each_decode_node_once_and_predicts_as_without_the_shared_view() -> None:
    def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()),
                     "d0": pb.NodeLoad(decode_batch=3, prefill_busy=0.3, step_tokens=256, kv_tokens=4000,
                                       kv_free_tokens=200, fits=fits(decode=(0.005, 0.001, 1e-6))),
                     "d1": pb.NodeLoad(decode_batch=1, fits=fits())})
        asked: list[int] = []

        def stream(i: int):  # type: ignore[no-untyped-def]
            return r.track(r._nodes["d0"], 300, lambda: 40, lambda now: asked.append(i) or (5.0, 40))

        with stream(0), stream(1), stream(2), r.track_prefill(r._nodes["d0"], 500):
            for key in r._nodes["d0"].prefilling_since:  # (its progress held still: the same queue each look)
                r._nodes["d0"].prefilling_since[key] = time.perf_counter() + 1e6
            Admission(r).plan("r", 200, 32, Slo(ttft_s=1.5, tpot_s=0.1))
            assert sorted(asked) == [0, 1, 2]  # TPOT, local prefill and protection: one look at each stream
            asked.clear()
            Admission(r, protect=False).plan("r", 200, 32, Slo(ttft_s=1.5, tpot_s=0.1))
            assert asked == []  # nothing to protect: not asked
            d0 = r._nodes["d0"]
            view = decode_view(d0)
            for est, alone in ((decode_estimate(d0, 200, 32, view=view), decode_estimate(d0, 200, 32)),
                               (local_estimate(d0, 200, 32, view=view).ttft, local_estimate(d0, 200, 32).ttft)):
                assert est.seconds == pytest.approx(alone.seconds) and est.pushes == alone.pushes
                assert est.detail.split("(x")[0] == alone.detail.split("(x")[0]
    run(go)


def test_a_local_prefill_whose_stall_would_push_a_running_stream_past_its_tpot_is_refused() -> None:
    def go():
        r = cluster({"d0": pb.NodeLoad(decode_batch=2, fits=fits(decode=(0.005, 0.001, 0.0)), step_tokens=256)})
        # 50 tokens left with 0.2 s to spare at 8 ms a token (the step with the newcomer).
        with _stream(r, "d0", 50 * 0.008 + 0.2, 50), _stream(r, "d0", 100.0, 50):
            # A 1,000-token prompt stalls the batch over a second: refused (no prefill pool to send it to).
            with pytest.raises(Rejected) as err:
                Admission(r).plan("r", 1000, 16, Slo(tpot_s=0.1))
            assert "push 1 of its running streams past their TPOT objective" in str(err.value)
            assert "no prefill node to send it to" in str(err.value)
            # A 50-token one stalls it some 60 ms: prefilled there.
            assert Admission(r).plan("r", 50, 16, Slo(tpot_s=0.1)).local
            # ... but not behind a local prefill queued there that stalls the stream 0.15 s anyway:
            # of its 0.2 s to spare, 0.05 s is left, less than the newcomer's stall.
            with r.track_prefill(r._nodes["d0"], 100, run_s=0.16):
                with pytest.raises(Rejected, match="push 1 of its running streams past their TPOT objective"):
                    Admission(r).plan("r", 50, 16, Slo(tpot_s=0.1))
            # Off: the stall is spread over the newcomer's tokens and checked against the objective.
            assert Admission(r, protect=False).plan("r", 1000, 16, Slo(tpot_s=0.1)).local
    run(go)


def test_a_prompt_whose_blocks_do_not_fit_waits_until_enough_streams_end() -> None:
    def go():
        # 100 of the cache's 2,000 tokens free; three streams of 600-token prompts with 10, 20 and
        # 50 tokens to come; a step of 8 ms (0.005 + 0.001 x 3).
        room = dict(decode_batch=3, fits=fits(decode=(0.005, 0.001, 0.0)), step_tokens=256, kv_tokens=2000)
        r = cluster({"d0": pb.NodeLoad(kv_free_tokens=100, **room), "d1": pb.NodeLoad(kv_free_tokens=1900, **room)})
        d0 = r._nodes["d0"]
        with r.track(d0, 600, lambda: 10), r.track(d0, 600, lambda: 50), r.track(d0, 600, lambda: 20):
            # 300 tokens are 19 blocks of 16, and one for the first token: 320, 220 short. The first
            # stream to end (10 steps) frees 600, less the 2 x 10 the other two grew meanwhile.
            assert kv_wait(d0, 320, 0.008, decode_load(d0)[0]) == (pytest.approx(0.08), 220)
            # 1,024 are 924 short: 580 freed after 10 steps are not enough, 1,180 after 20 are.
            assert kv_wait(d0, 1024, 0.008, decode_load(d0)[0]) == (pytest.approx(0.16), 924)
            # More than all of them free: until the last one ends.
            assert kv_wait(d0, 5000, 0.008, decode_load(d0)[0])[0] == pytest.approx(0.4)
            assert kv_wait(d0, 100, 0.008, decode_load(d0)[0]) == (0.0, 0)
            # A stream reserved there whose prompt a prefill node computes takes its blocks first:
            # 80 tokens are 5 blocks, and one for its first token; 100 + 96 > 100 free.
            with r.track(d0, 80, lambda: 100), r.track_awaiting(d0, 80):
                assert kv_wait(d0, 100, 0.008, decode_load(d0)[0]) == (pytest.approx(0.08), 96)
            assert kv_wait(d0, 100, 0.008, decode_load(d0)[0]) == (0.0, 0)  # its call went: the report counts it
            with_room = local_estimate(d0, 300, 16)
            blind = local_estimate(d0, 300, 16, kv_room=False)
            assert with_room.ttft.seconds == pytest.approx(blind.ttft.seconds + 0.08)
            assert "80 ms for KV room (220 tokens short)" in with_room.ttft.detail
            # KV arriving from a prefill node waits for its blocks likewise (the fetch's first gap).
            assert (decode_estimate(d0, 300, 16).seconds
                    == pytest.approx(decode_estimate(d0, 300, 16, kv_room=False).seconds + 0.08 / 15))
            # Of two decode nodes alike but for their room, the one with room prefills it: it starts
            # sooner there.
            assert Admission(r).plan("r", 300, 16, Slo()).decode.node_id == "d1"
            # A TTFT objective the wait breaks refuses it where no node has room.
            d1 = r._nodes["d1"]
            d1.saw_load(pb.NodeLoad(kv_free_tokens=100, **room))
            ttft = with_room.ttft.seconds
            with r.track(d1, 600, lambda: 10), r.track(d1, 600, lambda: 50), r.track(d1, 600, lambda: 20):
                with pytest.raises(Rejected) as err:
                    Admission(r).plan("r", 300, 16, Slo(ttft_s=ttft - 0.04))
                assert "for KV room" in str(err.value)
                assert Admission(r, kv_room=False).plan("r", 300, 16, Slo(ttft_s=ttft - 0.04)).local
        # A node that does not report its cache (a simulated engine): no wait.
        r = cluster({"d0": pb.NodeLoad(decode_batch=3, fits=fits())})
        with r.track(r._nodes["d0"], 600, lambda: 10):
            assert kv_wait(r._nodes["d0"], 10_000, 0.008, 0) == (0.0, 0)
    run(go)


def test_a_prefill_node_serves_a_request_whole_where_the_decode_pool_would_miss_its_tpot(caplog) -> None:
    caplog.set_level(logging.INFO, logger="tandem.coordinator.admission")

    def go():
        # d0 as in the test above: a newcomer would push its stream at the edge past its objective.
        busy = dict(decode_batch=9, fits=fits(decode=(0.005, 0.001, 0.0)))
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(**busy)})
        p0, slo = r._nodes["p0"], Slo(ttft_s=1.0, tpot_s=0.1)
        with _stream(r, "d0", 1.45, 100):
            with pytest.raises(Rejected):
                Admission(r, local=False).plan("r", 100, 16, slo)
            with pytest.raises(ValueError, match="--colocate must be one of off, on, always"):
                Admission(r, colocate="yes")
            # --colocate on: the idle prefill node prefills and decodes it (a step of 6 ms there).
            plan = Admission(r, local=False, colocate="on").plan("r", 100, 16, slo)
            assert plan.local and plan.colocated and plan.prefill is None and plan.decode is p0
            assert plan.tpot_s == pytest.approx(0.006) and plan.ttft_s == pytest.approx(0.11, rel=0.05)
            # Its line says why not disaggregated: d0's miss, worded as a refusal words it.
            line = caplog.records[-1].getMessage()
            assert "admitted, served whole on prefill node p0" in line
            assert re.search(r"; the disaggregated choice: predicted TPOT \d+ ms meets 100 ms only by pushing 1 "
                             r"running stream\(s\) past theirs \(d0", line), line
            # Its streams count there as a decode node's (its prefill calls apart): the next
            # newcomer sees a batch of one on p0, and p0's prefill queue stays empty.
            with r.track(p0, 100, lambda: 15, lambda now: (1.0, 15)):
                assert decode_load(p0) == (1, 100) and prefill_estimate(p0, 100).queue_s == 0.0
                plan = Admission(r, local=False, colocate="on").plan("r", 100, 16, slo)
                # (its 15 tokens to come over the newcomer's 16: 6.9 ms a step)
                assert plan.colocated and plan.tpot_s == pytest.approx(0.00694, rel=0.01)
            # A prompt it is prefilling to serve whole went to its engine at once, not through the
            # prefill order: a prefill sent there waits for it (0.001 s a token of its 500).
            order = Admission(r).order
            assert prefill_estimate(p0, 100, order, time.perf_counter(), 1.0).queue_s == 0.0
            with r.track_prefill(p0, 500):  # (nothing in the prefill order: the node's whole queue, 0.51 s)
                assert prefill_estimate(p0, 100, order, time.perf_counter(), 1.0).queue_s == pytest.approx(0.51)
            # A stream on p0 at its edge is protected as on a decode node: nowhere left, refused.
            with _stream(r, "p0", 0.0995, 16):
                with pytest.raises(Rejected, match=r"no prefill node could serve it whole \(each would push"):
                    Admission(r, local=False, colocate="on").plan("r", 100, 16, slo)
            # A request of one token has nothing to decode: the prefill pool alone serves it.
            assert not Admission(r, local=False, colocate="on").plan("r", 100, 1, slo).local
        # Where the decode pool meets the objective, disaggregated as before; "always": on p0 anyway.
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(**busy)})
        plan = Admission(r, local=False, colocate="on").plan("r", 100, 16, Slo(ttft_s=1.0, tpot_s=0.1))
        assert not plan.local and plan.prefill.node_id == "p0" and plan.decode.node_id == "d0"
        plan = Admission(r, local=False, colocate="always").plan("r", 100, 16, Slo(ttft_s=1.0, tpot_s=0.1))
        assert plan.colocated and plan.decode.node_id == "p0"
        assert "disaggregated choice" not in caplog.records[-1].getMessage()  # (it would have met the SLO)
        # A prefill node that does not say it serves requests whole (an older version's record) never does.
        r._nodes["p0"].record = dataclasses.replace(r._nodes["p0"].record, serves_whole=False)
        plan = Admission(r, local=False, colocate="always").plan("r", 100, 16, Slo(ttft_s=1.0, tpot_s=0.1))
        assert not plan.colocated and plan.prefill.node_id == "p0" and plan.decode.node_id == "d0"
    run(go)


def test_a_prefill_that_would_push_the_streams_a_prefill_node_serves_whole_goes_elsewhere_or_is_refused() -> None:
    def go():
        # p0 serves one stream whole: 16 tokens to come at 6 ms (batch 1), 0.15 s left of its
        # objective. A 100-token prefill there stalls it 0.11 s: 0.096 + 0.11 > 0.15.
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        slo = Slo(ttft_s=1.0, tpot_s=0.1)
        with _stream(r, "p0", 0.15, 16):
            with pytest.raises(Rejected) as err:
                Admission(r, local=False, colocate="on").plan("r", 100, 16, slo)
            assert "prefilling it on the prefill node would push its running streams past the TPOT objective" \
                in str(err.value)
            assert "push 1 of the streams that node serves whole" in str(err.value)
            assert err.value.retry_after_s == 1
            # The decode node prefills it instead (conditional disaggregation), or with colocation
            # off nothing is checked (no stream is served whole there then).
            assert Admission(r, colocate="on").plan("r", 100, 16, slo).decode.node_id == "d0"
            assert Admission(r, local=False).plan("r", 100, 16, slo).prefill.node_id == "p0"
        with _stream(r, "p0", 0.25, 16):  # time enough for the stall: disaggregated as ever
            plan = Admission(r, local=False, colocate="on").plan("r", 100, 16, slo)
            assert plan.prefill.node_id == "p0" and plan.decode.node_id == "d0"
            # But not for two: a prefill call admitted there before it, still waiting its turn in the
            # prefill order (not yet in the engine), stalls the stream too (0.1 s more).
            with r.track(r._nodes["p0"], 100):
                with pytest.raises(Rejected, match="push 1 of the streams that node serves whole"):
                    Admission(r, local=False, colocate="on").plan("r", 100, 16, slo)
        # p0 prefilled half of the last 10 s: at that share its stream's pace is 12.0 ms a token, and its
        # 16 tokens would take 0.19 s > 0.15 s left. That share is the prefills this check lets in: the
        # stream is judged at its plain step (6 ms), and protected from this one as before.
        r = cluster({"p0": pb.NodeLoad(fits=fits(), prefill_busy=0.5), "d0": pb.NodeLoad(fits=fits())})
        with _stream(r, "p0", 0.15, 16):
            assert decode_view(r._nodes["p0"]).step_now == pytest.approx(0.0120, rel=0.01)
            with pytest.raises(Rejected, match="push 1 of the streams that node serves whole"):
                Admission(r, local=False, colocate="on").plan("r", 100, 16, slo)
    run(go)


def test_a_prefill_call_beside_the_streams_a_prefill_node_serves_whole_counts_what_their_batch_adds() -> None:
    def go():
        # p0 decodes 3 streams it serves whole: each step carrying the prefill takes their step over
        # an empty one longer (0.005 + 0.001 * 3 against 0.005: 3 ms). In its 2048-token steps a
        # 100-token prompt is one such step: 0.11 s alone, 0.113 s beside them.
        whole = dict(decode_batch=3, step_tokens=2048, fits=fits())
        r = cluster({"p0": pb.NodeLoad(**whole), "p1": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(**whole)})
        assert prefill_estimate(r._nodes["p1"], 100).seconds == pytest.approx(0.11)
        est = prefill_estimate(r._nodes["p0"], 100)
        assert est.seconds == pytest.approx(0.113)
        assert est.idle_seconds == pytest.approx(0.11)  # (on an idle node there is no batch)
        assert "3 ms of it beside the streams it serves whole" in est.detail
        # In 64-token steps it takes two (61 prompt tokens a step beside 3 streams): 6 ms.
        r._nodes["p0"].saw_load(pb.NodeLoad(**{**whole, "step_tokens": 64}))
        assert prefill_estimate(r._nodes["p0"], 100).seconds == pytest.approx(0.116)
        # Unreported, the budget is vLLM's 2048 tokens, as the node takes it: one step again.
        r._nodes["p0"].saw_load(pb.NodeLoad(**{**whole, "step_tokens": 0}))
        assert prefill_estimate(r._nodes["p0"], 100).seconds == pytest.approx(0.113)
        # A decode node's batch is not a prefill call's business (its local prefills count their own).
        assert prefill_estimate(r._nodes["d0"], 100).seconds == pytest.approx(0.11)
        # The prompts queued ahead of it run beside the streams too: two 100-token ones reported
        # there wait 2 x 0.113 s (0.22 s counted alone).
        r._nodes["p0"].saw_load(pb.NodeLoad(**whole, prefill_queue=[100, 100]))
        assert prefill_estimate(r._nodes["p0"], 100).queue_s == pytest.approx(0.226)
        r._nodes["p0"].saw_load(pb.NodeLoad(**whole))
        # The idle p1 is the sooner of the two prefill nodes.
        assert Admission(r, local=False, colocate="off").plan("r", 100, 16, Slo()).prefill.node_id == "p1"
    run(go)


def test_the_prefill_orders_entries_on_a_node_serving_streams_whole_count_their_batch() -> None:
    async def go():
        # p0 decodes 3 streams it serves whole: a 100-token prefill there takes 0.113 s, not 0.11.
        r = cluster({"p0": pb.NodeLoad(decode_batch=3, fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        p0, order, now = r._nodes["p0"], PrefillOrder(r, "slack"), time.perf_counter()
        ahead = order.entry(p0, "a", 100, now, 5.0, beside_s=beside_whole_s(p0, 100))
        assert ahead.run_s == pytest.approx(0.113)
        async with order.turn(p0, ahead):  # running there: the next one waits for its end
            behind = prefill_estimate(p0, 100, order, now, 1.0)
            assert behind.queue_s == pytest.approx(0.113, abs=0.005)
            assert behind.seconds == pytest.approx(0.226, abs=0.005)

    asyncio.run(go())


def test_a_prompt_a_prefill_node_serves_whole_counts_before_the_prefill_orders_next() -> None:
    async def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        p0, order, now = r._nodes["p0"], PrefillOrder(r, "slack"), time.perf_counter()
        async with order.turn(p0, order.entry(p0, "a", 100, now, 5.0)):  # the order's prefill running there
            behind = prefill_estimate(p0, 100, order, now, 1.0).queue_s
            assert behind > 0.0
            with r.track_prefill(p0, 500):  # and a prompt p0 serves whole (--colocate): 0.5 s more
                assert prefill_estimate(p0, 100, order, now, 1.0).queue_s == pytest.approx(behind + 0.5, abs=1e-3)  # (its run goes on meanwhile)

    asyncio.run(go())


def test_a_prompt_served_whole_may_not_push_the_prefill_orders_waiting_requests_past_their_ttft() -> None:
    async def go():
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        p0 = r._nodes["p0"]
        adm = Admission(r, local=False, colocate="always")
        order, now, done = adm.order, time.perf_counter(), asyncio.Event()

        async def hold(e):  # type: ignore[no-untyped-def]
            async with order.turn(p0, e):
                await done.wait()

        # A 100-token prefill (0.11 s) running on p0 and one waiting in the prefill order behind
        # it, due 0.25 s from now: it starts by 0.11 s and ends by 0.22 s, in time.
        running = asyncio.ensure_future(hold(order.entry(p0, "a", 100, now, 5.0)))
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(hold(order.entry(p0, "b", 100, now, 0.25)))
        await asyncio.sleep(0)
        try:
            # A prompt served whole goes to the engine at once, ahead of it: 0.11 s more makes it late.
            assert order.pushed_by(p0, 0.01) == 0 and order.pushed_by(p0, 0.11) == 1
            slo = Slo(ttft_s=1.0, tpot_s=0.1)
            plan = adm.plan("r", 100, 16, slo)
            assert not plan.colocated and plan.prefill is p0  # through the prefill order, after it
            assert adm.plan("r", 5, 16, slo).colocated  # 0.015 s: it still makes its deadline
            # With a TTFT objective the prefill order cannot meet either (0.33 s behind both), refused:
            # the refusal says why it was not served whole.
            with pytest.raises(Rejected, match=r"served whole on prefill node p0: predicted TTFT \d+ ms meets 300 ms "
                                               r"only by pushing 1 queued request"):
                Admission(r, local=False, colocate="on", order=order).plan("r", 100, 16, Slo(ttft_s=0.3, tpot_s=0.1))
        finally:
            done.set()
            await asyncio.gather(running, waiting)
        # With a second prefill node that pushes nobody, that one serves it whole.
        r = cluster({"p0": pb.NodeLoad(fits=fits()), "p1": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        adm = Admission(r, local=False, colocate="always")
        order, p0, done = adm.order, r._nodes["p0"], asyncio.Event()
        running = asyncio.ensure_future(hold(order.entry(p0, "a", 100, now, 5.0)))
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(hold(order.entry(p0, "b", 100, now, 0.25)))
        await asyncio.sleep(0)
        try:
            plan = adm.plan("r", 100, 16, Slo(ttft_s=1.0, tpot_s=0.1))
            assert plan.colocated and plan.decode.node_id == "p1"
        finally:
            done.set()
            await asyncio.gather(running, waiting)

    asyncio.run(go())


def test_a_prompt_served_whole_on_a_prefill_node_waits_for_the_prefill_calls_its_engine_runs() -> None:
    def go():
        # p0 reports a 2,000-token prefill call of this coordinator's and a 100-token prompt it
        # serves whole (prefill 0.01 s + 1 ms a token): a newcomer there waits for both, 2.1 s.
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[2000, 100], fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        p0 = r._nodes["p0"]
        with r.track(p0, 2000), r.track_sent(p0, 2000), r.track_prefill(p0, 100):
            est = local_estimate(p0, 100, 16)
            assert est.ttft.queue_s == pytest.approx(2.1) and est.ttft.seconds == pytest.approx(2.21)
        # Before the report lists the prompt it serves whole: both still counted.
        r._nodes["p0"].saw_load(pb.NodeLoad(prefill_queue=[2000], fits=fits()))
        with r.track(p0, 2000), r.track_sent(p0, 2000), r.track_prefill(p0, 100):
            assert local_estimate(p0, 100, 16).ttft.queue_s == pytest.approx(2.1)
    run(go)
