"""NodeMonitor: a node pushes its load and fitted performance model to each coordinator.

One stream per coordinator (``Watch``): a message at once, then one whenever
work starts or ends here (at most every ``MIN_GAP_S``, so a burst costs one
message), and a heartbeat every ``HEARTBEAT_S`` that carries the drift in
between (context tokens growing, newly fitted coefficients). The coordinator
predicts each request's TTFT and TPOT from it (coordinator/admission.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from tandem.kvstore.held import DISK, RAM, HeldChunks
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc

from .perf import NodePerf

MIN_GAP_S = 0.02
HEARTBEAT_S = 1.0


class NodeMonitorServicer(pb_grpc.NodeMonitorServicer):
    def __init__(self, perf: NodePerf, node_id: str, engine_id: str,
                 reset_cache: Callable[[bool], Awaitable[bool]] | None = None,
                 held: HeldChunks | None = None, engine_held: HeldChunks | None = None) -> None:
        self.perf = perf
        self.held = held
        self.engine_held = engine_held
        self.node_id = node_id
        self.engine_id = engine_id
        self.reset_cache = reset_cache
        self.closing = asyncio.Event()

    async def ResetCache(self, request: pb.ResetCacheRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ResetCacheResponse:
        if self.reset_cache is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node cannot reset its cache")
        assert self.reset_cache is not None
        ok = await self.reset_cache(request.store_ram)
        what = "the engine's prefix cache" + (" and the KV store's RAM tier" if request.store_ram else "")
        return pb.ResetCacheResponse(reset=ok, detail=f"{what}: {'emptied' if ok else 'some of it in use, kept'}")

    def close(self) -> None:
        """End every stream (the node is stopping: its server's grace period need not wait for them)."""
        self.closing.set()

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        closing = asyncio.ensure_future(self.closing.wait())
        changed: asyncio.Future[bool] | None = None
        pos: int | None = None  # this stream's place in the KV store's changes
        epos: int | None = None  # ... in the engine cache's
        try:
            while not self.closing.is_set():
                changed = asyncio.ensure_future(self.perf.changed().wait())
                msg = self.perf.load(self.node_id, self.engine_id)
                if self.held is not None:
                    pos = _held_into(msg, self.held, pos)
                if self.engine_held is not None:
                    epos = _engine_into(msg, self.engine_held, epos)
                await context.write(msg)
                done, _ = await asyncio.wait({changed, closing}, timeout=HEARTBEAT_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                if changed in done:
                    await asyncio.sleep(MIN_GAP_S)
        finally:
            closing.cancel()
            if changed is not None:
                changed.cancel()


def _held_into(msg: pb.NodeLoad, held: HeldChunks, pos: int | None) -> int:
    whole, changes, pos = held.since(pos)
    msg.kv_whole = whole
    msg.kv_namespace, msg.kv_chunk_tokens = held.namespace, held.chunk_tokens
    for key, state in changes.items():
        (msg.kv_ram if state == RAM else msg.kv_disk if state == DISK else msg.kv_gone).append(key)
    return pos


def _engine_into(msg: pb.NodeLoad, held: HeldChunks, pos: int | None) -> int:
    whole, changes, pos = held.since(pos)
    msg.eng_whole = whole
    msg.eng_namespace, msg.eng_block_tokens = held.namespace, held.chunk_tokens
    for key, state in changes.items():
        (msg.eng_held if state else msg.eng_gone).append(key)
    return pos


def add_servicer(server: grpc.aio.Server, perf: NodePerf, node_id: str, engine_id: str,
                 reset_cache: Callable[[bool], Awaitable[bool]] | None = None,
                 held: HeldChunks | None = None, engine_held: HeldChunks | None = None) -> NodeMonitorServicer:
    servicer = NodeMonitorServicer(perf, node_id, engine_id, reset_cache, held, engine_held)
    pb_grpc.add_NodeMonitorServicer_to_server(servicer, server)
    return servicer


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NodeMonitor"].full_name
