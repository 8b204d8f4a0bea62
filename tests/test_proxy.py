"""The chaos suite's cut-able TCP proxy: it carries bytes, a cut closes every connection and
refuses new ones, and the path heals when the cut ends."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tandem.local.proxy import TcpProxy


def echo_server() -> socket.socket:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv


def dial(address: str) -> socket.socket:
    host, port = address.split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def test_the_proxy_carries_bytes_until_cut_and_again_after() -> None:
    srv = echo_server()
    with TcpProxy(f"127.0.0.1:{srv.getsockname()[1]}") as proxy:
        a = dial(proxy.address)
        payload = bytes(range(256)) * 4096  # 1 MiB, more than one pipe read
        a.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            got += a.recv(1 << 20)
        assert bytes(got) == payload

        proxy.cut(0.5)
        assert proxy.is_cut
        with pytest.raises(OSError):  # the open connection is gone ...
            a.sendall(b"x")
            if not a.recv(1):
                raise ConnectionResetError("closed")
        b = dial(proxy.address)  # ... and new ones are hung up on
        assert b.recv(1) == b""
        time.sleep(0.6)
        c = dial(proxy.address)  # healed
        c.sendall(b"again")
        assert c.recv(5) == b"again"
        assert proxy.cuts == 1 and proxy.refused >= 1
        for s in (a, b, c):
            s.close()
    srv.close()
