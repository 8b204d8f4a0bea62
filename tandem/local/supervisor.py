"""Keeps a local cluster's daemons running, the way Kubernetes keeps pods running.

Each daemon (etcd included) is probed every ``probe_every_s``: its process
must be alive and its health must answer within ``probe_timeout_s`` (gRPC
health for Tandem's daemons, /health for etcd). A daemon that exited, or that
did not answer ``failures_to_restart`` probes in a row (a frozen or wedged
process: the port takes the connection, nothing answers), is killed and
started again after a backoff that doubles with each restart
that did not last (``min_backoff_s``, 1 s, up to ``max_backoff_s``, 30 s).
A daemon that answers but is not serving, or refuses the connection, is
shutting down or busy starting its server: that is given ``refusals_to_restart``
probes (30) before it counts as stuck, so a drained node can finish exiting. The rest of the cluster keeps
serving meanwhile. A daemon that says it restarts itself (no longer ready while
its process lives on: a node switching role) is waited for like a start. Every action is an ``Event``: the chaos harness reads
them, `tandem up` prints them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)

# A restart that then runs this long counts as healthy: the next failure starts the backoff afresh.
STABLE_AFTER_S = 60.0


OK, REFUSED, SILENT = "ok", "refused", "silent"  # what one probe found


class Supervised(Protocol):
    name: str

    def alive(self) -> bool: ...

    def probe(self, timeout_s: float) -> str:
        """OK (serving), REFUSED (answered, but not serving or refused the connection)
        or SILENT (no answer within ``timeout_s``)."""
        ...

    def start(self) -> object: ...

    def kill(self) -> None: ...

    def is_ready(self) -> bool: ...


@dataclass
class Event:
    at: float  # time.time()
    daemon: str
    what: str  # "exited" | "unresponsive" | "restarting" | "restarting-in-place" | "ready" | "start-failed"
    detail: str = ""


@dataclass
class _State:
    phase: str = "running"  # running | down | starting
    failures: int = 0  # silent probes in a row
    refusals: int = 0  # refused probes in a row
    backoff_s: float = 1.0
    next_start: float = 0.0
    started_at: float = 0.0
    restarts: int = 0


class Supervisor:
    def __init__(self, daemons: Callable[[], list[Supervised]], *, probe_every_s: float = 1.0,
                 probe_timeout_s: float = 2.0, failures_to_restart: int = 3, refusals_to_restart: int = 30,
                 min_backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0,
                 start_timeout_s: float = 300.0, on_event: Callable[[Event], None] | None = None) -> None:
        self._daemons = daemons
        self.probe_every_s = probe_every_s
        self.probe_timeout_s = probe_timeout_s
        self.failures_to_restart = failures_to_restart
        self.refusals_to_restart = refusals_to_restart
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.start_timeout_s = start_timeout_s
        self._on_event = on_event
        self.events: list[Event] = []
        self._states: dict[str, _State] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tandem-supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def settled(self) -> bool:
        """Every daemon running and ready, none waiting for a restart."""
        daemons = self._daemons()
        with self._lock:
            phases = [self._states[d.name].phase if d.name in self._states else "running" for d in daemons]
        return all(p == "running" for p in phases) and all(d.alive() and d.is_ready() for d in daemons)

    def restarts(self, name: str) -> int:
        with self._lock:
            st = self._states.get(name)
            return st.restarts if st else 0

    def _emit(self, daemon: str, what: str, detail: str = "") -> None:
        ev = Event(time.time(), daemon, what, detail)
        with self._lock:
            self.events.append(ev)
        logger.warning("supervisor: %s %s %s", daemon, what, detail)
        if self._on_event is not None:
            self._on_event(ev)

    def _run(self) -> None:
        while not self._stop.wait(self.probe_every_s):
            for d in self._daemons():
                if self._stop.is_set():
                    return
                try:
                    self._tend(d)
                except Exception:  # one daemon's trouble must not stop the supervision of the others
                    logger.exception("supervisor: tending %s failed", d.name)

    def _tend(self, d: Supervised) -> None:
        with self._lock:
            st = self._states.setdefault(d.name, _State(started_at=time.monotonic(), backoff_s=self.min_backoff_s))
        now = time.monotonic()
        if st.phase == "running":
            if not d.alive():
                self._down(d, st, "exited", "")
                return
            if not d.is_ready():  # it restarts itself in place (a role switch): wait as for a start
                st.phase, st.started_at, st.failures, st.refusals = "starting", now, 0, 0
                self._emit(d.name, "restarting-in-place", "the process starts again by itself")
                return
            found = d.probe(self.probe_timeout_s)
            if found == OK:
                st.failures = st.refusals = 0
                if now - st.started_at > STABLE_AFTER_S:
                    st.backoff_s = self.min_backoff_s
                return
            if found == SILENT:
                st.failures, st.refusals = st.failures + 1, 0
            else:
                st.failures, st.refusals = 0, st.refusals + 1
            if st.failures >= self.failures_to_restart or st.refusals >= self.refusals_to_restart:
                d.kill()
                self._down(d, st, "unresponsive", f"{max(st.failures, st.refusals)} health probes "
                           f"{'unanswered' if st.failures else 'refused'} in a row")
        elif st.phase == "down":
            if now >= st.next_start:
                self._emit(d.name, "restarting", f"restart {st.restarts + 1}")
                st.phase, st.started_at = "starting", now
                st.restarts += 1
                try:
                    d.start()
                except Exception as exc:
                    self._down(d, st, "start-failed", str(exc))
        elif st.phase == "starting":
            if d.is_ready():
                st.phase, st.failures, st.refusals = "running", 0, 0
                self._emit(d.name, "ready", f"after {now - st.started_at:.1f} s")
            elif not d.alive():
                self._down(d, st, "start-failed", "exited while starting")
            elif now - st.started_at > self.start_timeout_s:
                d.kill()
                self._down(d, st, "start-failed", f"not ready in {self.start_timeout_s:.0f} s")

    def _down(self, d: Supervised, st: _State, what: str, detail: str) -> None:
        self._emit(d.name, what, detail)
        st.phase, st.failures, st.refusals = "down", 0, 0
        st.next_start = time.monotonic() + st.backoff_s
        st.backoff_s = min(st.backoff_s * 2, self.max_backoff_s)
