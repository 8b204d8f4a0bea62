"""NodeCalls: a coordinator's calls to this node as messages on one long-lived stream.

A gRPC call costs its caller about a millisecond of CPU in grpc.aio, a message on an open
stream some 30 µs (the seventeenth sitting's measurements, docs/PERFORMANCE.md): with a call
per Prefill and per Decode, the coordinator spent more of its time opening calls than on
anything of its own. Here each coordinator keeps one ``Session`` stream to each node. A call on
it is a ``NodeCall`` (a PrefillRequest or a DecodeRequest under a call id of the coordinator's),
served by the same code as the PrefillNode / DecodeNode RPCs, as a task of its own; its replies
go back tagged with that id, and replies ready together go in one message. What the RPCs do,
a call here does the same way:

- an error ends the call with an ``error`` reply carrying the status the RPC would have ended
  with (the stream and the other calls on it go on);
- the coordinator's ``cancel`` for a call cancels its task (the engine request is aborted);
- the stream ending under the calls (the coordinator gone, its connection broken) cancels all
  of them, as a broken connection cancels RPCs;
- a node that stops (drained, ``close``) answers new calls UNAVAILABLE, serves the calls it has
  to their end, then ends the stream; the coordinator opens a new one for its next call.

Bytes on the stream that are not a valid message end the stream with INVALID_ARGUMENT (see
tandem/grpcserve.py).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import Gauge

from tandem.errors import grpc_status_of
from tandem.grpcserve import Malformed
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tandem.decode_node.server import DecodeServicer
    from tandem.prefill_node.server import PrefillServicer

logger = logging.getLogger(__name__)

SESSIONS = Gauge("tandem_node_call_streams", "NodeCalls streams open on this node (one per coordinator process)")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NodeCalls"].full_name
MAX_BATCH = 256  # replies a message at most (small ones: tokens, a first token and a KV handle)


def error_reply(call_id: int, code: grpc.StatusCode, message: str) -> pb.NodeReply:
    return pb.NodeReply(call_id=call_id, error=pb.CallError(code=code.value[0], message=message))


class NodeCallsServicer(pb_grpc.NodeCallsServicer):
    def __init__(self, prefill: PrefillServicer | None = None, decode: DecodeServicer | None = None) -> None:
        self.prefill = prefill
        self.decode = decode
        self.stopping = False
        self._sessions: set[_Session] = set()

    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        session = _Session(self, context)
        self._sessions.add(session)
        SESSIONS.inc()
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            SESSIONS.dec()

    def close(self) -> None:
        """The node stops: new calls are answered UNAVAILABLE; each stream ends once its calls have."""
        self.stopping = True
        for s in list(self._sessions):
            s.stop.set()

    async def wait_closed(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for every stream to end after ``close``."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)


class _Session:
    def __init__(self, servicer: NodeCallsServicer, context: grpc.aio.ServicerContext) -> None:
        self.servicer = servicer
        self.context = context
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.out: list[pb.NodeReply] = []
        self.ready = asyncio.Event()  # replies to send, or the end
        self.stop = asyncio.Event()  # the node stops
        self.ending = False
        self.idle = asyncio.Event()  # no call running
        self.idle.set()
        if servicer.stopping:
            self.stop.set()

    def send(self, reply: pb.NodeReply) -> None:
        self.out.append(reply)
        self.ready.set()

    async def run(self) -> None:
        writer = asyncio.ensure_future(self._write())
        reader = asyncio.ensure_future(self._read())
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({reader, stopping, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and isinstance(bad := reader.result(), Malformed):
                bad.note()
                await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.reason)
            if writer.done():  # its write failed: the stream is gone
                writer.result()
                return
            # The caller sent its last call (or the node stops): serve what runs to its end.
            await self.idle.wait()
            self.ending = True
            self.ready.set()
            await writer
        finally:
            for t in (reader, stopping, writer, *self.calls.values()):
                t.cancel()

    async def _read(self) -> Malformed | None:
        """Start each call as it comes, until the caller's half of the stream ends."""
        while True:
            batch = await self.context.read()
            if batch is grpc.aio.EOF:
                return None
            if isinstance(batch, Malformed):
                return batch
            for call in batch.calls:
                self._start(call)

    def _start(self, call: pb.NodeCall) -> None:
        cid = call.call_id
        kind = call.WhichOneof("body")
        if kind == "cancel":
            task = self.calls.get(cid)
            if task is not None:
                task.cancel()
            return
        if cid in self.calls:
            self.send(error_reply(cid, grpc.StatusCode.INVALID_ARGUMENT, f"call {cid} is already running"))
            return
        if self.stop.is_set():
            self.send(error_reply(cid, grpc.StatusCode.UNAVAILABLE, "the node is stopping"))
            return
        if kind == "prefill" and self.servicer.prefill is not None:
            body = self._prefill(cid, call.prefill)
        elif kind == "decode" and self.servicer.decode is not None:
            body = self._decode(cid, call.decode)
        else:
            serves = "prefills" if self.servicer.prefill is not None else "decodes"
            self.send(error_reply(cid, grpc.StatusCode.UNIMPLEMENTED,
                                  f"this node {serves}; the call is {kind or 'empty'}"))
            return
        task = self.calls[cid] = asyncio.ensure_future(body)
        # Cleaned up when it ends, however: a task cancelled before it first ran (its cancel came in
        # the same message) never enters its body, so a ``finally`` there would not run.
        task.add_done_callback(lambda _, cid=cid: self._ended(cid))
        self.idle.clear()

    async def _prefill(self, cid: int, request: pb.PrefillRequest) -> None:
        assert self.servicer.prefill is not None
        try:
            self.send(pb.NodeReply(call_id=cid, prefill=await self.servicer.prefill.serve(request)))
        except Exception as exc:
            self.send(error_reply(cid, *grpc_status_of(exc)))

    async def _decode(self, cid: int, request: pb.DecodeRequest) -> None:
        assert self.servicer.decode is not None
        try:
            last = None
            async with aclosing(self.servicer.decode.serve(request)) as stream:
                async for msg in stream:
                    self.send(pb.NodeReply(call_id=cid, decode=msg))
                    last = msg
            if last is None or not last.finish_reason:
                self.send(pb.NodeReply(call_id=cid, done=True))
        except Exception as exc:
            self.send(error_reply(cid, *grpc_status_of(exc)))

    def _ended(self, cid: int) -> None:
        self.calls.pop(cid, None)
        if not self.calls:
            self.idle.set()

    async def _write(self) -> None:
        """One writer: everything ready goes in one message."""
        while True:
            if not self.out:
                if self.ending:
                    return
                await self.ready.wait()
                self.ready.clear()
                continue
            batch, self.out = self.out[:MAX_BATCH], self.out[MAX_BATCH:]
            await self.context.write(pb.NodeReplyBatch(replies=batch))


def add_calls_servicer(server: grpc.aio.Server, prefill: PrefillServicer | None = None,
                       decode: DecodeServicer | None = None) -> NodeCallsServicer:
    servicer = NodeCallsServicer(prefill, decode)
    pb_grpc.add_NodeCallsServicer_to_server(servicer, server)
    return servicer
