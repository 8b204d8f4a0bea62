"""The transfer engine isolates requests: per-peer lanes, deadlines, aborts, bounded queues and
connections; the block server never frees blocks it is sending. Real sockets and UCX, no vLLM."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from tandem.kvtransfer import block_server
from tandem.kvtransfer.block_server import BlockServer, HoldTable
from tandem.kvtransfer.fetcher import BlockFetcher
from tandem.kvtransfer.paged import PagedKV
from tandem.kvtransfer import transport as transport_mod
from tandem.kvtransfer.transport import make_data_planes
from tandem.kvtransfer.wire import ChannelClosed, recv_msg, send_msg

from test_kvtransfer import job, paged, wait_results


class StalledPeer:
    """A KV peer that answers the handshake over TCP, then never sends a fetch's bytes.
    It records every message and every connection the fetcher closes."""

    def __init__(self, kv: PagedKV) -> None:
        self.kv = kv
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.messages: list[dict] = []
        self.hangups = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def ops(self, op: str) -> list[str]:
        with self._lock:
            return [m["req"] for m in self.messages if m.get("op") == op]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    msg = recv_msg(conn)
                except (ChannelClosed, OSError):
                    with self._lock:
                        self.hangups += 1
                    return
                with self._lock:
                    self.messages.append(msg)
                if msg["op"] == "hello":
                    send_msg(conn, {"ok": True, "plane": "tcp", "layout": self.kv.layout.to_json()})
                elif msg["op"] == "release":
                    send_msg(conn, {"ok": True})
                # a fetch: never answered

    def close(self) -> None:
        self.sock.close()


def wait_for(pred, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def collect(fetcher: BlockFetcher, into: dict[str, bool]) -> None:
    done, failed = fetcher.take_results()
    for r in done:
        assert r not in into, f"{r} reported twice"  # vLLM would assert on the second report
        into[r] = r in failed


def test_a_stalled_peer_delays_only_its_own_fetches_and_an_abort_stops_them_at_once() -> None:
    src, dst = paged("random"), paged("zeros")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("tcp"))
    stalled = StalledPeer(src)
    fetcher = BlockFetcher(dst, make_data_planes("tcp"))
    results: dict[str, bool] = {}
    try:
        fetcher.submit(job("stuck", stalled.address, "s1", [1, 2], [20, 21]))
        fetcher.submit(job("queued", stalled.address, "s2", [3], [22]))
        wait_for(lambda: stalled.ops("fetch") == ["s1"], 5, "the stalled fetch to start")
        server.holds.hold("r1", [3, 7], lease_s=30)
        fetcher.submit(job("good", server.address, "r1", [3, 7], [10, 11]))
        # Another peer's fetch is not held up behind the stalled one.
        wait_for(lambda: collect(fetcher, results) or "good" in results, 5, "the healthy peer's fetch")
        assert results == {"good": False}
        assert torch.equal(dst.views[0][[10, 11]], src.views[0][[3, 7]])

        # The queued one is reported at once (finished, not failed: vLLM then frees its blocks).
        fetcher.abort("queued")
        collect(fetcher, results)
        assert results.get("queued") is False
        # The running one: its connection is shut, its wait ends now, not at the 30 s I/O timeout.
        fetcher.abort("stuck")
        took = wait_for(lambda: collect(fetcher, results) or "stuck" in results, 5, "the running fetch to stop")
        assert results["stuck"] is False and took < 2
        # Both holds are released on the holder's side, without waiting for their leases.
        wait_for(lambda: sorted(stalled.ops("release")) == ["s1", "s2"], 5, "releases of both holds")
        assert stalled.ops("fetch") == ["s1"]  # the queued one never started
        assert not dst.views[0][[20, 21, 22]].any()
        fetcher.abort("good")  # done already: nothing happens, nothing is reported again
        time.sleep(0.2)
        collect(fetcher, results)
        assert set(results) == {"good", "queued", "stuck"}
        assert fetcher.take_stats().aborts == 2
    finally:
        fetcher.close()
        server.close()
        stalled.close()


def test_a_fetch_past_its_deadline_fails_and_one_past_its_lease_never_starts() -> None:
    src, dst = paged("random"), paged("zeros")
    stalled = StalledPeer(src)
    fetcher = BlockFetcher(dst, make_data_planes("tcp"), timeout_s=0.5)
    results: dict[str, bool] = {}
    try:
        fetcher.submit(job("slow", stalled.address, "s1", [1], [2]))
        took = wait_for(lambda: collect(fetcher, results) or "slow" in results, 5, "the deadline")
        assert results == {"slow": True} and took < 2.5
        fetcher.submit(job("late", stalled.address, "s2", [1], [2], lease_deadline=time.time() - 1))
        wait_for(lambda: collect(fetcher, results) or "late" in results, 5, "the expired lease")
        assert results["late"] is True and "s2" not in stalled.ops("fetch")
    finally:
        fetcher.close()
        stalled.close()


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_an_abort_mid_transfer_lands_no_byte_and_the_holder_frees_its_blocks(transport: str) -> None:
    src, dst = paged("random"), paged("zeros")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes(transport))
    send = server._send
    sending = threading.Event()

    def late_send(*args, **kwargs):  # the holder answers "ok" only after the abort
        sending.set()
        time.sleep(1.0)
        return send(*args, **kwargs)

    server._send = late_send  # type: ignore[method-assign]
    fetcher = BlockFetcher(dst, make_data_planes(transport))
    retired_before = len(transport_mod._RETIRED_WORKERS)
    results: dict[str, bool] = {}
    try:
        server.holds.hold("r1", [1, 2, 3], lease_s=30)
        fetcher.submit(job("x", server.address, "r1", [1, 2, 3], [5, 6, 7]))
        assert sending.wait(5)
        fetcher.abort("x")
        took = wait_for(lambda: collect(fetcher, results) or "x" in results, 5, "the abort")
        assert results == {"x": False} and took < 1.0
        wait_for(lambda: server.holds.num_blocks_held() == 0, 10, "the holder to free the blocks")
        assert server.holds.take_freed() == {"r1"}
        time.sleep(0.5)
        assert not any(v[[5, 6, 7]].any() for v in dst.views)  # nothing landed after the abort
        # The lane serves the next fetch on a fresh connection (and, for UCX, a fresh worker).
        server._send = send  # type: ignore[method-assign]
        server.holds.hold("r2", [4], lease_s=30)
        fetcher.submit(job("y", server.address, "r2", [4], [8]))
        assert wait_results(fetcher) == ({"y"}, set())
        assert torch.equal(dst.views[1][8], src.views[1][4])
        if transport == "ucx":  # the abandoned receive's worker and endpoint are kept, never progressed
            assert len(transport_mod._RETIRED_WORKERS) > retired_before
    finally:
        fetcher.close()
        server.close()


def test_blocks_being_sent_are_freed_neither_by_a_release_nor_by_the_lease_until_the_send_ends() -> None:
    holds = HoldTable()
    holds.hold("r", [1, 2], lease_s=0.05)
    with holds.sending("r") as ids:
        assert ids == [1, 2]
        time.sleep(0.1)
        assert holds.take_freed() == set()  # lease over, but the bytes are still being read
        assert holds.release("r")
        assert holds.take_freed() == set() and holds.num_blocks_held() == 2
    assert holds.take_freed() == {"r"} and holds.num_blocks_held() == 0


def test_the_block_server_refuses_connections_past_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_server, "MAX_CONNECTIONS", 2)
    src = paged("random")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("tcp"))
    host, port = server.address.split(":")
    socks = []
    try:
        for _ in range(2):
            s = socket.create_connection((host, int(port)), timeout=5)
            send_msg(s, {"op": "hello", "layout": src.layout.to_json(), "planes": ["tcp"]})
            assert recv_msg(s)["ok"]
            socks.append(s)
        with socket.create_connection((host, int(port)), timeout=5) as extra:
            reply = recv_msg(extra)
        assert not reply["ok"] and "at most 2" in reply["error"]
        socks.pop().close()  # a slot frees when a connection ends
        time.sleep(0.2)
        with socket.create_connection((host, int(port)), timeout=5) as again:
            send_msg(again, {"op": "hello", "layout": src.layout.to_json(), "planes": ["tcp"]})
            assert recv_msg(again)["ok"]
    finally:
        for s in socks:
            s.close()
        server.close()


def test_an_unexpected_error_fails_that_fetch_only_and_the_lane_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.kvtransfer import fetcher as fetcher_mod

    src, dst = paged("random"), paged("zeros")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("tcp"))
    fetcher = BlockFetcher(dst, make_data_planes("tcp"))
    transfer = fetcher_mod._Lane._transfer
    calls = []

    def flaky(self, fetch, conn):
        calls.append(fetch.job.req_id)
        if len(calls) == 1:
            raise RuntimeError("a bug, or torch out of memory")
        return transfer(self, fetch, conn)

    monkeypatch.setattr(fetcher_mod._Lane, "_transfer", flaky)
    try:
        server.holds.hold("r1", [1], lease_s=30)
        server.holds.hold("r2", [2], lease_s=30)
        fetcher.submit(job("a", server.address, "r1", [1], [5]))
        assert wait_results(fetcher) == ({"a"}, {"a"})
        fetcher.submit(job("b", server.address, "r2", [2], [6]))
        assert wait_results(fetcher) == ({"b"}, set())
        assert torch.equal(dst.views[0][6], src.views[0][2])
    finally:
        fetcher.close()
        server.close()


def test_an_abort_as_the_fetch_completes_reports_it_once_and_spares_the_next_fetch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.kvtransfer import fetcher as fetcher_mod

    src, dst = paged("random"), paged("zeros")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("tcp"))
    fetcher = BlockFetcher(dst, make_data_planes("tcp"))
    transfer = fetcher_mod._Lane._transfer

    def abort_at_the_end(self, fetch, conn):
        n = transfer(self, fetch, conn)
        if fetch.job.req_id == "a":
            fetcher.abort("a")  # lands after the last byte, before the lane reports: shuts the socket
        return n

    monkeypatch.setattr(fetcher_mod._Lane, "_transfer", abort_at_the_end)
    results: dict[str, bool] = {}
    try:
        server.holds.hold("r1", [1], lease_s=30)
        server.holds.hold("r2", [2], lease_s=30)
        fetcher.submit(job("a", server.address, "r1", [1], [5]))
        wait_for(lambda: collect(fetcher, results) or "a" in results, 5, "the first fetch")
        fetcher.submit(job("b", server.address, "r2", [2], [6]))
        wait_for(lambda: collect(fetcher, results) or "b" in results, 5, "the second fetch")
        assert results == {"a": False, "b": False}  # b did not inherit a's shut socket
        time.sleep(0.2)
        collect(fetcher, results)
        assert set(results) == {"a", "b"}
    finally:
        fetcher.close()
        server.close()


def test_ucx_given_up_too_often_falls_back_to_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.kvtransfer import transport

    monkeypatch.setattr(transport, "MAX_RETIRED_WORKERS", len(transport._RETIRED_WORKERS))
    src, dst = paged("random"), paged("zeros")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("auto"))
    fetcher = BlockFetcher(dst, make_data_planes("auto"))
    try:
        server.holds.hold("r1", [3, 4], lease_s=30)
        fetcher.submit(job("x", server.address, "r1", [3, 4], [7, 8]))
        assert wait_results(fetcher) == ({"x"}, set())
        assert torch.equal(dst.views[1][[7, 8]], src.views[1][[3, 4]])
        assert fetcher._lanes[server.address]._conn.plane.name == "tcp"
    finally:
        fetcher.close()
        server.close()


def test_an_idle_connection_is_closed_and_its_slot_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_server, "IDLE_TIMEOUT_S", 0.3)
    src = paged("random")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("tcp"))
    host, port = server.address.split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            send_msg(s, {"op": "hello", "layout": src.layout.to_json(), "planes": ["tcp"]})
            assert recv_msg(s)["ok"]
            assert s.recv(1) == b""  # a peer that went silent is hung up on
        # The server's thread frees the slot just after it hangs up: give it a moment (a loaded box).
        deadline = time.monotonic() + 5
        while server._slots._value != block_server.MAX_CONNECTIONS and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        assert server._slots._value == block_server.MAX_CONNECTIONS  # type: ignore[attr-defined]
    finally:
        server.close()
