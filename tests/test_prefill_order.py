"""The prefill order (coordinator/prefillq.py): the schedule on known entries, who gets the node
next, predictions with known run times, and admission refusing a request that would push queued
ones past their deadlines."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from tandem.coordinator import prefillq
from tandem.coordinator.admission import Admission, Slo
from tandem.coordinator.estimates import prefill_estimate
from tandem.coordinator.prefillq import Entry, NodeGone, PrefillOrder, schedule
from tandem.errors import DeadlineExceeded, Rejected
from tandem.proto import tandem_pb2 as pb

from test_admission import cluster, fits


def E(seq: int, run_s: float, deadline: float, urgent: bool = False, arrival: float = 0.0) -> Entry:
    return Entry(f"r{seq}", 100, arrival, deadline, run_s, urgent=urgent, seq=seq)


def names(entries: list[Entry]) -> list[str]:
    return [e.rid for e in entries]


def test_earliest_deadline_first_when_all_fit() -> None:
    on_time, late = schedule([E(0, 1.0, 1.2), E(1, 0.1, 0.5), E(2, 0.1, 0.6)], start=0.0)
    assert names(on_time) == ["r1", "r2", "r0"] and late == []


def test_the_longest_is_given_up_when_one_would_finish_late() -> None:
    # r0 would end at 1.2 > 1.1: it is the longest, so it goes last and the short ones keep theirs.
    on_time, late = schedule([E(0, 1.0, 1.1), E(1, 0.1, 0.5), E(2, 0.1, 0.6)], start=0.0)
    assert names(on_time) == ["r1", "r2"] and names(late) == ["r0"]
    # Moore-Hodgson drops the longest taken so far, not the one that missed: r1 (0.5 s) misses at
    # 1.0 > 0.9, r0 and r1 are as long, the later one goes; r2 then fits.
    on_time, late = schedule([E(0, 0.5, 0.6), E(1, 0.5, 0.9), E(2, 0.2, 1.0)], start=0.0)
    assert names(on_time) == ["r0", "r2"] and names(late) == ["r1"]
    # The start counts: from 0.5 nothing fits but the shortest.
    on_time, late = schedule([E(0, 0.3, 0.6), E(1, 0.05, 0.6)], start=0.5)
    assert names(on_time) == ["r1"] and names(late) == ["r0"]


def test_a_migrated_leg_goes_first_and_its_time_counts() -> None:
    on_time, late = schedule([E(0, 0.1, 0.15), E(1, 0.1, 9.0, urgent=True)], start=0.0)
    assert names(on_time) == ["r1"] and names(late) == ["r0"]  # r0 would end at 0.2 > 0.15


class FakeRouter:
    def __init__(self) -> None:
        self.up = True

    def routable(self, node) -> bool:  # type: ignore[no-untyped-def]
        return self.up


def _node(run_s_per_100_tokens: float = 0.1):  # type: ignore[no-untyped-def]
    """A prefill node whose model takes ``run_s_per_100_tokens`` per 100 prompt tokens."""
    r = cluster({"p0": pb.NodeLoad(fits=fits(prefill=(0.0, run_s_per_100_tokens / 100, 0.0)))})
    return r._nodes["p0"]


async def _occupy(order: PrefillOrder, node, now: float) -> tuple[asyncio.Task[None], asyncio.Event]:  # type: ignore[no-untyped-def]
    """A request that holds the node's turn until the event is set."""
    hold = asyncio.Event()

    async def running() -> None:
        async with order.turn(node, order.entry(node, "a", 100, now, 5.0)):
            await hold.wait()

    task = asyncio.create_task(running())
    await asyncio.sleep(0.01)
    return task, hold


def test_the_node_gets_one_at_a_time_and_the_tightest_deadline_next() -> None:
    async def go() -> list[str]:
        node, ran = _node(), []
        order = PrefillOrder(FakeRouter(), "slack", depth=1)  # type: ignore[arg-type]
        now = time.perf_counter()
        release = asyncio.Event()

        async def req(rid: str, tokens: int, ttft_s: float | None, hold: bool = False) -> None:
            async with order.turn(node, order.entry(node, rid, tokens, now, ttft_s)):
                ran.append(rid)
                if hold:
                    await release.wait()

        waiting0 = prefillq.WAITING._value.get()
        first = asyncio.create_task(req("running", 100, 5.0, hold=True))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(req("long", 2000, 5.0)), asyncio.create_task(req("nolimit", 50, None)),
                asyncio.create_task(req("short", 50, 1.0))]
        await asyncio.sleep(0.01)
        assert ran == ["running"]  # depth 1: the others wait here, not in the engine
        assert prefillq.WAITING._value.get() == waiting0 + 3
        release.set()
        await asyncio.gather(first, *rest)
        assert prefillq.WAITING._value.get() == waiting0 and order._queues == {}
        return ran

    # short's deadline is 1 s, long's 5 s, nolimit's NO_SLO_S (10 s).
    assert asyncio.run(go()) == ["running", "short", "long", "nolimit"]


def test_fifo_and_engine_orders_hold_nothing() -> None:
    async def go() -> None:
        node = _node()
        for name in ("fifo", "engine"):
            order = PrefillOrder(FakeRouter(), name)  # type: ignore[arg-type]
            now = time.perf_counter()
            async with order.turn(node, order.entry(node, "a", 100, now, 1.0)):
                # Both go at once: the second does not wait for the first.
                async with order.turn(node, order.entry(node, "b", 100, now, 1.0)):
                    running = [e.rid for q in order._queues.values() for e in q.running]
                    assert running == ["a", "b"]
            assert order._queues == {}
    asyncio.run(go())


def test_a_node_that_fails_a_call_does_not_get_the_next_one() -> None:
    """The running call fails and wakes the next request before the caller marks the node
    down: that request must not be sent there (it would spend its retry on a dead node)."""
    async def go() -> None:
        node, router = _node(), FakeRouter()
        order = PrefillOrder(router, "slack")  # type: ignore[arg-type]
        now = time.perf_counter()
        started = asyncio.Event()

        async def failing() -> None:
            async with order.turn(node, order.entry(node, "a", 100, now, 5.0)):
                started.set()
                await asyncio.sleep(0.01)
                raise ConnectionError("node died")

        async def next_one() -> None:
            async with order.turn(node, order.entry(node, "b", 100, now, 5.0)):
                raise AssertionError("sent to a node marked down")

        a = asyncio.create_task(failing())
        await started.wait()
        b = asyncio.create_task(next_one())
        with pytest.raises(ConnectionError):
            try:
                await a
            finally:
                router.up = False  # what the pipeline does when the call fails: mark_down
        with pytest.raises(NodeGone):
            await b
        assert order._queues == {}
    asyncio.run(go())


def test_a_waiter_gives_up_at_the_clients_deadline() -> None:
    async def go() -> None:
        node = _node()
        order = PrefillOrder(FakeRouter(), "slack")  # type: ignore[arg-type]
        now = time.perf_counter()
        t, hold = await _occupy(order, node, now)
        with pytest.raises(DeadlineExceeded, match="waited"):
            async with order.turn(node, order.entry(node, "b", 100, now, 5.0), time.perf_counter() + 0.05):
                raise AssertionError("its turn never came")
        hold.set()
        await t
        assert order._queues == {}
    asyncio.run(go())


def test_engine_priority_is_the_wall_clock_deadline_and_a_migrated_leg_is_zero() -> None:
    async def go() -> None:
        node = _node()
        node.record = dataclasses.replace(node.record, scheduling="priority")
        order = PrefillOrder(FakeRouter(), "engine")  # type: ignore[arg-type]
        now = time.perf_counter()
        a = order.engine_priority(node, order.entry(node, "a", 100, now, 1.0))
        b = order.engine_priority(node, order.entry(node, "b", 100, now, 2.0))
        assert b - a == pytest.approx(1000, abs=5)
        assert a == pytest.approx((time.time() + 1.0) * 1000, abs=50)
        assert order.engine_priority(node, order.entry(node, "m", 100, now, 1.0, urgent=True)) == 0
        assert PrefillOrder(FakeRouter(), "slack").engine_priority(node, order.entry(node, "c", 1, now, 1.0)) == 0  # type: ignore[arg-type]
    asyncio.run(go())


def test_a_request_waiting_for_a_node_that_leaves_routing_is_told_to_go_elsewhere(monkeypatch) -> None:
    monkeypatch.setattr(prefillq, "ROUTABLE_POLL_S", 0.01)

    async def go() -> None:
        node, router = _node(), FakeRouter()
        order = PrefillOrder(router, "slack")  # type: ignore[arg-type]
        now = time.perf_counter()
        t, hold = await _occupy(order, node, now)
        router.up = False
        with pytest.raises(NodeGone):
            async with order.turn(node, order.entry(node, "b", 100, now, 5.0)):
                raise AssertionError("must not get the node")
        hold.set()
        await t
        assert order._queues == {}  # nothing left behind
    asyncio.run(go())


def test_a_cancelled_waiter_leaves_the_queue_and_the_next_one_goes() -> None:
    async def go() -> None:
        node = _node()
        order = PrefillOrder(FakeRouter(), "slack")  # type: ignore[arg-type]
        now = time.perf_counter()
        hold, got = asyncio.Event(), []

        async def req(rid: str, wait: bool = False) -> None:
            async with order.turn(node, order.entry(node, rid, 100, now, 5.0)):
                got.append(rid)
                if wait:
                    await hold.wait()

        a = asyncio.create_task(req("a", wait=True))
        await asyncio.sleep(0.01)
        b, c = asyncio.create_task(req("b")), asyncio.create_task(req("c"))
        await asyncio.sleep(0.01)
        b.cancel()
        hold.set()
        await asyncio.gather(a, c)
        assert got == ["a", "c"] and b.cancelled()
        assert order._queues == {}
    asyncio.run(go())


def test_a_request_late_longer_than_its_objective_is_not_starved() -> None:
    order = PrefillOrder(FakeRouter(), "slack")  # type: ignore[arg-type]
    q = prefillq._NodeQueue()
    now = time.perf_counter()
    old = Entry("old", 2000, now - 3.0, now - 2.0, 1.0, seq=0)  # 1 s objective, late by 2 s
    fresh = Entry("fresh", 100, now, now + 0.5, 0.1, seq=1)
    q.waiting = [old, fresh]
    assert order._next(q, now) is old
    old.deadline = now - 0.5  # late, but by less than its objective: the on-time one first
    assert order._next(q, now) is fresh


def test_predictions_follow_the_order_and_count_whom_a_request_would_push() -> None:
    async def go() -> None:
        node = _node(0.1)  # 0.1 s per 100 tokens
        order = PrefillOrder(FakeRouter(), "slack")  # type: ignore[arg-type]
        now = time.perf_counter()
        assert order.predict(node, 100, now, 1.0) is None  # nothing queued: the node's own report decides
        hold = asyncio.Event()

        async def req(rid: str, tokens: int, ttft_s: float) -> None:
            async with order.turn(node, order.entry(node, rid, tokens, now, ttft_s)):
                await hold.wait()

        tasks = [asyncio.create_task(req("running", 500, 5.0))]  # 0.5 s, runs now
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(req("queued", 1000, 1.65)))  # 1.0 s, ends by 1.5 of 1.65
        await asyncio.sleep(0)
        # A short prompt with a tight objective goes ahead of the queued one, which then ends at
        # 1.6: it fits, and pushes nobody.
        p = order.predict(node, 100, now, 0.7)
        assert p is not None and p.pushes == 0 and p.wait_s == pytest.approx(0.5, abs=0.05)
        # A longer one ahead would push the queued one past its 1.65 s.
        p = order.predict(node, 300, now, 0.9)
        assert p is not None and p.pushes == 1 and p.wait_s == pytest.approx(0.5, abs=0.05)
        # A relaxed one waits behind both.
        p = order.predict(node, 100, now, 5.0)
        assert p is not None and p.pushes == 0 and p.wait_s == pytest.approx(1.5, abs=0.05)
        # Admission: the first is admitted ahead of the queue, the second refused for the other's sake.
        adm = Admission(_router_of(node), local=False, order=order)  # type: ignore[arg-type]
        assert prefill_estimate(node, 100, order, now, 0.7).seconds == pytest.approx(0.6, abs=0.05)
        plan = adm.plan("ok", 100, 1, Slo(ttft_s=0.7), arrival=now)
        assert plan.ttft_s == pytest.approx(0.6, abs=0.05)
        with pytest.raises(Rejected, match=r"only by pushing 1 queued request"):
            adm.plan("pushy", 300, 1, Slo(ttft_s=0.9), arrival=now)
        hold.set()
        await asyncio.gather(*tasks)
    asyncio.run(go())


def test_pushes_count_how_many_more_miss_not_whom_moore_hodgson_swaps() -> None:
    async def go() -> None:
        node = _node(1.0)  # 1 s per 100 tokens
        order = PrefillOrder(FakeRouter(), "slack", depth=1)  # type: ignore[arg-type]
        now = time.perf_counter()
        hold = asyncio.Event()

        async def req(rid: str, tokens: int, ttft_s: float | None) -> None:
            async with order.turn(node, order.entry(node, rid, tokens, now, ttft_s)):
                await hold.wait()

        tasks = [asyncio.create_task(req("running", 1, 60.0))]  # ~0 s, holds the node
        await asyncio.sleep(0)
        # X: 2 s due at 2.5; Y: 3 s due at 4.5 - only one of them can make it: Y is given up.
        tasks += [asyncio.create_task(req("X", 200, 2.5)), asyncio.create_task(req("Y", 300, 4.5))]
        await asyncio.sleep(0)
        # N: 1 s due at 1.2. With it, N and Y fit (1 + 3 = 4 <= 4.5) and X is given up instead:
        # as many miss as before, so N pushes nobody.
        p = order.predict(node, 100, now, 1.2)
        assert p is not None and p.pushes == 0 and p.wait_s == pytest.approx(0.0, abs=0.05)
        # Without an objective, Z (10 s) is nobody whose miss counts.
        tasks.append(asyncio.create_task(req("Z", 700, None)))
        await asyncio.sleep(0)
        p = order.predict(node, 100, now, 1.2)
        assert p is not None and p.pushes == 0
        hold.set()
        await asyncio.gather(*tasks)
    asyncio.run(go())


def _router_of(node):  # type: ignore[no-untyped-def]
    class R:
        def routable_nodes(self, role: str):  # type: ignore[no-untyped-def]
            return [node] if role == "prefill" else []

        def routable(self, n) -> bool:  # type: ignore[no-untyped-def]
            return True

    return R()
