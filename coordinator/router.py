"""Routing: pick a prefill and a decode node from the live membership view.

Policy for now: least outstanding requests (the coordinator's own count),
ties broken by fewest served. SLO-aware admission and smarter routing build
on this later.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from tandem.errors import Unavailable
from tandem.grpcserve import GRPC_OPTIONS
from tandem.membership import NodeRecord
from tandem.proto import tandem_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)



@dataclass
class NodeClient:
    record: NodeRecord
    channel: grpc.aio.Channel
    outstanding: int = 0
    served: int = 0
    stub: object = field(init=False)

    def __post_init__(self) -> None:
        if self.record.role == "prefill":
            self.stub = pb_grpc.PrefillNodeStub(self.channel)
        else:
            self.stub = pb_grpc.DecodeNodeStub(self.channel)


class Router:
    def __init__(self, model: str) -> None:
        self.model = model
        self._nodes: dict[str, NodeClient] = {}

    def on_membership(self, node_id: str, record: NodeRecord | None) -> None:
        """Membership callback: a node joined, changed, or left."""
        old = self._nodes.pop(node_id, None)
        if record is None:
            if old is not None:
                # In-flight calls keep their channel until they end; new ones never see it.
                logger.info("routing: removed %s node %s", old.record.role, node_id)
            return
        if record.model != self.model:
            logger.warning("routing: ignoring node %s: it serves %r, this coordinator %r",
                           node_id, record.model, self.model)
            return
        if old is not None and old.record.grpc_address == record.grpc_address:
            old.record = record
            self._nodes[node_id] = old
            return
        self._nodes[node_id] = NodeClient(record, grpc.aio.insecure_channel(record.grpc_address, options=GRPC_OPTIONS))

    def nodes(self, role: str | None = None) -> list[NodeClient]:
        return [n for n in self._nodes.values() if role is None or n.record.role == role]

    def pick(self, role: str, exclude: set[str] = frozenset()) -> NodeClient:  # type: ignore[assignment]
        pool = [n for n in self.nodes(role) if n.record.node_id not in exclude]
        if not pool:
            raise Unavailable(f"no {role} node is registered for model {self.model!r}: the {role} pool is empty")
        return min(pool, key=lambda n: (n.outstanding, n.served, n.record.node_id))

    @contextmanager
    def track(self, node: NodeClient) -> Iterator[NodeClient]:
        """Count a request as outstanding on ``node`` until the block exits (cancel included)."""
        node.outstanding += 1
        node.served += 1
        try:
            yield node
        finally:
            node.outstanding -= 1

    async def close(self) -> None:
        for n in self._nodes.values():
            await n.channel.close()
