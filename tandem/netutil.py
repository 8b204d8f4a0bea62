"""Small network helpers."""

from __future__ import annotations

import random
import socket
from pathlib import Path


LOW_PORT = 20000  # free_port picks from here up to the kernel's ephemeral range
_handed: set[int] = set()  # ports free_port gave out in this process (never twice)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (outgoing connections, bind to 0)."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for a server that binds it later, in another process.

    Taken below the kernel's ephemeral range (from LOW_PORT), so that no outgoing connection can
    be given it in the meantime: a vLLM server binds its ports half a minute after they are chosen,
    and a port bound to 0 once came back as another process's connection in that time (NIXL's
    side channel: "Address already in use"). Not one this process gave out already. Where the
    ephemeral range leaves no room below it, the kernel's pick (bind to 0).
    """
    lo, _ = ephemeral_range()
    below = range(LOW_PORT, lo)
    for port in random.sample(below, min(200, len(below))):
        if port in _handed:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed.add(port)
        return port
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
