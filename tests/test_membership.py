"""Membership against a real etcd: register, watch, clean exit, and a lease that runs out."""

import asyncio
import time

import pytest

from tandem.local.etcd_server import LocalEtcd
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


def test_the_view_resyncs_after_etcd_comes_back() -> None:
    async def go() -> None:
        first = LocalEtcd().start()
        url = first.url
        try:
            view = MembershipView(url, "t")
            await view.start()
            reg = Registration(url, "t", NodeRecord("p0", "prefill", "127.0.0.1:1", "127.0.0.1:2", "m", 512))
            await reg.start()
            t0 = time.monotonic()
            while not view.nodes("prefill"):
                assert time.monotonic() - t0 < 5
                await asyncio.sleep(0.05)
            reg._task.cancel()
        finally:
            first.stop()  # its data goes with it: the new etcd starts empty
        second = LocalEtcd(client_port=first.client_port, peer_port=first.peer_port).start()
        try:
            t0 = time.monotonic()
            while view.nodes("prefill"):
                assert time.monotonic() - t0 < 15, "the view kept a node that the new etcd does not have"
                await asyncio.sleep(0.1)
            again = Registration(url, "t", NodeRecord("p1", "prefill", "127.0.0.1:3", "127.0.0.1:4", "m", 512))
            await again.start()
            t0 = time.monotonic()
            while [n.node_id for n in view.nodes("prefill")] != ["p1"]:
                assert time.monotonic() - t0 < 10, "the view did not follow the new etcd"
                await asyncio.sleep(0.1)
            await again.close()
            await view.close()
        finally:
            second.stop()

    asyncio.run(go())


def test_drain_asks_and_assigned_roles() -> None:
    import json

    import pytest

    from tandem.membership import DrainAsk, assigned_role, drain_key, etcd_client, role_key

    async def go(url: str) -> None:
        reg = Registration(url, "t", NodeRecord("p0", "prefill", "127.0.0.1:1", "127.0.0.1:2", "m", 512,
                                                engine_id="p0-aaa"))
        await reg.start()
        client = etcd_client(url)
        try:
            assert await reg.drain_requested("t") is None
            assert await assigned_role(url, "t", "p0") is None
            # meant for an earlier process of this node: not this one's
            await client.put(drain_key("t", "p0"), json.dumps({"engine_id": "p0-old", "grace_s": 5}).encode())
            assert await reg.drain_requested("t") is None
            await client.put(drain_key("t", "p0"), json.dumps({"engine_id": "p0-aaa", "grace_s": 5}).encode())
            assert await reg.drain_requested("t") == DrainAsk(5.0, restart=False)
            await client.put(drain_key("t", "p0"),
                             json.dumps({"engine_id": "p0-aaa", "grace_s": 7, "restart": True}).encode())
            assert await reg.drain_requested("t") == DrainAsk(7.0, restart=True)
            await client.put(role_key("t", "p0"), json.dumps({"role": "decode"}).encode())
            assert await assigned_role(url, "t", "p0") == "decode"
            assert await assigned_role(url, "other", "p0") is None
            await client.put(role_key("t", "p0"), b'{"role": "verifier"}')
            with pytest.raises(ValueError, match="malformed"):
                await assigned_role(url, "t", "p0")
        finally:
            await client.close()
            await reg.close()

    with LocalEtcd() as etcd:
        asyncio.run(go(etcd.url))


def test_a_stale_record_under_a_nodes_old_role_does_not_take_it_out_of_the_view() -> None:
    """A node that switched role registers under its new role's key; when the old key goes later
    (its lease expired instead of being revoked), the view says the node is still there."""
    seen: list[tuple[str, str | None]] = []

    async def go(url: str) -> None:
        view = MembershipView(url, "t", on_change=lambda nid, rec: seen.append((nid, rec.role if rec else None)))
        await view.start()
        old = Registration(url, "t", NodeRecord("n0", "prefill", "127.0.0.1:1", "127.0.0.1:2", "m", 512,
                                                engine_id="n0-a"), ttl_s=2)
        await old.start()
        old._task.cancel()  # it stops refreshing: its key expires by itself
        new = Registration(url, "t", NodeRecord("n0", "decode", "127.0.0.1:3", "127.0.0.1:4", "m", 512,
                                                engine_id="n0-b"))
        await new.start()
        t0 = time.monotonic()
        while ("n0", "decode") not in seen or view.nodes("prefill"):
            assert time.monotonic() - t0 < 8, seen
            await asyncio.sleep(0.05)
        assert seen[-1] == ("n0", "decode")  # the old key's removal reported the node as it is now
        assert [n.role for n in view.all_nodes()] == ["decode"]
        await new.close()
        t0 = time.monotonic()
        while seen[-1] != ("n0", None):
            assert time.monotonic() - t0 < 3, seen
            await asyncio.sleep(0.05)
        await view.close()

    with LocalEtcd() as etcd:
        asyncio.run(go(etcd.url))


def test_membership_over_tls_to_an_etcd_that_asks_clients_for_a_certificate(tmp_path, monkeypatch) -> None:
    import pytest

    from tandem.local.supervisor import OK
    from tandem.membership import check_etcd_tls, etcd_client
    from tandem.tls import TlsConfig, make_certs

    certs = make_certs(tmp_path / "certs", ["127.0.0.1"])
    daemon = TlsConfig(str(certs["server"]), str(certs["server_key"]), str(certs["ca"]))

    async def register_and_see(url: str) -> set[str]:
        view = MembershipView(url, "t")
        await view.start()
        reg = Registration(url, "t", NodeRecord("p0", "prefill", "127.0.0.1:1", "127.0.0.1:2", "m", 512), ttl_s=3)
        await reg.start()
        try:
            t0 = time.monotonic()
            while not view.all_nodes() and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.05)
            return {n.node_id for n in view.all_nodes()}
        finally:
            await reg.close()
            await view.close()

    async def refused(url: str) -> bool:
        client = etcd_client(url)
        try:
            await asyncio.wait_for(client.get(b"x"), 5)
            return False
        except Exception:
            return True
        finally:
            await client.close()

    with LocalEtcd(tls=daemon) as etcd:
        assert etcd.url.startswith("https://") and etcd.probe() == OK
        with pytest.raises(ValueError, match="give --etcd-ca"):
            check_etcd_tls(etcd.url, "", "", "")
        monkeypatch.setenv("TANDEM_ETCD_CA", daemon.ca)
        assert asyncio.run(refused(etcd.url))  # no client certificate: etcd refuses
        monkeypatch.setenv("TANDEM_ETCD_CERT", daemon.cert)
        monkeypatch.setenv("TANDEM_ETCD_KEY", daemon.key)
        assert asyncio.run(register_and_see(etcd.url)) == {"p0"}
        assert asyncio.run(refused(etcd.url.replace("https://", "http://")))  # plaintext to a TLS etcd


def test_local_etcd_picks_new_ports_when_one_is_taken_before_it_binds(monkeypatch) -> None:
    import socket

    from tandem.local import etcd_server

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = etcd_server.free_port
    picks = iter([taken])
    monkeypatch.setattr(etcd_server, "free_port", lambda host: next(picks, None) or real(host))
    try:
        with LocalEtcd() as etcd:
            assert etcd.client_port != taken
            assert etcd.probe() == "ok"
    finally:
        squatter.close()


def test_local_etcd_keeps_ports_it_was_given_and_says_which_is_taken() -> None:
    import socket

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    etcd = LocalEtcd(client_port=squatter.getsockname()[1])
    try:
        with pytest.raises(RuntimeError, match="address already in use"):
            etcd.start(timeout_s=10)
    finally:
        etcd.stop()
        squatter.close()
