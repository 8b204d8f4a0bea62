"""The order in which a prefill node's requests run: where the prefill queue lives, and its policy.

``--prefill-order``:

  slack   (default) the queue lives here, at the coordinator: each prefill node
          gets ``--prefill-depth`` requests at a time (default 1, so the engine
          never batches a short prompt with a 2K-token one and makes it wait for
          the whole step), and the next one is picked by deadline slack:
          earliest deadline first among the requests that can still meet their
          TTFT objective, the ones that cannot (Moore-Hodgson: the longest are
          dropped until the rest fit) after them. That order serves the most
          requests in time that one prefill node can.
  engine  the queue lives in vLLM: every request goes to the node at once with
          its deadline as its priority (the node's engine runs
          ``--scheduling-policy priority``); vLLM runs the earliest deadlines
          first but batches what waits into one step.
  fifo    every request goes to the node at once; the engine runs them in
          arrival order (Tandem before this module).

A request's deadline is its arrival plus its TTFT objective (its own or the
cluster's default); one without any waits at most ``NO_SLO_S`` before it counts
as late. A migrated leg (a client already mid-stream) goes first. A request the
schedule finds late anyway is not dropped: it runs when the on-time ones are
done, or first once it has been late longer than its objective (no starvation).
Admission asks ``predict`` where a new request would go and whether it would
push a queued one past its deadline (then it is refused, not them).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from tandem.errors import DeadlineExceeded

from .nodeclient import NodeClient
from .router import Router

logger = logging.getLogger(__name__)

ORDERS = ("slack", "engine", "fifo")
NO_SLO_S = 10.0  # a request without a TTFT objective is late after this long
ROUTABLE_POLL_S = 0.5  # how often a waiting request checks its node is still routable

WAITING = Gauge("tandem_prefill_queue_depth", "Requests held at the coordinator for a prefill node",
                multiprocess_mode="livesum")
WAIT = Histogram("tandem_prefill_queue_seconds", "Time a request waited at the coordinator for its prefill node",
                 buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
LATE = Counter("tandem_prefill_late_dispatches",
               "Prefills sent after their deadline had been given up (the schedule could not meet it)")


class NodeGone(Exception):
    """The node left routing while a request waited for it: pick another."""


@dataclass(eq=False)
class Entry:
    rid: str
    tokens: int
    arrival: float  # perf_counter
    deadline: float  # perf_counter
    run_s: float  # its prefill there, as the node's model predicts (0: no model)
    urgent: bool = False  # a migrated leg: first
    has_slo: bool = True  # False: its deadline is NO_SLO_S after arrival, no objective of its own
    seq: int = 0
    queued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    go: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def budget(self) -> float:
        return self.deadline - self.arrival


def schedule(entries: list[Entry], start: float) -> tuple[list[Entry], list[Entry]]:
    """(on time, late): the order to run ``entries`` from time ``start`` on one node.

    Urgent entries first, then earliest deadline first among a largest set that all meet
    their deadlines (Moore-Hodgson: walking in deadline order, whenever one would finish
    late the longest taken so far is dropped), then the dropped ones in arrival order."""
    urgent = sorted((e for e in entries if e.urgent), key=lambda e: e.seq)
    t = start + sum(e.run_s for e in urgent)
    taken: list[Entry] = []
    late: list[Entry] = []
    for e in sorted((e for e in entries if not e.urgent), key=lambda e: (e.deadline, e.seq)):
        taken.append(e)
        t += e.run_s
        if t > e.deadline:
            longest = max(taken, key=lambda x: (x.run_s, x.seq))
            taken.remove(longest)
            late.append(longest)
            t -= longest.run_s
    late.sort(key=lambda e: e.seq)
    return urgent + taken, late


@dataclass
class Prediction:
    wait_s: float  # from now until its prefill starts
    pushes: int  # how many more queued requests would miss their TTFT objective with it than without


class _NodeQueue:
    def __init__(self) -> None:
        self.waiting: list[Entry] = []
        self.running: list[Entry] = []


def _free_at(running: list[Entry], now: float) -> float:
    """When the node is free of ``running`` (what it runs now for this coordinator)."""
    return now + sum(max(0.0, e.run_s - (now - e.started)) for e in running)


def _scheduled(q: _NodeQueue, now: float) -> tuple[list[Entry], float]:
    """(the waiting requests the schedule orders, when it starts): those starved go first (``_next``),
    once the node is free of what it runs, then the schedule over the rest."""
    starved = [e for e in q.waiting if _starved(e, now)]
    rest = [e for e in q.waiting if not _starved(e, now)]
    return rest, _free_at(q.running, now) + sum(e.run_s for e in starved)


class PrefillOrder:
    def __init__(self, router: Router, order: str = "slack", depth: int = 1) -> None:
        if order not in ORDERS:
            raise ValueError(f"--prefill-order must be one of {', '.join(ORDERS)}, got {order!r}")
        if depth < 1:
            raise ValueError(f"--prefill-depth must be at least 1, got {depth}")
        self.router = router
        self.order = order
        self.depth = depth
        self._queues: dict[tuple[str, str], _NodeQueue] = {}  # (node id, engine id): a restart is a new queue
        self._seq = itertools.count()
        self._warned: set[str] = set()

    @property
    def holds(self) -> bool:
        """Requests wait here (``slack``), not in the node's engine."""
        return self.order == "slack"

    def entry(self, node: NodeClient, rid: str, tokens: int, arrival: float, ttft_s: float | None,
              urgent: bool = False, cached: int = 0, beside_s: float = 0.0) -> Entry:
        """``tokens`` to compute there, after ``cached`` the node holds; ``beside_s``: what the
        streams the node serves whole add to its steps (``estimates.beside_whole_s``)."""
        model = node.model
        run_s = model.prefill_s(tokens, cached) + beside_s if model.prefill.samples else 0.0
        deadline = arrival + (ttft_s if ttft_s is not None else NO_SLO_S)
        return Entry(rid, tokens, arrival, deadline, run_s, urgent, ttft_s is not None, next(self._seq))

    def engine_priority(self, node: NodeClient, e: Entry) -> int:
        """For ``engine``: vLLM runs the lowest first; milliseconds of wall-clock deadline (the
        same scale from every coordinator), 0 for a migrated leg."""
        if self.order != "engine" or e.urgent:
            return 0
        if node.record.scheduling != "priority" and node.node_id not in self._warned:
            self._warned.add(node.node_id)
            logger.warning("--prefill-order engine: prefill node %s runs --scheduling-policy %s, so it "
                           "ignores the deadlines sent with its requests (arrival order there)", node.node_id,
                           node.record.scheduling)
        return max(1, int((time.time() + (e.deadline - time.perf_counter())) * 1000))

    def predict(self, node: NodeClient, tokens: int, arrival: float, ttft_s: float | None,
                cached: int = 0, beside_s: float = 0.0) -> Prediction | None:
        """Where a new request would wait on ``node``; None where this coordinator keeps no
        queue for it (``fifo``) or nothing is queued. With ``engine`` nobody is counted as
        pushed: vLLM orders what it holds, the coordinator only sends."""
        q = self._queues.get(_key(node))
        if self.order == "fifo" or q is None or not (q.waiting or q.running):
            return None
        now = time.perf_counter()
        new = self.entry(node, "", tokens, arrival, ttft_s, cached=cached, beside_s=beside_s)
        if self.order == "engine":
            # vLLM runs the earliest deadlines first; which one it runs now is not known here:
            # the earliest sent counts as running.
            ahead = [e for e in q.running[1:] if e.urgent or e.deadline <= new.deadline]
            start = _free_at(q.running[:1], now)
            return Prediction(start - now + sum(e.run_s for e in ahead), 0)
        rest, start = _scheduled(q, now)
        _, before_late = schedule(rest, start)
        on_time, late = schedule([*rest, new], start)
        # Moore-Hodgson may swap whom it gives up: what counts is how many more miss with it
        # (only those with an objective of their own).
        pushes = max(0, sum(e.has_slo for e in late if e is not new) - sum(e.has_slo for e in before_late))
        order = on_time + late
        ahead = order[:order.index(new)]
        return Prediction(start - now + sum(e.run_s for e in ahead), pushes)

    def pushed_by(self, node: NodeClient, run_s: float) -> int:
        """How many more of the requests waiting here for ``node`` would miss their TTFT objective
        if the node first ran ``run_s`` of work that skips this queue (a prompt it serves whole,
        --colocate, goes to its engine at once). 0 where nothing waits here (``fifo``, ``engine``)."""
        q = self._queues.get(_key(node))
        if not self.holds or q is None or not q.waiting or run_s <= 0:
            return 0
        rest, start = _scheduled(q, now=time.perf_counter())
        late = [sum(e.has_slo for e in schedule(rest, t)[1]) for t in (start, start + run_s)]
        return max(0, late[1] - late[0])

    @asynccontextmanager
    async def turn(self, node: NodeClient, e: Entry, give_up_at: float | None = None) -> AsyncIterator[None]:
        """Hold ``e`` until it may go to ``node``, and for as long as its call runs there.
        NodeGone when the node leaves routing before its turn (or as it comes: a node that just
        failed a call wakes the next one before the caller has marked it down);
        DeadlineExceeded at ``give_up_at`` (perf_counter; the client's deadline)."""
        key = _key(node)
        q = self._queues.setdefault(key, _NodeQueue())
        if not self.holds:
            e.started = time.perf_counter()
            q.running.append(e)
            try:
                yield
            finally:
                q.running.remove(e)
                self._forget(key, q)
            return
        q.waiting.append(e)
        WAITING.inc()
        try:
            self._pump(q)
            while True:
                if not self.router.routable(node):
                    raise NodeGone(f"prefill node {node.node_id} left routing while request {e.rid} waited")
                if e.go.is_set():
                    break
                left = None if give_up_at is None else give_up_at - time.perf_counter()
                if left is not None and left <= 0:
                    raise DeadlineExceeded(f"the client's deadline passed while request {e.rid} waited "
                                           f"{time.perf_counter() - e.queued:.1f} s for prefill node {node.node_id}")
                try:
                    await asyncio.wait_for(e.go.wait(), ROUTABLE_POLL_S if left is None else min(left, ROUTABLE_POLL_S))
                except TimeoutError:
                    pass
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # Python 3.11's wait_for can swallow a cancel
                    raise asyncio.CancelledError()
        except BaseException:
            if e in q.waiting:
                q.waiting.remove(e)
                WAITING.dec()
            elif e in q.running:  # picked just as it gave up
                q.running.remove(e)
            self._pump(q)
            self._forget(key, q)
            raise
        WAIT.observe(e.started - e.queued)
        try:
            yield
        finally:
            q.running.remove(e)
            self._pump(q)
            self._forget(key, q)

    def _pump(self, q: _NodeQueue) -> None:
        """Send the next requests while the node has room for them."""
        while q.waiting and len(q.running) < self.depth:
            now = time.perf_counter()
            nxt = self._next(q, now)
            q.waiting.remove(nxt)
            WAITING.dec()
            nxt.started = now
            q.running.append(nxt)
            nxt.go.set()

    def _next(self, q: _NodeQueue, now: float) -> Entry:
        # A request late for longer than its own objective goes first: late ones are not starved.
        starved = [e for e in q.waiting if _starved(e, now)]
        if starved and not any(e.urgent for e in q.waiting):
            return _late(min(starved, key=lambda e: e.seq), now)
        on_time, late = schedule(q.waiting, _free_at(q.running, now))
        return on_time[0] if on_time else _late(late[0], now)

    def _forget(self, key: tuple[str, str], q: _NodeQueue) -> None:
        if not q.waiting and not q.running and self._queues.get(key) is q:
            del self._queues[key]


def _key(node: NodeClient) -> tuple[str, str]:
    return node.node_id, node.record.engine_id


def _starved(e: Entry, now: float) -> bool:
    return not e.urgent and now > e.deadline + e.budget


def _late(e: Entry, now: float) -> Entry:
    LATE.inc()
    logger.info("request %s: prefill sent late, predicted %.0f ms past its TTFT objective (queued %.0f ms)",
                e.rid, max(0.0, now + e.run_s - e.deadline) * 1000, (now - e.queued) * 1000)
    return e


