"""The KV control connection's security (kvtransfer/secure.py) on a real block server and fetcher:
mutual TLS with the cluster CA, the KV secret's proof in the hello, and peers that never prove
themselves losing their connection slot within seconds."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
import torch
from cryptography import x509

from tandem.kvtransfer import block_server as block_server_mod
from tandem.kvtransfer.block_server import BlockServer
from tandem.kvtransfer.capability import sign
from tandem.kvtransfer.fetcher import BlockFetcher, LoadJob, release_remote
from tandem.kvtransfer.handle import TransferHandle
from tandem.kvtransfer.paged import PagedKV
from tandem.kvtransfer.secure import ControlSecurity, hello_proof
from tandem.kvtransfer.transport import make_data_planes
from tandem.kvtransfer.wire import ChannelClosed, parse_address, recv_msg, send_msg
from tandem.tls import TlsConfig, make_certs

SECRET = b"k" * 40
ENGINE = "prefill-0-feedbeef"
FIELDS = {"block_size": 32, "num_kv_heads": 2, "head_size": 64}


def paged(random: bool) -> PagedKV:
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn((32, 2, 32, 128), generator=g) if random else torch.zeros((32, 2, 32, 128)) for _ in range(2)]
    return PagedKV(ts, 32, FIELDS)


def handle(address: str, req: str, blocks: list[int]) -> TransferHandle:
    deadline = time.time() + 30
    return TransferHandle(engine_id=ENGINE, address=address, remote_request_id=req, block_ids=blocks,
                          num_tokens=64, lease_deadline=deadline, capability=sign(SECRET, ENGINE, req, 64, deadline))


def fetch(fetcher: BlockFetcher, name: str, h: TransferHandle, local: list[int]) -> bool:
    """True when the fetch succeeded."""
    fetcher.submit(LoadJob(name, h, h.block_ids, local))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, failed = fetcher.take_results()
        if done:
            assert done == {name}
            return not failed
        time.sleep(0.01)
    raise AssertionError("the fetch did not finish")


def tls_of(certs: dict[str, Path], who: str) -> TlsConfig:
    return TlsConfig(str(certs[who]), str(certs[f"{who}_key"]), str(certs["ca"]))


@pytest.fixture()
def certs(tmp_path: Path) -> dict[str, Path]:
    return make_certs(tmp_path / "certs", ["127.0.0.1"])


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_mutual_tls_control_connection_serves_cluster_members_only(certs: dict[str, Path], tmp_path: Path,
                                                                   transport: str) -> None:
    src, dst = paged(True), paged(False)
    member = ControlSecurity(SECRET, tls_of(certs, "server"))
    server = BlockServer("127.0.0.1", 0, src, make_data_planes(transport), engine_id=ENGINE, security=member)
    other_ca = make_certs(tmp_path / "other", ["127.0.0.1"])
    strangers = {
        "no TLS": ControlSecurity(SECRET),
        # a client's certificate (the client CA's) is no daemon's
        "a client certificate": ControlSecurity(SECRET, TlsConfig(str(certs["client"]), str(certs["client_key"]),
                                                                  str(certs["ca"]))),
        "another cluster CA": ControlSecurity(SECRET, tls_of(other_ca, "server")),
    }
    fetchers = {name: BlockFetcher(paged(False), make_data_planes(transport), timeout_s=10, security=sec)
                for name, sec in strangers.items()}
    fetcher = BlockFetcher(dst, make_data_planes(transport), security=member)
    try:
        server.holds.hold("r1", [3, 7, 8], lease_s=30)
        h = handle(server.address, "r1", [3, 7, 8])
        for name, f in fetchers.items():
            assert not fetch(f, f"stranger-{name}", h, [0, 1, 2]), name
            assert not any(v.any() for v in f.kv.views), name
        assert server.holds.num_blocks_held() == 3
        # a member fetches over TLS: the same bytes (on the TCP plane they crossed inside TLS)
        assert fetch(fetcher, "member", h, [10, 11, 12])
        for s, d in zip(src.views, dst.views):
            assert torch.equal(d[[10, 11, 12]], s[[3, 7, 8]])
        # a release over TLS, by a member
        server.holds.hold("r2", [5], lease_s=30)
        release_remote(server.address, "r2", ENGINE, handle=handle(server.address, "r2", [5]), security=member)
        assert server.holds.num_blocks_held() == 0
        # a plain-text peer gets no reply at all: the server hangs up on its first bytes
        with socket.create_connection(parse_address(server.address), timeout=5) as raw:
            send_msg(raw, {"op": "release", "req": "r1", "engine": ENGINE})
            with pytest.raises((ChannelClosed, ConnectionResetError)):
                recv_msg(raw)
    finally:
        for f in (fetcher, *fetchers.values()):
            f.close()
        server.close()


def test_a_rotated_kv_certificate_is_served_to_new_connections(certs: dict[str, Path]) -> None:
    member = ControlSecurity(None, tls_of(certs, "server"))
    server = BlockServer("127.0.0.1", 0, paged(True), make_data_planes("tcp"), security=member)

    def served_serial() -> int:
        with member.dial(server.address, 5) as s:
            assert isinstance(s, ssl.SSLSocket)
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number

    try:
        before = served_serial()
        make_certs(Path(certs["ca"]).parent, ["127.0.0.1"])  # the same CAs sign new daemon certificates
        deadline = time.monotonic() + 10
        while served_serial() == before:
            assert time.monotonic() < deadline, "the block server kept its old certificate"
            time.sleep(0.2)
    finally:
        server.close()


def test_without_tls_a_hello_must_prove_the_kv_secret() -> None:
    src = paged(True)
    server = BlockServer("127.0.0.1", 0, src, make_data_planes("tcp"), engine_id=ENGINE,
                         security=ControlSecurity(SECRET))
    try:
        server.holds.hold("r1", [1, 2], lease_s=30)
        h = handle(server.address, "r1", [1, 2])
        for name, sec in (("no secret", ControlSecurity()), ("another secret", ControlSecurity(b"z" * 40))):
            f = BlockFetcher(paged(False), make_data_planes("tcp"), timeout_s=10, security=sec)
            try:
                assert not fetch(f, name, h, [0, 1]), name
            finally:
                f.close()
        layout = src.layout.to_json()
        hello = {"op": "hello", "layout": layout, "planes": ["tcp"]}
        stale = {**hello, "ts": time.time() - 3600}
        fresh = ControlSecurity(SECRET).sign_hello(hello)
        for name, sent, why in (
                ("none", hello, "requires the cluster's KV secret"),
                ("stale", {**stale, "auth": hello_proof(SECRET, stale)}, "clock"),
                ("forged", {**hello, "ts": time.time(), "auth": "0" * 64}, "does not prove"),
                # a signed hello replayed with another data plane: the proof covers every field
                ("altered", {**fresh, "planes": ["ucx"], "ucx_address": "00"}, "does not prove")):
            with socket.create_connection(parse_address(server.address), timeout=5) as raw:
                send_msg(raw, sent)
                reply = recv_msg(raw)
                assert not reply["ok"] and reply["denied"] and why in reply["error"], name
                with pytest.raises((ChannelClosed, ConnectionResetError)):  # and hung up on
                    recv_msg(raw)
        assert server.holds.num_blocks_held() == 2
        f = BlockFetcher(paged(False), make_data_planes("tcp"), security=ControlSecurity(SECRET))
        try:
            assert fetch(f, "member", h, [0, 1])
        finally:
            f.close()
    finally:
        server.close()


@pytest.mark.parametrize("with_tls", [False, True])
def test_silent_peers_lose_their_connection_slots_quickly(monkeypatch: pytest.MonkeyPatch,
                                                          certs: dict[str, Path], with_tls: bool) -> None:
    monkeypatch.setattr(block_server_mod, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(block_server_mod, "PREAUTH_TIMEOUT_S", 0.5)
    import tandem.kvtransfer.secure as secure_mod

    monkeypatch.setattr(secure_mod, "PREAUTH_TIMEOUT_S", 0.5)
    member = ControlSecurity(SECRET, tls_of(certs, "server") if with_tls else None)
    server = BlockServer("127.0.0.1", 0, paged(True), make_data_planes("tcp"), engine_id=ENGINE, security=member)
    silent = [socket.create_connection(parse_address(server.address), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.1)
        # every slot taken: one more connection is turned away
        with socket.create_connection(parse_address(server.address), timeout=5) as third:
            third.settimeout(5)
            if not with_tls:
                assert "at most 2 connections" in recv_msg(third)["error"]
            else:
                assert third.recv(1) == b""
        # ... until the silent ones are hung up on, well before the idle timeout
        for s in silent:
            s.settimeout(5)
            assert s.recv(1) == b""
        server.holds.hold("r1", [4], lease_s=30)
        f = BlockFetcher(paged(False), make_data_planes("tcp"), security=member)
        try:
            assert fetch(f, "member", handle(server.address, "r1", [4]), [0])
        finally:
            f.close()
    finally:
        for s in silent:
            s.close()
        server.close()


def test_an_unproved_peer_gets_one_small_message_and_the_window_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    import struct

    monkeypatch.setattr(block_server_mod, "PREAUTH_TIMEOUT_S", 0.6)
    server = BlockServer("127.0.0.1", 0, paged(True), make_data_planes("tcp"), engine_id=ENGINE,
                         security=ControlSecurity(SECRET))
    address = parse_address(server.address)
    try:
        # any message but a proof: answered, then hung up on (it cannot keep the slot with chatter)
        with socket.create_connection(address, timeout=5) as raw:
            send_msg(raw, {"op": "nope"})
            assert not recv_msg(raw)["ok"]
            assert raw.recv(1) == b""
        # a message trickled in a byte at a time: hung up on when the window ends, not per byte
        with socket.create_connection(address, timeout=5) as raw:
            raw.sendall(struct.pack("!I", 100))
            t0 = time.monotonic()
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(50):
                    raw.sendall(b" ")
                    time.sleep(0.1)
            assert time.monotonic() - t0 < 2.0
        # a large message announced before proving anything: refused before it is read
        with socket.create_connection(address, timeout=5) as raw:
            raw.sendall(struct.pack("!I", 8 << 20))
            assert raw.recv(1) == b""
    finally:
        server.close()
