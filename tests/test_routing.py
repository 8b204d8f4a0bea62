import asyncio

import pytest

from tandem.cluster import core_plan
from tandem.coordinator.router import Router
from tandem.errors import Unavailable
from tandem.membership import NodeRecord


def rec(node_id: str, role: str, model: str = "tiny") -> NodeRecord:
    return NodeRecord(node_id=node_id, role=role, grpc_address=f"127.0.0.1:{1000 + len(node_id)}",
                      kv_address="127.0.0.1:1", model=model, max_model_len=512)


def test_least_outstanding_wins_and_empty_pools_say_which() -> None:
    async def go() -> None:
        r = Router("tiny")
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
