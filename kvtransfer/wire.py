"""Framing for the KV control channel: length-prefixed JSON messages over TCP.

Bulk block bytes never go through JSON: over the TCP data plane they follow a
header on the same socket; over UCX they go as one tagged message.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

_LEN = struct.Struct("!I")
MAX_HEADER_BYTES = 16 << 20


class ChannelClosed(ConnectionError):
    """The peer closed the control channel."""


def send_msg(sock: socket.socket, msg: dict[str, Any]) -> None:
    body = json.dumps(msg, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(body)) + body)


def recv_exact_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """``deadline`` (monotonic): socket.timeout once it passes, however the bytes trickle in."""
    got = 0
    n = len(view)
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("the KV control message did not arrive in time")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelClosed("peer closed the KV control channel")
        got += k


def recv_msg(sock: socket.socket, deadline: float | None = None, max_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """One message, whole by ``deadline`` (monotonic; None: the socket's own timeout per read);
    ValueError past ``max_bytes`` (before a byte of the body is read or allocated)."""
    head = bytearray(_LEN.size)
    recv_exact_into(sock, memoryview(head), deadline)
    (n,) = _LEN.unpack(head)
    if n > max_bytes:
        raise ValueError(f"KV control message of {n} bytes is larger than allowed ({max_bytes})")
    body = bytearray(n)
    recv_exact_into(sock, memoryview(body), deadline)
    return json.loads(body)


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad KV transfer address {address!r}; expected host:port")
    return host, int(port)
