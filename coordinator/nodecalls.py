"""Calls from the coordinator to its nodes: each under a deadline and a stall watch.

A node can fail a call three ways: it answers with an error status, its
connection breaks (UNAVAILABLE), or it stops answering altogether (a frozen
process, a partition). The first two end the call at once; for the third,
``Watchdog`` probes the node's health whenever a call has made no progress
for ``stall_s`` seconds, and a node that does not answer the probe is given
up on. A node that is merely slow (it answers its health probe) is waited on
until the call's deadline, which ends it with DEADLINE_EXCEEDED.

Failures come out as ``NodeCallFailed``: the error to end the request with,
whether the request may be re-issued on another node, and whether the node
itself should leave routing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from tandem.errors import NodeFailed, TandemError, error_from_grpc

from .nodeclient import NodeClient
from .router import Router

T = TypeVar("T")
_STALLED = object()  # Watchdog.stream's timer, in a stream's queue: no message for stall_s
_TICK_S = 1e-3  # the event loop clock's step (uvloop's: a millisecond)


def _stall_due(now: float, waiting_since: float | None, stall_s: float, queue_empty: bool) -> float | None:
    """The stall timer's decision at ``now``: None when the stream has waited ``stall_s`` on a queue
    still empty (a message put this turn ends the wait), which wakes it to probe; otherwise when to
    look again: when the wait now running (or the next) would reach ``stall_s``, and at least a
    clock tick on (uvloop's clock moves in whole milliseconds, so a timer can fire a hair early:
    it must neither miss the stall nor set itself again for a time already past)."""
    if waiting_since is not None and now - waiting_since >= stall_s - _TICK_S and queue_empty:
        return None
    return max((now if waiting_since is None else waiting_since) + stall_s, now + _TICK_S)


# Statuses that say the request (not the node) is at fault, or that the node is fine but the
# request's KV is gone: the node stays in routing.
_NODE_FINE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED)


class NodeCallFailed(Exception):
    def __init__(self, error: TandemError, node: NodeClient, *, retryable: bool, node_failed: bool,
                 cause: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.node = node
        self.retryable = retryable  # the request may go on elsewhere
        self.node_failed = node_failed  # take the node out of routing
        self.cause = cause  # a short label for metrics and logs


def call_failed(exc: grpc.aio.AioRpcError, node: NodeClient) -> NodeCallFailed:
    code = exc.code()
    error = error_from_grpc(code, exc.details() or "", f"{node.record.role} node {node.node_id}")
    # DEADLINE_EXCEEDED is the call's own deadline running out on a node that kept answering its
    # health probes (a silent one is caught as stalled first): slow, not dead. Retrying elsewhere
    # would only pile the same work onto other nodes and stretch the bound the operator set.
    final = code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED)
    return NodeCallFailed(error, node, retryable=not final, node_failed=code not in _NODE_FINE,
                          cause=code.name.lower())


def stream_ended_early(node: NodeClient, reason: str = "") -> NodeCallFailed:
    how = f"ended the stream with finish reason {reason!r}" if reason else "ended the stream without a finish reason"
    return NodeCallFailed(NodeFailed(f"{node.record.role} node {node.node_id} {how}"), node, retryable=True,
                          node_failed=True, cause="ended")


class Watchdog:
    def __init__(self, router: Router, stall_s: float) -> None:
        self.router = router
        self.stall_s = stall_s

    async def wait(self, call: Awaitable[T], node: NodeClient, orphaned: Callable[[T], None] | None = None) -> T:
        """Await a unary call. Every ``stall_s`` without an answer the node's health is
        probed; if it does not answer SERVING, the call is abandoned as stalled. An answer
        that came but was never returned (the caller was cancelled meanwhile) goes to
        ``orphaned``, so that what it holds can be given back."""
        task = asyncio.ensure_future(call)
        returned = False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.stall_s)
                if done:
                    returned = True
                    return task.result()
                await self._probe(node)
        except grpc.aio.AioRpcError as exc:
            raise call_failed(exc, node) from exc
        finally:
            if not task.done():
                task.cancel()
            elif not returned and orphaned is not None and not task.cancelled() and task.exception() is None:
                orphaned(task.result())

    async def stream(self, call: Any, node: NodeClient) -> AsyncIterator[Any]:
        """The messages of a server-streaming call, watched the same way: a wait of ``stall_s``
        for the next message gets a health probe. The call is cancelled when the stream closes
        (a no-op for one that ended); a stream closed before its first message was asked for
        never ran and does not cancel its call, so callers iterate it at once (``async for``).
        One reader task per call feeds a queue (a call on a call stream has its own), so the
        per-message cost is a queue hand-off; the stall watch is one timer a call that moves
        itself on when it fires, not a timer a message."""
        # A call on a node's call stream (callstream.py) has its replies in a queue already.
        queue: asyncio.Queue[object] | None = getattr(call, "items", None)
        reader = None
        if queue is None:
            queue = asyncio.Queue()

            async def pump(queue: asyncio.Queue[object]) -> None:
                try:
                    while (msg := await call.read()) is not grpc.aio.EOF:
                        queue.put_nowait(msg)
                    queue.put_nowait(grpc.aio.EOF)
                except Exception as exc:  # handed to the consumer, which raises it
                    queue.put_nowait(exc)

            reader = asyncio.ensure_future(pump(queue))
        loop = asyncio.get_running_loop()
        waiting_since: float | None = None  # when this stream began waiting on an empty queue

        def check() -> None:
            """The timer (``_stall_due``): wakes the stream to probe, or moves itself on."""
            nonlocal timer
            now = loop.time()
            due = _stall_due(now, waiting_since, self.stall_s, queue.empty())
            if due is None:
                timer = None
                queue.put_nowait(_STALLED)
            else:
                timer = loop.call_at(due, check)

        timer: asyncio.TimerHandle | None = loop.call_later(self.stall_s, check)
        try:
            while True:
                if queue.empty():
                    waiting_since = loop.time()
                    item = await queue.get()
                    waiting_since = None
                else:
                    item = queue.get_nowait()
                if item is _STALLED:
                    await self._probe(node)  # (raises when the node does not answer)
                    timer = loop.call_later(self.stall_s, check)
                    continue
                if item is grpc.aio.EOF:  # (a call-stream call's queue ends so too)
                    return
                if isinstance(item, grpc.aio.AioRpcError):
                    raise call_failed(item, node) from item
                if isinstance(item, BaseException):  # (a cancelled call-stream call: CancelledError)
                    raise item
                yield item
        finally:
            if timer is not None:
                timer.cancel()
            if reader is not None:
                reader.cancel()
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()

    async def _probe(self, node: NodeClient) -> None:
        if not await self.router.check(node):
            raise NodeCallFailed(
                NodeFailed(f"{node.record.role} node {node.node_id} stopped answering: no progress for "
                           f"{self.stall_s:.1f} s and its health probe failed"),
                node, retryable=True, node_failed=True, cause="stalled")
