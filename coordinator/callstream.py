"""This coordinator's calls to one node as messages on one NodeCalls stream (tandem/node/calls.py).

``NodeStream.Prefill`` and ``NodeStream.Decode`` take what the PrefillNode / DecodeNode stubs
take and give back what their calls would, as far as the pipeline and the watchdog
(nodecalls.py) use them: a Prefill is a future of its PrefillResponse; a Decode has ``read()``
(each DecodeResponse, then ``grpc.aio.EOF``); both have ``cancel()``, and fail with a
``grpc.aio.AioRpcError`` carrying the status the RPC would have had. So everything above them
(deadlines, the stall watch, retries, migration) is the same for both ways of calling.

The stream opens at the first call and again at the first call after it ended. When it breaks
(the node's process died, the connection failed), every call on it fails with that status, as
the calls would each have failed on the broken connection; when the node ends it (it stopped),
the calls still on it fail UNAVAILABLE. A call's deadline is kept here: when it passes, the call
fails DEADLINE_EXCEEDED and the node is told to cancel it. Calls made together go in one
message, and so do replies that are ready together.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import grpc

from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

MODES = ("stream", "call")
# Calls a message at most, and their bytes: each carries its prompt's token ids, and a message must
# stay under the channels' 64 MiB limit (tandem/grpcserve.py); one call alone always goes.
MAX_BATCH = 32
MAX_BATCH_BYTES = 16 << 20


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _status(code: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


class _Decode:
    """A Decode call's replies, as a server-streaming call's ``read()`` gives them."""

    def __init__(self, stream: NodeStream, call_id: int) -> None:
        self.stream = stream
        self.call_id = call_id
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.ended = False  # no more replies will come (its last one, an error, EOF)

    async def read(self) -> Any:
        item = await self.items.get()
        if item is grpc.aio.EOF:
            self.put(item)  # (read again: the end again, as a gRPC call answers)
        if isinstance(item, BaseException):
            raise item
        return item

    def put(self, item: Any) -> None:
        self.items.put_nowait(item)

    def cancel(self) -> bool:
        if self.ended:
            return False
        self.ended = True
        self.stream._cancel(self.call_id)
        self.put(asyncio.CancelledError())
        return True


class NodeStream:
    def __init__(self, channel: grpc.aio.Channel, label: str) -> None:
        self._stub = pb_grpc.NodeCallsStub(channel)
        self.label = label  # "prefill node n1", for messages
        self._call: Any = None  # the open stream
        self._pending: dict[int, asyncio.Future[pb.PrefillResponse] | _Decode] = {}
        self._on: dict[int, Any] = {}  # call id -> the stream it went on
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._ids = itertools.count(1)
        self._out: list[pb.NodeCall] = []
        self._wake = asyncio.Event()
        self._retired = False
        self._tasks: set[asyncio.Task[None]] = set()

    # calls ------------------------------------------------------------------
    def Prefill(self, request: pb.PrefillRequest, timeout: float | None = None) -> asyncio.Future[pb.PrefillResponse]:
        fut: asyncio.Future[pb.PrefillResponse] = asyncio.get_running_loop().create_future()
        cid = self._begin(pb.NodeCall(prefill=request), timeout, fut)
        fut.add_done_callback(lambda f: self._settled(cid, f))
        return fut

    def Decode(self, request: pb.DecodeRequest, timeout: float | None = None) -> _Decode:
        call = _Decode(self, 0)
        call.call_id = self._begin(pb.NodeCall(decode=request), timeout, call)
        return call

    def _begin(self, call: pb.NodeCall, timeout: float | None, pending: Any) -> int:
        cid = call.call_id = next(self._ids)
        if self._retired:  # its node left (a call that raced its leaving): failed as a call to it would
            self._pending[cid] = pending
            self._fail(cid, rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self.label} has left the cluster"))
            self._forget(cid)
            return cid
        self._open()
        self._pending[cid] = pending
        self._on[cid] = self._call
        self._send(call)
        if timeout is not None:
            self._timers[cid] = asyncio.get_running_loop().call_later(timeout, self._expired, cid)
        return cid

    def _settled(self, cid: int, fut: asyncio.Future[pb.PrefillResponse]) -> None:
        """A Prefill's future is done: cancelled by its caller (the node is told), or answered."""
        if fut.cancelled():
            self._cancel(cid)
        else:
            self._forget(cid)

    def _cancel(self, cid: int) -> None:
        """Its caller is done with it before its end: the node is told to stop it."""
        on = self._on.get(cid)
        if self._forget(cid) is not None and on is not None and on is self._call:
            self._send(pb.NodeCall(call_id=cid, cancel=True))

    def _forget(self, cid: int) -> Any:
        timer = self._timers.pop(cid, None)
        if timer is not None:
            timer.cancel()
        self._on.pop(cid, None)
        call = self._pending.pop(cid, None)
        if call is not None and self._retired and not self._pending:
            self._wake.set()  # its writer ends the stream
        return call

    def _expired(self, cid: int) -> None:
        self._timers.pop(cid, None)
        self._fail(cid, rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
        self._cancel(cid)

    def _fail(self, cid: int, exc: grpc.aio.AioRpcError) -> None:
        call = self._pending.get(cid)
        if isinstance(call, _Decode):
            if not call.ended:
                call.ended = True
                call.put(exc)
        elif call is not None and not call.done():
            call.set_exception(exc)

    # the stream ---------------------------------------------------------------
    def _open(self) -> None:
        if self._call is not None:
            return
        self._call = call = self._stub.Session()
        self._out = []
        self._wake = wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(call), name=f"calls-read {self.label}")
        writer = loop.create_task(self._write(call, wake), name=f"calls-write {self.label}")
        # Kept by the loop only weakly: held here until done (an ended stream's too).
        for t in (reader, writer):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def _send(self, call: pb.NodeCall) -> None:
        self._out.append(call)
        self._wake.set()

    async def _write(self, call: Any, wake: asyncio.Event) -> None:
        """One writer a stream: the calls made since its last write go in one message."""
        try:
            while call is self._call:
                if self._out:
                    k, size = 0, 0
                    while k < min(len(self._out), MAX_BATCH) and (k == 0 or size < MAX_BATCH_BYTES):
                        size += self._out[k].ByteSize()
                        k += 1
                    batch, self._out = self._out[:k], self._out[k:]
                    await call.write(pb.NodeCallBatch(calls=batch))
                    continue
                if self._retired and not self._pending:
                    await call.done_writing()  # the node ends the stream; the reader sees it
                    return
                await wake.wait()
                wake.clear()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            # The stream broke: its reader sees why and fails its calls.
            logger.debug("call stream to %s: write failed: %s", self.label, exc)

    async def _read(self, call: Any) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self.label} ended its call stream")
        try:
            while (batch := await call.read()) is not grpc.aio.EOF:
                for reply in batch.replies:
                    self._reply(reply)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = rpc_error(grpc.StatusCode.UNAVAILABLE, f"the call stream to {self.label} was closed")
            raise
        finally:
            if self._call is call:
                self._call = None
                self._wake.set()  # its writer ends
            for cid in [c for c, on in self._on.items() if on is call]:
                self._fail(cid, error)
                self._forget(cid)

    def _reply(self, reply: pb.NodeReply) -> None:
        cid = reply.call_id
        call = self._pending.get(cid)
        if call is None:  # cancelled, or past its deadline, meanwhile
            return
        kind = reply.WhichOneof("body")
        if kind == "error":
            self._fail(cid, rpc_error(_status(reply.error.code), reply.error.message))
            self._forget(cid)
        elif isinstance(call, _Decode):
            if kind == "decode":
                call.put(reply.decode)
                if not reply.decode.finish_reason:
                    return
            elif kind != "done":
                self._fail(cid, rpc_error(grpc.StatusCode.INTERNAL, f"{self.label} answered a Decode with {kind}"))
                self._forget(cid)
                return
            call.ended = True
            call.put(grpc.aio.EOF)
            self._forget(cid)
        elif kind == "prefill":
            if not call.done():
                call.set_result(reply.prefill)
        else:
            self._fail(cid, rpc_error(grpc.StatusCode.INTERNAL, f"{self.label} answered a Prefill with {kind}"))
            self._forget(cid)

    def retire(self) -> None:
        """No new calls: the stream ends once the calls on it have (its node left, or its channel
        is being replaced). Calls under way are not cut short."""
        self._retired = True
        self._wake.set()

    def close(self) -> None:
        """End the stream now (the coordinator stops): its calls fail."""
        self._retired = True
        if self._call is not None:
            self._call.cancel()

    @property
    def calls(self) -> int:
        """Calls in flight on it."""
        return len(self._pending)


def call_mode_of(mode: str) -> str:
    """``--node-calls``: ``stream`` (a NodeStream a node) or ``call`` (the PrefillNode / DecodeNode
    stubs, a gRPC call each: the way before the eighteenth sitting, kept for comparison)."""
    if mode not in MODES:
        raise ValueError(f"--node-calls must be one of {', '.join(MODES)}, got {mode!r}")
    return mode
