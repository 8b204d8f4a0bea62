import asyncio
import time

import grpc
import pytest

from tandem.local.cluster import core_plan
from tandem.coordinator.router import Router
from tandem.errors import Unavailable
from tandem.membership import NodeRecord


def rec(node_id: str, role: str, model: str = "tiny") -> NodeRecord:
    return NodeRecord(node_id=node_id, role=role, grpc_address=f"127.0.0.1:{1000 + len(node_id)}",
                      kv_address="127.0.0.1:1", model=model, max_model_len=512)


def test_least_outstanding_wins_and_empty_pools_say_which() -> None:
    async def go() -> None:
        r = Router("tiny", watch_loads=False)
        with pytest.raises(Unavailable, match="prefill pool is empty"):
            r.pick("prefill")
        r.on_membership("p0", rec("p0", "prefill"))
        r.on_membership("p1", rec("p1", "prefill"))
        r.on_membership("x", rec("x", "prefill", model="other"))  # another model: ignored
        a = r.pick("prefill")
        with r.track(a):
            b = r.pick("prefill")
            assert b is not a
            with r.track(b):
                assert {a.outstanding, b.outstanding} == {1}
        assert a.outstanding == b.outstanding == 0
        assert len(r.nodes("prefill")) == 2
        with pytest.raises(Unavailable, match="decode pool is empty"):
            r.pick("decode")
        r.on_membership("p0", None)
        assert [n.record.node_id for n in r.nodes("prefill")] == ["p1"]
        await r.close()

    asyncio.run(go())


def test_core_plan_keeps_pools_apart() -> None:
    assert core_plan(1, 1, [0, 1]) == ["0", "1"]
    assert core_plan(1, 2, [0, 1]) == ["0", "1", "1"]
    assert core_plan(2, 2, list(range(8))) == ["0-1", "2-3", "4-5", "6-7"]
    with pytest.raises(ValueError, match="at least 2 cores"):
        core_plan(1, 1, [0])
    # No prefill pool: the decode nodes have every core, one core enough.
    assert core_plan(0, 2, [0, 1]) == ["0", "1"] and core_plan(0, 1, [0, 1]) == ["0-1"] and core_plan(0, 1, [3]) == ["3"]
    with pytest.raises(ValueError, match="needs a decode node"):
        core_plan(1, 0, [0, 1])


def test_a_briefly_empty_pool_waits_a_bounded_time_and_an_unknown_one_answers_at_once() -> None:
    async def go() -> None:
        r = Router("tiny", pool_wait_s=0.5, watch_loads=False)
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="decode pool is empty"):
            await r.acquire("decode")  # no decode node ever: at once
        assert time.monotonic() - t0 < 0.1
        r.on_membership("d0", rec("d0", "decode"))
        r.on_membership("d0", None)  # it left (a restart) ...
        waiter = asyncio.ensure_future(r.acquire("decode"))
        await asyncio.sleep(0.1)
        assert not waiter.done()  # ... so a request waits for it
        r.on_membership("d0", rec("d0", "decode"))
        assert (await asyncio.wait_for(waiter, 1)).record.node_id == "d0"
        r.on_membership("d0", None)
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="no decode node became available within"):
            await r.acquire("decode")
        assert 0.4 < time.monotonic() - t0 < 2
        await r.close()

    asyncio.run(go())


def test_a_node_marked_down_leaves_routing_and_returns_when_it_answers() -> None:
    class Health:
        serving = False

        async def Check(self, req, timeout=None):
            from grpc_health.v1 import health_pb2

            if not self.serving:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def go() -> None:
        r = Router("tiny", pool_wait_s=5, watch_loads=False)
        r.on_membership("p0", rec("p0", "prefill"))
        r.on_membership("p1", rec("p1", "prefill"))
        health = Health()
        p0 = r._nodes["p0"]
        p0.health = health
        r.mark_down(p0, "connection refused")
        assert {r.pick("prefill").record.node_id for _ in range(3)} == {"p1"}
        await asyncio.sleep(0.7)
        assert not p0.up  # still failing its probes
        health.serving = True
        await asyncio.wait_for(_until(lambda: p0.up), 5)
        assert p0.up
        # A restarted process (new engine id) is a new client, routable at once.
        r.mark_down(p0, "broken stream")
        r.on_membership("p0", NodeRecord(**{**p0.record.__dict__, "engine_id": "p0-new"}))
        assert r._nodes["p0"].up and r._nodes["p0"] is not p0
        await r.close()

    asyncio.run(go())


async def _until(pred) -> None:
    while not pred():
        await asyncio.sleep(0.05)
