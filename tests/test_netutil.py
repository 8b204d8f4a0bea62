"""tandem.netutil: ports for servers started later in other processes."""

from __future__ import annotations

import socket

from tandem import netutil


def test_free_ports_come_from_below_the_kernels_ephemeral_range_and_never_twice() -> None:
    lo, _ = netutil.ephemeral_range()
    ports = [netutil.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    if lo > netutil.LOW_PORT:
        assert all(netutil.LOW_PORT <= p < lo for p in ports)  # no outgoing connection is given one
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # and it is free


def _held_with_a_free_neighbour() -> tuple[socket.socket, int]:
    """A bound socket whose port + 1 was free a moment ago."""
    while True:
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        busy = held.getsockname()[1]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", busy + 1))
                return held, busy
            except OSError:
                held.close()


def test_a_port_in_use_is_passed_over_and_no_room_below_falls_back_to_the_kernels_pick(monkeypatch) -> None:
    held, busy = _held_with_a_free_neighbour()
    with held:
        monkeypatch.setattr(netutil, "LOW_PORT", busy)
        monkeypatch.setattr(netutil, "ephemeral_range", lambda: (busy + 2, 60999))
        monkeypatch.setattr(netutil, "_handed", set())
        assert netutil.free_port() == busy + 1  # the only other candidate
        # nothing left below the range (busy taken, busy + 1 handed out): the kernel picks
        assert netutil.free_port() not in (busy, busy + 1)
