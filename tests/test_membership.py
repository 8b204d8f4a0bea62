"""Membership against a real etcd: register, watch, clean exit, and a lease that runs out."""

import asyncio
import time

from tandem.etcd_server import LocalEtcd
from tandem.membership import MembershipView, NodeRecord, Registration


def test_register_watch_deregister_and_expire() -> None:
    async def go(url: str) -> None:
        view = MembershipView(url, "t")
        await view.start()
        a = Registration(url, "t", NodeRecord("p0", "prefill", "127.0.0.1:1", "127.0.0.1:2", "m", 512), ttl_s=2)
        b = Registration(url, "t", NodeRecord("d0", "decode", "127.0.0.1:3", "127.0.0.1:4", "m", 512), ttl_s=2)
        await a.start()
        await b.start()

        async def until(pred, timeout_s: float) -> float:
            t0 = time.monotonic()
            while not pred():
                assert time.monotonic() - t0 < timeout_s, "membership did not converge"
                await asyncio.sleep(0.05)
            return time.monotonic() - t0

        await until(lambda: {n.node_id for n in view.all_nodes()} == {"p0", "d0"}, 5)
        await asyncio.sleep(3)  # past the TTL: keepalive holds both
        assert {n.node_id for n in view.all_nodes()} == {"p0", "d0"}
        await a.close()  # clean exit revokes at once
        await until(lambda: not view.nodes("prefill"), 2)
        # a node that stops refreshing (as if killed) disappears within its TTL
        b._task.cancel()
        waited = await until(lambda: not view.nodes("decode"), 6)
        assert waited <= 4
        await view.close()

    with LocalEtcd() as etcd:
        asyncio.run(go(etcd.url))
