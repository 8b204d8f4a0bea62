"""Small network helpers."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def reserve_port(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A port (``port``, or a free one) kept for a server that binds it later, in another
    process (with SO_REUSEPORT).

    The socket is bound with SO_REUSEPORT and never listens: processes that bind
    without SO_REUSEPORT (vLLM's own ZMQ ports, for one) cannot take the port while
    it is open, and a listener bound to it with SO_REUSEPORT gets every connection.
    Close it once that listener is up. A given port that another process holds is an
    OSError naming it.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Not SO_REUSEADDR: with it, a listener that sets SO_REUSEADDR (ZMQ's do) could take the port.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as exc:
        s.close()
        raise OSError(exc.errno, f"cannot reserve port {port} on {host}: {exc.strerror}") from exc
    return s


def split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}; expected host:port")
    return host, int(port)
