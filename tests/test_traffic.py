"""Priority classes and tenant quotas on a synthetic cluster state and a fake clock."""

from __future__ import annotations

import asyncio
import math

import pytest

from tandem.coordinator.admission import Admission, Slo
from tandem.coordinator.traffic import BatchQueue, Quotas, TokenBucket, check_priority, parse_quotas
from tandem.errors import InvalidRequest, Rejected
from tandem.proto import tandem_pb2 as pb

from test_admission import cluster, fits  # noqa: E402  (tests/ is on sys.path)


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    b = TokenBucket(rate=100, capacity=1000)
    assert b.take(800, now=0.0) == 0.0
    assert b.take(400, now=0.0) == pytest.approx(2.0)  # 200 left: 200 more take 2 s
    assert b.take(400, now=2.0) == 0.0
    assert b.take(5000, now=100.0) == math.inf  # more than it ever holds
    assert b.take(1000, now=100.0) == 0.0  # full again, not fuller


def test_a_tenant_over_its_quota_is_refused_with_when_to_retry() -> None:
    clock = Clock()
    q = Quotas(parse_quotas("acme=100, beta=50"), default_rate=0.0, burst_s=10, clock=clock)
    q.charge("acme", 900)
    with pytest.raises(Rejected) as err:
        q.charge("acme", 300)  # 100 left; 200 more take 2 s
    assert err.value.retry_after_s == 2 and "tenant 'acme'" in str(err.value)
    assert err.value.grpc_code.name == "RESOURCE_EXHAUSTED" and err.value.http_status == 429
    q.charge("beta", 500)  # its own bucket
    with pytest.raises(Rejected) as err:
        q.charge("beta", 501)
    assert err.value.retry_after_s is None and "more than a full bucket" in str(err.value)
    q.charge("nobody", 10**9)  # no default quota: unlimited
    clock.t = 2.0
    q.charge("acme", 300)
    # A default quota applies to each unnamed tenant on its own.
    q = Quotas({}, default_rate=10, burst_s=1, clock=clock)
    q.charge("x", 10)
    q.charge("y", 10)
    with pytest.raises(Rejected):
        q.charge("x", 1)


@pytest.mark.parametrize("spec", ["acme", "acme=", "acme=-1", "=5", "acme=lots", "acme=inf"])
def test_bad_quota_specs_say_what_is_wrong(spec: str) -> None:
    with pytest.raises(ValueError, match="TENANT=TOKENS_PER_SECOND"):
        parse_quotas(spec)


def test_priorities_are_interactive_or_batch() -> None:
    assert check_priority("") == "interactive" and check_priority("batch") == "batch"
    with pytest.raises(InvalidRequest):
        check_priority("urgent")


def test_batch_requests_wait_for_an_idle_prefill_node_and_interactive_ones_do_not() -> None:
    async def go() -> None:
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[500], fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        adm = Admission(r, local=False)
        q = BatchQueue(adm, size=2, max_wait_s=30)
        first = asyncio.ensure_future(q.admit("b1", 100, 16, Slo()))
        second = asyncio.ensure_future(q.admit("b2", 100, 16, Slo()))
        await asyncio.sleep(0.2)
        assert not first.done() and not second.done() and len(q) == 2
        # Interactive requests go at once, queue or not.
        assert adm.plan("i", 100, 16, Slo()).prefill.node_id == "p0"
        # The queue is full: a third batch request is refused at once.
        with pytest.raises(Rejected, match="batch queue is full"):
            await q.admit("b3", 100, 16, Slo())
        # The prefill node's queue empties: the head goes, then (its prefill counted) the next waits.
        r._nodes["p0"].saw_load(pb.NodeLoad(fits=fits()))
        plan = await asyncio.wait_for(first, 1)
        assert plan.prefill.node_id == "p0" and plan.queued_s == 0
        with r.track(plan.prefill, 100):
            await asyncio.sleep(0.2)
            assert not second.done()
        assert (await asyncio.wait_for(second, 1)).prefill.node_id == "p0"
        assert len(q) == 0

    asyncio.run(go())


def test_a_batch_request_is_dropped_at_its_deadline_and_a_cancelled_one_leaves_the_queue() -> None:
    async def go() -> None:
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[500], fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        q = BatchQueue(Admission(r, local=False), size=4, max_wait_s=30)
        with pytest.raises(Rejected, match="no spare capacity"):
            await asyncio.wait_for(q.admit("b1", 100, 16, Slo(), client_deadline_s=0.15), 2)
        waiting = asyncio.ensure_future(q.admit("b2", 100, 16, Slo()))
        await asyncio.sleep(0.1)
        assert len(q) == 1
        waiting.cancel()
        await asyncio.sleep(0.1)
        assert len(q) == 0

    asyncio.run(go())


def test_a_batch_requests_ttft_objective_counts_its_wait_and_an_impossible_one_is_refused_at_once() -> None:
    async def go() -> None:
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[500], fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        clock = Clock()
        q = BatchQueue(Admission(r, local=False), size=4, max_wait_s=30, clock=clock)
        # Not even an idle node prefills 100 tokens in 50 ms: refused at once, not after 30 s.
        with pytest.raises(Rejected, match="not met even on an idle node"):
            await asyncio.wait_for(q.admit("never", 100, 16, Slo(ttft_s=0.05)), 1)
        # 2 s to first token; it waits 1.95 s, and then 0.11 s of prefill no longer fits.
        late = asyncio.ensure_future(q.admit("late", 100, 16, Slo(ttft_s=2.0)))
        ok = asyncio.ensure_future(q.admit("ok", 100, 16, Slo(ttft_s=5.0)))
        await asyncio.sleep(0.1)
        clock.t = 1.95
        r._nodes["p0"].saw_load(pb.NodeLoad(fits=fits()))
        with pytest.raises(Rejected, match=r"waited 1\.9.*not met even on an idle node"):
            await asyncio.wait_for(late, 1)
        plan = await asyncio.wait_for(ok, 1)
        assert plan.ttft_s == pytest.approx(1.95 + 0.11)  # what it waited, then its prefill

    asyncio.run(go())


def test_the_clusters_default_ttft_objective_counts_a_batch_requests_wait_too() -> None:
    async def go() -> None:
        r = cluster({"p0": pb.NodeLoad(prefill_queue=[500], fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        clock = Clock()
        q = BatchQueue(Admission(r, local=False, default_slo=Slo(ttft_s=2.0)), size=4, max_wait_s=30, clock=clock)
        late = asyncio.ensure_future(q.admit("late", 100, 16, Slo()))
        await asyncio.sleep(0.1)
        clock.t = 2.5
        with pytest.raises(Rejected, match="past its TTFT objective"):
            await asyncio.wait_for(late, 1)

    asyncio.run(go())


def test_a_local_start_is_spare_capacity_even_beside_running_streams() -> None:
    async def go() -> None:
        # No prefill node; the decode node is decoding: its local prefill has nothing queued ahead.
        r = cluster({"d0": pb.NodeLoad(decode_batch=4, decode_context=400, fits=fits(), step_tokens=64)})
        q = BatchQueue(Admission(r), size=4, max_wait_s=30)
        plan = await asyncio.wait_for(q.admit("b", 300, 16, Slo()), 1)
        assert plan.local and plan.queued_s == 0.0

    asyncio.run(go())


def test_forgetting_full_buckets_keeps_the_one_being_charged() -> None:
    import tandem.coordinator.traffic as traffic

    clock = Clock()
    q = Quotas({}, default_rate=10, burst_s=1, clock=clock)
    old = traffic.MAX_IDLE_BUCKETS
    traffic.MAX_IDLE_BUCKETS = 2
    try:
        for name in ("a", "b", "c"):
            q.charge(name, 1)
        clock.t = 5.0  # a, b and c have refilled
        q.charge("d", 10)  # trims the full ones, but d's own stays
        with pytest.raises(Rejected):
            q.charge("d", 1)  # d spent its bucket: still spent
        assert "a" not in q._buckets
    finally:
        traffic.MAX_IDLE_BUCKETS = old
