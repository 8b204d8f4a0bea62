"""Routing: the live membership view, and picking a node from a pool (a node as the coordinator
sees it, its load and its model: nodeclient.py).

``pick`` takes the least outstanding requests (the coordinator's own count),
ties broken by fewest served: what the pipeline falls back on when nothing
can be predicted, and what a migrated leg uses. The first choice of a new
request is admission's (coordinator/admission.py), from each node's predicted
TTFT and TPOT. For that every node streams its load and fitted performance
model (NodeMonitor.Watch) to the coordinator; ``NodeClient.load`` and
``NodeClient.model`` hold the latest, and ``track`` keeps the coordinator's
own requests in flight on each node (with their tokens) for the moments
between two messages.

A node is routable while it is registered in etcd, not draining (it finishes
what it holds, then leaves) and not *down*. A failed
call (refused connection, broken stream, a stall with a failed health probe)
marks it down at once, long before its etcd lease runs out; a probe loop
brings it back as soon as its health service answers SERVING again. When a
pool has no routable node but had one a moment ago (a restart, a node that
just failed), ``acquire`` waits a bounded time for one; a pool that has no
node at all answers UNAVAILABLE at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health_pb2

from tandem.errors import Unavailable
from tandem.grpcserve import CHANNEL_OPTIONS
from tandem.membership import NodeRecord
from tandem.proto import tandem_pb2 as pb
from tandem.tls import FileWatch, TlsConfig

from . import metrics as m
from .callstream import call_mode_of
from .nodeclient import PACES, NodeClient, Tally

logger = logging.getLogger(__name__)

PROBE_INTERVAL_S = 0.5
PROBE_MAX_INTERVAL_S = 5.0
_keys = itertools.count()


class Router:
    def __init__(self, model: str, pool_wait_s: float = 10.0, probe_timeout_s: float = 1.0,
                 watch_loads: bool = True, tls: TlsConfig | None = None, retire_channels_after_s: float = 3600.0,
                 node_calls: str = "stream", pace: str = "on") -> None:
        """``retire_channels_after_s``: after a certificate rotation, the old channels close this long
        after new calls moved off them (longer than any call's deadline: none is cut short)."""
        self.model = model
        self.node_calls = call_mode_of(node_calls)  # --node-calls (callstream.py)
        if pace not in PACES:
            raise ValueError(f"--pace must be on or off, got {pace!r}")
        self.pace = pace  # --pace (nodeclient.py)
        self.tls = tls or TlsConfig()  # mutual TLS to the nodes when on
        self.retire_channels_after_s = retire_channels_after_s
        self._retired: dict[grpc.aio.Channel, asyncio.TimerHandle] = {}  # old channels -> when they close
        self.pool_wait_s = pool_wait_s
        self.probe_timeout_s = probe_timeout_s
        self.watch_loads = watch_loads  # off in unit tests whose nodes are fakes
        self._nodes: dict[str, NodeClient] = {}
        self._left_at: dict[str, float] = {}  # role -> when a node of it last left or failed
        self._absent: dict[str, bool] = {}  # role -> its pool was absent when last asked (said once a change)
        self._changed: asyncio.Event | None = None
        self._probes: set[asyncio.Task[None]] = set()

    # membership -------------------------------------------------------------
    def on_membership(self, node_id: str, record: NodeRecord | None) -> None:
        """Membership callback: a node joined, changed, or left."""
        old = self._nodes.pop(node_id, None)
        if record is None:
            if old is not None:
                _stop_watching(old)
                old.retire()
                for kind in old.calibrations:
                    m.forget_calibration(node_id, kind)
                # In-flight calls keep their channel until they end; new ones never see it.
                self._left_at[old.record.role] = time.monotonic()
                logger.info("routing: removed %s node %s", old.record.role, node_id)
            self._pulse()
            return
        if record.model != self.model:
            logger.warning("routing: ignoring node %s: it serves %r, this coordinator %r",
                           node_id, record.model, self.model)
            return
        if old is not None and (old.record.grpc_address, old.record.engine_id) == (record.grpc_address,
                                                                                    record.engine_id):
            old.record = record
            self._nodes[node_id] = old
        else:
            # A new process (or a new address): a fresh channel, routable at once, predictions
            # uncalibrated again.
            try:
                channel = self.tls.aio_channel(record.grpc_address, options=CHANNEL_OPTIONS)
            except (OSError, ValueError) as exc:  # TLS files unreadable now: keep what there was
                logger.error("routing: cannot dial %s node %s with the TLS files: %s", record.role, node_id, exc)
                if old is not None:
                    self._nodes[node_id] = old
                return
            if old is not None:
                _stop_watching(old)
                old.retire()
                for kind in old.calibrations:
                    m.forget_calibration(node_id, kind)
            node = NodeClient(record, channel, call_mode=self.node_calls, pace_on=self.pace == "on")
            self._nodes[node_id] = node
            if self.watch_loads:
                node.watcher = asyncio.get_running_loop().create_task(self._watch(node), name=f"load-{node_id}")
        self._pulse()

    async def _watch(self, node: NodeClient) -> None:
        """Follow the node's NodeMonitor stream while it is a member; reconnect after a break."""
        pause = PROBE_INTERVAL_S
        while self._nodes.get(node.node_id) is node:
            try:
                async for msg in node.monitor.Watch(pb.WatchRequest()):  # type: ignore[attr-defined]
                    node.saw_load(msg)
                    pause = PROBE_INTERVAL_S
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    logger.warning("routing: node %s has no NodeMonitor service (an older version?); its load "
                                   "is not known and admission cannot predict it", node.node_id)
                    return
                logger.debug("routing: load stream of %s broke: %s", node.node_id, exc.details())
            await asyncio.sleep(pause)
            pause = min(pause * 2, PROBE_MAX_INTERVAL_S)

    def routable(self, node: NodeClient) -> bool:
        """Still a member (this very process), up and not draining."""
        return self._nodes.get(node.node_id) is node and node.up and not node.record.draining

    def nodes(self, role: str | None = None) -> list[NodeClient]:
        return [n for n in self._nodes.values() if role is None or n.record.role == role]

    # picking ----------------------------------------------------------------
    def routable_nodes(self, role: str) -> list[NodeClient]:
        return [n for n in self.nodes(role) if n.up and not n.record.draining]

    def pick(self, role: str, avoid: set[str] = frozenset()) -> NodeClient:  # type: ignore[assignment]
        """The least loaded routable node of ``role``, preferring those not in ``avoid``."""
        pool = self.routable_nodes(role)
        if not pool:
            registered = len(self.nodes(role))
            why = (f"its {registered} registered node(s) are draining or failed and have not answered since"
                   if registered else f"the {role} pool is empty")
            raise Unavailable(f"no {role} node is available for model {self.model!r}: {why}")
        preferred = [n for n in pool if n.node_id not in avoid] or pool
        return min(preferred, key=lambda n: (n.outstanding, n.served, n.node_id))

    async def acquire(self, role: str, avoid: set[str] = frozenset()) -> NodeClient:  # type: ignore[assignment]
        """``pick``, waiting up to ``pool_wait_s`` when the pool is only briefly without a node."""
        deadline: float | None = None
        while True:
            try:
                return self.pick(role, avoid)
            except Unavailable:
                now = time.monotonic()
                if deadline is None:
                    if not self._expecting(role):
                        raise
                    deadline = now + self.pool_wait_s
                    logger.info("routing: no %s node available; waiting up to %.0f s for one", role,
                                self.pool_wait_s)
                if now >= deadline:
                    raise Unavailable(f"no {role} node became available within {self.pool_wait_s:.0f} s "
                                      f"for model {self.model!r}") from None
                changed = self._event()
                try:
                    await asyncio.wait_for(changed.wait(), deadline - now)
                except TimeoutError:
                    pass

    def pool_absent(self, role: str) -> bool:
        """The pool has no routable node and none is coming back soon (``acquire`` would answer
        UNAVAILABLE at once): a cluster deployed without it, or one whose nodes left (or were
        marked down and their etcd keys expired) more than ``pool_wait_s`` ago. Each change is
        logged, once (asked only where the decode nodes can stand in: conditional disaggregation)."""
        absent = not self.routable_nodes(role) and not self._expecting(role)
        if absent != self._absent.get(role, False):
            self._absent[role] = absent
            if absent:
                logger.warning("routing: no %s node is registered, and none left within the last %.0f s: the "
                               "decode nodes prefill every request until one joins", role, self.pool_wait_s)
            else:
                logger.info("routing: the %s pool has a node again", role)
        return absent

    def _expecting(self, role: str) -> bool:
        """Whether a node of ``role`` may come (back) soon: one is registered but down, or one
        left within the last ``pool_wait_s``."""
        if self.nodes(role):
            return True
        left = self._left_at.get(role)
        return left is not None and time.monotonic() - left < self.pool_wait_s

    def current(self, node: NodeClient) -> bool:
        """Whether ``node`` is still the member of its id (not gone, not replaced by a restart)."""
        return self._nodes.get(node.node_id) is node

    @contextmanager
    def track(self, node: NodeClient, tokens: int = 0, left: Callable[[], int] | None = None,
              budget: Callable[[float], tuple[float, int] | None] | None = None) -> Iterator[NodeClient]:
        """Count a request (of ``tokens`` prompt tokens) as outstanding on ``node`` until the block
        exits (cancel included). ``left``: on a decode node, how many output tokens it has still to
        come (at most), asked whenever admission looks ahead there; ``budget``: what it has left of
        its TPOT objective (``NodeClient.budgets``). On a prefill node, one without ``left`` is a
        prefill call (``NodeClient.prefills``), one with it a stream it serves whole (--colocate)."""
        to_come = left() if left is not None else 0
        node.outstanding += 1
        node.served += 1
        key = next(_keys)
        tally = node.prefills if left is None and node.record.role == "prefill" else node.inflight
        tally[key] = tokens
        if left is not None:
            node.left[key] = left
            node.arrivals.add(to_come)
        if budget is not None:
            node.budgets[key] = budget
        try:
            yield node
        finally:
            node.outstanding -= 1
            del tally[key]
            node.left.pop(key, None)
            node.budgets.pop(key, None)

    @contextmanager
    def track_sent(self, node: NodeClient, tokens: int) -> Iterator[NodeClient]:
        """A prefill call in a prefill node's engine (past its turn in the prefill order), until it
        answers: what a prompt the node serves whole (--colocate) runs behind there."""
        with _counted(node.sent, tokens):
            yield node

    @contextmanager
    def track_prefill(self, node: NodeClient, tokens: int, run_s: float = 0.0) -> Iterator[NodeClient]:
        """A decode node prefilling a request itself, until its first token (or the block exits):
        ``tokens`` to compute, taking ``run_s`` alone as admission predicted it (0: not predicted)."""
        key = next(_keys)
        node.prefilling[key] = tokens
        node.prefilling_since[key] = time.perf_counter()
        if run_s > 0:
            node.prefilling_run_s[key] = run_s
        try:
            yield node
        finally:
            if next(iter(node.prefilling)) == key:  # the oldest ended: the next one runs from now
                node.prefilled_at = time.perf_counter()
            del node.prefilling[key]
            del node.prefilling_since[key]
            node.prefilling_run_s.pop(key, None)

    @contextmanager
    def track_awaiting(self, node: NodeClient, tokens: int) -> Iterator[NodeClient]:
        """A stream reserved on decode node ``node`` (``track``) whose ``tokens`` prompt tokens a
        prefill node computes, until its first token there (admission's KV room counts them: the
        node's reports do not yet; for the moments between its blocks' allocation and its first
        token, both do, on the safe side)."""
        with _counted(node.awaiting, tokens):
            yield node

    # health -----------------------------------------------------------------
    async def check(self, node: NodeClient) -> bool:
        """One health probe: True when the node answers SERVING within ``probe_timeout_s``."""
        try:
            resp = await node.health.Check(health_pb2.HealthCheckRequest(),  # type: ignore[attr-defined]
                                           timeout=self.probe_timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def mark_down(self, node: NodeClient, why: str) -> None:
        """Take ``node`` out of routing now; a probe loop brings it back when it answers."""
        if node.down_since is not None or self._nodes.get(node.node_id) is not node:
            return
        node.down_since = time.monotonic()
        self._left_at[node.record.role] = node.down_since
        m.NODES_DOWN.labels(node.record.role).inc()
        logger.warning("routing: %s node %s is out of routing: %s", node.record.role, node.node_id, why)
        task = asyncio.get_running_loop().create_task(self._probe_until_up(node), name=f"probe-{node.node_id}")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe_until_up(self, node: NodeClient) -> None:
        pause = PROBE_INTERVAL_S
        while self._nodes.get(node.node_id) is node:
            await asyncio.sleep(pause)
            if await self.check(node):
                logger.info("routing: %s node %s answers again after %.1f s; back in routing",
                            node.record.role, node.node_id, time.monotonic() - (node.down_since or 0))
                node.down_since = None
                self._pulse()
                return
            pause = min(pause * 2, PROBE_MAX_INTERVAL_S)

    # waiting ----------------------------------------------------------------
    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _pulse(self) -> None:
        """Wake every ``acquire`` waiting for a change of the pools."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def keep_certificate_fresh(self, every_s: float = 5.0) -> None:
        """Dial the nodes with the coordinator's certificate again whenever its files change (a
        rotation): new calls show the new one at once, calls under way finish on the old channel."""
        files = [p for p in (self.tls.cert, self.tls.key, self.tls.ca) if p]
        if not files:
            return
        watch = FileWatch(files, self.tls.cert or self.tls.ca, "the nodes keep being dialled with the previous certificate")
        while True:
            await asyncio.sleep(every_s)
            # channel_credentials loads and checks them: a half-copied rotation waits
            if watch.reload(self.tls.channel_credentials) is not None:
                self.redial_all()

    def redial_all(self) -> int:
        """A new channel to every node, from the TLS files as they are now; the old ones close
        ``retire_channels_after_s`` later. Returns how many."""
        loop = asyncio.get_running_loop()
        n = 0
        for node in list(self._nodes.values()):
            try:
                channel = self.tls.aio_channel(node.record.grpc_address, options=CHANNEL_OPTIONS)
            except (OSError, ValueError) as exc:  # the files changed again meanwhile: the next change retries
                logger.error("TLS: cannot dial %s node %s with the new files (it keeps the old channel): %s",
                             node.record.role, node.node_id, exc)
                continue
            old = node.redial(channel)
            self._retired[old] = loop.call_later(self.retire_channels_after_s, self._close_retired, old)
            n += 1
        logger.info("TLS: dialling the nodes with the certificate from %s now (%d channels; the old ones close "
                    "in %.0f s)", self.tls.cert or self.tls.ca, n, self.retire_channels_after_s)
        return n

    def _close_retired(self, old: grpc.aio.Channel) -> None:
        self._retired.pop(old, None)
        task = asyncio.get_running_loop().create_task(old.close())
        self._probes.add(task)  # kept until done (the probes' set: close() cancels what is left)
        task.add_done_callback(self._probes.discard)

    async def close(self) -> None:
        for old, h in list(self._retired.items()):
            h.cancel()
            await old.close()
        self._retired.clear()
        for t in list(self._probes):
            t.cancel()
        for n in self._nodes.values():
            _stop_watching(n)
            if n.stream is not None:
                n.stream.close()
            await n.channel.close()


def _stop_watching(node: NodeClient) -> None:
    if node.watcher is not None:
        node.watcher.cancel()
        node.watcher = None


@contextmanager
def _counted(tally: Tally, tokens: int) -> Iterator[None]:
    """``tokens`` in ``tally`` under a key of their own until the block exits."""
    key = next(_keys)
    tally[key] = tokens
    try:
        yield
    finally:
        del tally[key]
