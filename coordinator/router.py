"""Routing: pick a prefill and a decode node from the live membership view.

Policy for now: least outstanding requests (the coordinator's own count),
ties broken by fewest served. SLO-aware admission and smarter routing build
on this later.

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
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.errors import Unavailable
from tandem.grpcserve import CHANNEL_OPTIONS
from tandem.membership import NodeRecord
from tandem.proto import tandem_pb2_grpc as pb_grpc

from . import metrics as m

logger = logging.getLogger(__name__)

PROBE_INTERVAL_S = 0.5
PROBE_MAX_INTERVAL_S = 5.0


@dataclass
class NodeClient:
    record: NodeRecord
    channel: grpc.aio.Channel
    outstanding: int = 0
    served: int = 0
    down_since: float | None = None  # monotonic; set while the node failed and has not answered since
    stub: object = field(init=False)
    health: object = field(init=False)

    def __post_init__(self) -> None:
        if self.record.role == "prefill":
            self.stub = pb_grpc.PrefillNodeStub(self.channel)
        else:
            self.stub = pb_grpc.DecodeNodeStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def node_id(self) -> str:
        return self.record.node_id

    @property
    def up(self) -> bool:
        return self.down_since is None


class Router:
    def __init__(self, model: str, pool_wait_s: float = 10.0, probe_timeout_s: float = 1.0) -> None:
        self.model = model
        self.pool_wait_s = pool_wait_s
        self.probe_timeout_s = probe_timeout_s
        self._nodes: dict[str, NodeClient] = {}
        self._left_at: dict[str, float] = {}  # role -> when a node of it last left or failed
        self._changed: asyncio.Event | None = None
        self._probes: set[asyncio.Task[None]] = set()

    # membership -------------------------------------------------------------
    def on_membership(self, node_id: str, record: NodeRecord | None) -> None:
        """Membership callback: a node joined, changed, or left."""
        old = self._nodes.pop(node_id, None)
        if record is None:
            if old is not None:
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
            # A new process (or a new address): a fresh channel, routable at once.
            self._nodes[node_id] = NodeClient(record, grpc.aio.insecure_channel(record.grpc_address,
                                                                                options=CHANNEL_OPTIONS))
        self._pulse()

    def routable(self, node: NodeClient) -> bool:
        """Still a member (this very process), up and not draining."""
        return self._nodes.get(node.node_id) is node and node.up and not node.record.draining

    def nodes(self, role: str | None = None) -> list[NodeClient]:
        return [n for n in self._nodes.values() if role is None or n.record.role == role]

    # picking ----------------------------------------------------------------
    def pick(self, role: str, avoid: set[str] = frozenset()) -> NodeClient:  # type: ignore[assignment]
        """The least loaded routable node of ``role``, preferring those not in ``avoid``."""
        pool = [n for n in self.nodes(role) if n.up and not n.record.draining]
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

    def _expecting(self, role: str) -> bool:
        """Whether a node of ``role`` may come (back) soon: one is registered but down, or one
        left within the last ``pool_wait_s``."""
        if self.nodes(role):
            return True
        left = self._left_at.get(role)
        return left is not None and time.monotonic() - left < self.pool_wait_s

    @contextmanager
    def track(self, node: NodeClient) -> Iterator[NodeClient]:
        """Count a request as outstanding on ``node`` until the block exits (cancel included)."""
        node.outstanding += 1
        node.served += 1
        try:
            yield node
        finally:
            node.outstanding -= 1

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

    async def close(self) -> None:
        for t in list(self._probes):
            t.cancel()
        for n in self._nodes.values():
            await n.channel.close()
