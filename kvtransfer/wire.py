"""Framing for the KV control channel: length-prefixed JSON messages over TCP.

Bulk block bytes never go through JSON: over the TCP data plane they follow a
header on the same socket; over UCX they go as one tagged message.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

_LEN = struct.Struct("!I")
MAX_HEADER_BYTES = 16 << 20


class ChannelClosed(ConnectionError):
    """The peer closed the control channel."""


def send_msg(sock: socket.socket, msg: dict[str, Any]) -> None:
    body = json.dumps(msg, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(body)) + body)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelClosed("peer closed the KV control channel")
        got += k


def recv_msg(sock: socket.socket) -> dict[str, Any]:
    head = bytearray(_LEN.size)
    recv_exact_into(sock, memoryview(head))
    (n,) = _LEN.unpack(head)
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"KV control message of {n} bytes is larger than allowed")
    body = bytearray(n)
    recv_exact_into(sock, memoryview(body))
    return json.loads(body)


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad KV transfer address {address!r}; expected host:port")
    return host, int(port)
