"""The local supervisor against fake daemons: restarts on exit and on failed probes, with backoff."""

from __future__ import annotations

import threading
import time

from tandem.local.supervisor import Supervisor


class FakeDaemon:
    """Knobs: ``running`` (the process lives), ``answering`` (its health probe succeeds),
    ``start_fails`` (the next starts raise)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.running = True
        self.answering = True
        self.start_fails = 0
        self.starts = 0
        self.kills = 0
        self.changed = threading.Event()
        self.ready = True

    def alive(self) -> bool:
        return self.running

    def probe(self, timeout_s: float) -> str:
        if not self.running:
            return "refused"
        return "ok" if self.answering else self.silence

    silence = "silent"

    def is_ready(self) -> bool:
        return self.running and self.ready

    def start(self) -> None:
        self.starts += 1
        self.changed.set()
        if self.start_fails:
            self.start_fails -= 1
            raise RuntimeError("port in use")
        self.running, self.answering = True, True

    def kill(self) -> None:
        self.kills += 1
        self.running = False


def wait_for(pred, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_daemon_that_exits_is_restarted_and_the_others_are_left_alone() -> None:
    a, b = FakeDaemon("prefill-0"), FakeDaemon("decode-0")
    sup = Supervisor(lambda: [a, b], probe_every_s=0.02, max_backoff_s=0.2).start()
    try:
        a.running = False
        wait_for(lambda: a.starts == 1 and a.running)
        wait_for(lambda: any(e.daemon == "prefill-0" and e.what == "ready" for e in sup.events))
        assert b.starts == 0 and b.kills == 0
        assert [e.what for e in sup.events if e.daemon == "prefill-0"] == ["exited", "restarting", "ready"]
        assert sup.restarts("prefill-0") == 1
    finally:
        sup.stop()


def test_a_frozen_daemon_is_killed_after_failed_probes_and_restarted() -> None:
    a = FakeDaemon("decode-1")
    sup = Supervisor(lambda: [a], probe_every_s=0.02, failures_to_restart=3, max_backoff_s=0.2).start()
    try:
        a.answering = False
        wait_for(lambda: a.kills == 1)
        wait_for(lambda: a.starts == 1 and a.running)
        unresponsive = [e for e in sup.events if e.what == "unresponsive"]
        assert len(unresponsive) == 1 and "3 health probes unanswered" in unresponsive[0].detail
    finally:
        sup.stop()


def test_failed_starts_back_off() -> None:
    a = FakeDaemon("etcd")
    a.start_fails = 3
    sup = Supervisor(lambda: [a], probe_every_s=0.01, min_backoff_s=0.2, max_backoff_s=10.0).start()
    try:
        a.running = False
        wait_for(lambda: a.running, timeout_s=30)
        starts = [e.at for e in sup.events if e.what == "restarting"]
        assert len(starts) == 4
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        # 0.4 s, then 0.8 s, then 1.6 s between tries (give or take a probe period)
        assert gaps[0] < gaps[1] < gaps[2] and gaps[2] > 1.4
    finally:
        sup.stop()


def test_a_daemon_that_refuses_probes_while_it_shuts_down_gets_time_to_exit() -> None:
    a = FakeDaemon("prefill-1")
    sup = Supervisor(lambda: [a], probe_every_s=0.02, failures_to_restart=3, refusals_to_restart=30,
                     min_backoff_s=0.05).start()
    try:
        a.answering, a.silence = False, "refused"  # a drained node: server stopped, engine still exiting
        time.sleep(0.3)  # ~15 probes: fewer than refusals_to_restart
        assert a.kills == 0
        a.running = False  # it exits by itself
        wait_for(lambda: a.starts == 1)
        assert [e.what for e in sup.events][:2] == ["exited", "restarting"]
    finally:
        sup.stop()


def test_a_daemon_that_restarts_itself_in_place_is_waited_for_not_killed() -> None:
    a = FakeDaemon("prefill-1")
    sup = Supervisor(lambda: [a], probe_every_s=0.02, failures_to_restart=3, refusals_to_restart=5,
                     start_timeout_s=5.0).start()
    try:
        # A role switch: the process lives on, says it is not ready, and answers no probe meanwhile
        # (many more probe periods than refusals_to_restart).
        a.ready, a.answering, a.silence = False, False, "refused"
        wait_for(lambda: any(e.what == "restarting-in-place" for e in sup.events))
        time.sleep(0.5)
        assert a.kills == 0 and a.starts == 0
        a.ready, a.answering = True, True
        wait_for(lambda: any(e.what == "ready" for e in sup.events))
        assert [e.what for e in sup.events] == ["restarting-in-place", "ready"]
        assert sup.settled()
    finally:
        sup.stop()


def test_a_daemon_that_never_comes_back_from_restarting_in_place_is_killed_and_started() -> None:
    a = FakeDaemon("decode-1")
    sup = Supervisor(lambda: [a], probe_every_s=0.02, start_timeout_s=0.3, min_backoff_s=0.05).start()
    try:
        a.ready = False
        wait_for(lambda: a.kills == 1)
        a.ready = True
        wait_for(lambda: a.starts == 1 and a.running)
        whats = [e.what for e in sup.events]
        assert whats[:3] == ["restarting-in-place", "start-failed", "restarting"], whats
    finally:
        sup.stop()


def test_a_coordinator_started_on_port_0_comes_back_on_the_ports_it_bound(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A stand-in for `tandem coordinator`: binds --grpc-port and --http-port (0: any free one)
    # and says which on its READY line, as the coordinator does.
    import sys

    from tandem.local.cluster import READY_LINE, Daemon

    script = (
        "import socket, sys, time\n"
        "ports = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
        "g, h = socket.socket(), socket.socket()\n"
        "g.bind(('127.0.0.1', int(ports['--grpc-port']))); h.bind(('127.0.0.1', int(ports['--http-port'])))\n"
        "g.listen(); h.listen()\n"
        f"print('{READY_LINE} role=coordinator grpc=127.0.0.1:%d http=http://127.0.0.1:%d'"
        " % (g.getsockname()[1], h.getsockname()[1]), flush=True)\n"
        "time.sleep(60)\n")
    d = Daemon("coordinator", "coordinator", [sys.executable, "-c", script, "--grpc-port", "0", "--http-port", "0"],
               tmp_path / "coordinator.log")
    try:
        d.start()
        d.wait_ready(time.monotonic() + 20)
        first = dict(d.info)
        assert first["grpc"] != "127.0.0.1:0" and not first["http"].endswith(":0")
        d.pin_ports()
        d.kill()
        d.start()
        d.wait_ready(time.monotonic() + 20)
        assert (d.info["grpc"], d.info["http"]) == (first["grpc"], first["http"])
    finally:
        d.kill()
