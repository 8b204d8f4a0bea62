"""The block transport without vLLM: hold table, layout checks, and real fetches over TCP and UCX."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tandem.kvtransfer.capability import CapabilityRefused, load_secret, sign, write_secret
from tandem.kvtransfer.fetcher import BlockFetcher, LoadJob, release_remote
from tandem.kvtransfer.handle import TransferHandle
from tandem.kvtransfer.layout import KVLayout, KVLayoutMismatch
from tandem.kvtransfer.paged import PagedKV
from tandem.kvtransfer.block_server import BlockServer, HoldTable
from tandem.kvtransfer.secure import ControlSecurity
from tandem.kvtransfer.transport import make_data_planes

NUM_BLOCKS = 128
FIELDS = {"block_size": 32, "num_kv_heads": 2, "head_size": 64}


def paged(fill: str, layers: int = 2, fields: dict | None = None) -> PagedKV:
    shape = (NUM_BLOCKS, 2, 32, 128)
    if fill == "random":
        g = torch.Generator().manual_seed(0)
        ts = [torch.randn(shape, generator=g) for _ in range(layers)]
    else:
        ts = [torch.zeros(shape) for _ in range(layers)]
    return PagedKV(ts, NUM_BLOCKS, fields or FIELDS)


def job(req_id: str, address: str, remote_req_id: str, remote_ids: list[int], local_ids: list[int],
        lease_deadline: float = 0.0) -> LoadJob:
    handle = TransferHandle(engine_id="", address=address, remote_request_id=remote_req_id, block_ids=remote_ids,
                            num_tokens=0, lease_deadline=lease_deadline)
    return LoadJob(req_id, handle, remote_ids, local_ids)


def wait_results(fetcher: BlockFetcher, timeout_s: float = 20) -> tuple[set[str], set[str]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, failed = fetcher.take_results()
        if done:
            return done, failed
        time.sleep(0.01)
    raise AssertionError("the fetch did not finish")


def test_hold_table_release_ack_and_lease() -> None:
    t = HoldTable()
    t.hold("a", [1, 2], lease_s=30)
    assert t.get("a") == [1, 2] and t.num_blocks_held() == 2
    assert t.release("a") is True
    assert t.take_freed() == {"a"}
    # a release that arrives before its hold frees the hold on arrival
    assert t.release("b") is False
    t.hold("b", [3], lease_s=30)
    assert t.take_freed() == {"b"} and t.num_blocks_held() == 0
    # a lease that runs out frees the blocks and refuses fetches
    t.hold("c", [4], lease_s=0.05)
    time.sleep(0.1)
    with pytest.raises(KeyError, match="lease"):
        t.get("c", wait_s=0)
    assert t.take_freed() == {"c"}
    with pytest.raises(KeyError, match="no KV blocks held"):
        t.get("zzz", wait_s=0.05)


def test_releases_for_holds_that_never_come_are_bounded() -> None:
    t = HoldTable()
    t.max_early_releases = 3
    for i in range(10):
        assert t.release(f"ghost-{i}") is False
    assert len(t._released_early) == 3
    t.hold("ghost-9", [1], lease_s=30)  # the newest is still remembered: freed on arrival
    t.hold("ghost-0", [2], lease_s=30)  # the oldest was forgotten: held until fetched or its lease ends
    assert t.take_freed() == {"ghost-9"} and t.num_blocks_held() == 1


def test_layout_mismatch_names_each_field() -> None:
    a = KVLayout(2, 32, 2, 64, "float32", (2, 32, 128))
    b = KVLayout(2, 16, 2, 64, "bfloat16", (2, 16, 128))
    a.check_compatible(KVLayout.from_json(a.to_json()))
    with pytest.raises(KVLayoutMismatch) as ei:
        a.check_compatible(b)
    msg = str(ei.value)
    assert "block_size" in msg and "dtype" in msg and "num_layers" not in msg


def test_gather_scatter_round_trip() -> None:
    src, dst = paged("random"), paged("zeros")
    buf = src.gather([5, 1, 9])
    dst.scatter([0, 2, 4], buf)
    for s, d in zip(src.views, dst.views):
        assert torch.equal(d[[0, 2, 4]], s[[5, 1, 9]])
        assert not d[1].any()
    with pytest.raises(ValueError, match="block id outside"):
        src.gather([NUM_BLOCKS])


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_fetch_moves_exactly_the_held_blocks_and_frees_the_hold(transport: str) -> None:
    src, dst = paged("random"), paged("zeros")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes(transport))
    fetcher = BlockFetcher(dst, make_data_planes(transport))
    try:
        server.holds.hold("r1", [3, 7, 8], lease_s=30)
        fetcher.submit(job("local-1", server.address, "r1", [3, 7, 8], [10, 11, 12]))
        done, failed = wait_results(fetcher)
        assert done == {"local-1"} and not failed
        for s, d in zip(src.views, dst.views):
            assert torch.equal(d[[10, 11, 12]], s[[3, 7, 8]])
        deadline = time.monotonic() + 5
        freed: set[str] = set()
        while "r1" not in freed and time.monotonic() < deadline:
            freed |= server.holds.take_freed()
            time.sleep(0.01)
        assert freed == {"r1"}  # the completed send freed the hold, no ack needed
        assert fetcher.take_stats().bytes == 3 * 2 * src.layout.block_numel * 4
    finally:
        fetcher.close()
        server.close()


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_fragmented_mappings_take_the_staged_path_and_still_land_right(transport: str) -> None:
    from tandem.kvtransfer.fetcher import MAX_DIRECT_RUNS
    from tandem.kvtransfer.paged import runs

    src_ids = list(range(0, 2 * (MAX_DIRECT_RUNS + 4), 2))  # every other block: one run per block
    dst_ids = list(range(len(src_ids)))
    assert len(runs(src_ids, dst_ids)) > MAX_DIRECT_RUNS
    assert runs([4, 5, 6, 9], [0, 1, 2, 3]) == [(4, 0, 3), (9, 3, 1)]
    src, dst = paged("random"), paged("zeros")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes(transport))
    fetcher = BlockFetcher(dst, make_data_planes(transport))
    try:
        server.holds.hold("r1", src_ids, lease_s=30)
        fetcher.submit(job("local", server.address, "r1", src_ids, dst_ids))
        done, failed = wait_results(fetcher)
        assert done == {"local"} and not failed
        for s, d in zip(src.views, dst.views):
            assert torch.equal(d[dst_ids], s[src_ids])
    finally:
        fetcher.close()
        server.close()


def test_fetch_of_blocks_not_held_fails_that_request_only() -> None:
    src, dst = paged("random"), paged("zeros")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("tcp"))
    fetcher = BlockFetcher(dst, make_data_planes("tcp"))
    try:
        server.holds.hold("r1", [1, 2], lease_s=30)
        fetcher.submit(job("bad", server.address, "r1", [1, 2, 3], [0, 1, 2]))
        done, failed = wait_results(fetcher)
        assert done == {"bad"} and failed == {"bad"}
        fetcher.submit(job("good", server.address, "r1", [1, 2], [0, 1]))
        done, failed = wait_results(fetcher)
        assert done == {"good"} and not failed
    finally:
        fetcher.close()
        server.close()


def test_layout_mismatch_fails_at_handshake_never_copies() -> None:
    src = paged("random")
    dst = paged("zeros", fields={**FIELDS, "head_size": 128})
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("tcp"))
    fetcher = BlockFetcher(dst, make_data_planes("tcp"))
    try:
        server.holds.hold("r1", [1], lease_s=30)
        fetcher.submit(job("x", server.address, "r1", [1], [0]))
        done, failed = wait_results(fetcher)
        assert failed == {"x"}
        assert not any(v.any() for v in dst.views)
        assert server.holds.num_blocks_held() == 1  # still held: the lease or a release frees it
    finally:
        fetcher.close()
        server.close()


def test_release_from_another_process_frees_the_hold() -> None:
    server = BlockServer("127.0.0.1", 0, paged("random"), make_data_planes("tcp"))
    try:
        server.holds.hold("r9", [4, 5], lease_s=30)
        release_remote(server.address, "r9")
        assert server.holds.take_freed() == {"r9"}
    finally:
        server.close()


def test_unknown_transport_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown KV transport"):
        make_data_planes("carrier-pigeon")


def test_direct_runs_must_be_consecutive_blocks() -> None:
    import socket

    from tandem.kvtransfer.wire import recv_msg, send_msg

    src = paged("random")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("tcp"))
    try:
        server.holds.hold("r1", [1, 3, 4], lease_s=30)
        host, port = server.address.split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            send_msg(sock, {"op": "hello", "layout": src.layout.to_json(), "planes": ["tcp"]})
            assert recv_msg(sock)["ok"]
            # [1, 3] claimed as one run of 2 would serve block 2, which is not held for r1
            send_msg(sock, {"op": "fetch", "req": "r1", "blocks": [1, 3], "runs": [2], "tag": 1})
            reply = recv_msg(sock)
        assert not reply["ok"] and "not consecutive" in reply["error"]
    finally:
        server.close()


def test_a_reserved_port_is_kept_from_others_and_serves_the_block_server() -> None:
    import socket

    from tandem.netutil import reserve_port

    reservation = reserve_port()
    port = reservation.getsockname()[1]
    try:
        with socket.socket() as other, pytest.raises(OSError):  # e.g. vLLM's ZMQ ports
            other.bind(("127.0.0.1", port))
        with socket.socket() as zmq_like, pytest.raises(OSError):  # ZMQ's listeners set SO_REUSEADDR
            zmq_like.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            zmq_like.bind(("127.0.0.1", port))
            zmq_like.listen()
        src, dst = paged("random"), paged("zeros")
        server = BlockServer("127.0.0.1", port, src, make_data_planes("tcp"), reserved=True)
    finally:
        reservation.close()
    fetcher = BlockFetcher(dst, make_data_planes("tcp"))
    try:
        assert server.address == f"127.0.0.1:{port}"
        server.holds.hold("r", [1, 2], lease_s=30)
        fetcher.submit(job("x", server.address, "r", [1, 2], [4, 5]))
        assert wait_results(fetcher) == ({"x"}, set())
        assert torch.equal(dst.views[0][[4, 5]], src.views[0][[1, 2]])
    finally:
        fetcher.close()
        server.close()


# the authenticated KV data plane: a block server with a cluster secret sends nothing for a
# handle it did not issue, whose capability was forged or expired, or that was released
SECRET = b"s" * 40
ENGINE = "prefill-0-abcd1234"


def handle(address: str, req: str, blocks: list[int], *, secret: bytes | None = SECRET, lease_s: float = 30,
           engine: str = ENGINE, num_tokens: int = 64) -> TransferHandle:
    deadline = time.time() + lease_s
    cap = sign(secret, engine, req, num_tokens, deadline) if secret else ""
    return TransferHandle(engine_id=engine, address=address, remote_request_id=req, block_ids=blocks,
                          num_tokens=num_tokens, lease_deadline=deadline, capability=cap)


def test_only_a_handle_the_engine_signed_gets_blocks() -> None:
    src, dst = paged("random"), paged("zeros")
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("tcp"), engine_id=ENGINE,
                         security=ControlSecurity(SECRET))
    fetcher = BlockFetcher(dst, make_data_planes("tcp"), security=ControlSecurity(SECRET))
    try:
        server.holds.hold("r1", [3, 4], lease_s=30)
        good = handle(server.address, "r1", [3, 4])
        refused = {
            "unsigned": handle(server.address, "r1", [3, 4], secret=None),
            "another secret": handle(server.address, "r1", [3, 4], secret=b"x" * 40),
            "another request's": TransferHandle(**{**good.__dict__, "remote_request_id": "r2"}),
            "a later deadline": TransferHandle(**{**good.__dict__, "lease_deadline": good.lease_deadline + 60}),
            "expired": handle(server.address, "r1", [3, 4], lease_s=-1),
        }
        for name, h in refused.items():
            fetcher.submit(LoadJob(f"bad-{name}", h, [3, 4], [0, 1]))
            done, failed = wait_results(fetcher)
            assert failed == {f"bad-{name}"}, name
        assert not any(v.any() for v in dst.views)  # not one byte arrived
        assert server.holds.num_blocks_held() == 2
        # a release needs the capability too
        with pytest.raises(CapabilityRefused, match="does not match"):
            release_remote(server.address, "r1", ENGINE, handle=refused["another secret"])
        with pytest.raises(CapabilityRefused, match="no KV capability"):
            release_remote(server.address, "r1", ENGINE)
        assert server.holds.num_blocks_held() == 2
        fetcher.submit(LoadJob("good", good, [3, 4], [0, 1]))
        done, failed = wait_results(fetcher)
        assert done == {"good"} and not failed
        for s, d in zip(src.views, dst.views):
            assert torch.equal(d[[0, 1]], s[[3, 4]])
        # after the fetch freed it (and after a release): nothing, even with a valid capability
        server.holds.hold("r5", [6], lease_s=30)
        h5 = handle(server.address, "r5", [6])
        release_remote(server.address, "r5", ENGINE, handle=h5)
        for again, h, blocks in (("again", good, [3, 4]), ("released", h5, [6])):
            fetcher.submit(LoadJob(again, h, blocks, [8, 9][:len(blocks)]))
            done, failed = wait_results(fetcher, timeout_s=30)
            assert failed == {again}
        assert not any(v[[8, 9]].any() for v in dst.views)
    finally:
        fetcher.close()
        server.close()


def test_secret_files_are_long_and_private(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "secret")
    assert len(load_secret(path)) >= 32 and (os.stat(path).st_mode & 0o777) == 0o600
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="must not be readable by others"):
        load_secret(path)
    short = tmp_path / "short"
    short.write_text("abc")
    os.chmod(short, 0o600)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        load_secret(short)
