"""DecodeNode servicer: pull a request's KV from its prefill node and stream the rest of it.

A request's life here: Decode -> engine (prompt + first token, kv "consume")
-> the connector pulls the held blocks in the background (the request waits
in vLLM's WAITING_FOR_REMOTE_KVS; other requests keep decoding) -> tokens
stream back -> a client cancel aborts the engine request.

With ``prefill_here`` (conditional disaggregation: the coordinator predicted
the request would start sooner this way) there is no handle: the engine
prefills the prompt itself, in chunks of ``--max-num-batched-tokens`` per
step so that the streams already running keep their pace, and the first
message carries the first token.

A handle that cannot be right (too few blocks for its tokens, a bad address, a
lease already over) is refused here, before the engine sees it; one that looks
right but names blocks its holder does not have fails that request alone
through vLLM's KV load-failure path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, aclosing

import grpc
from prometheus_client import Counter, Gauge, Histogram

from tandem.errors import InvalidRequest, KVUnavailable, NodeFailed, RequestAborted, grpc_status_of
from tandem.node.calls import NodeCallsServicer, add_calls_servicer
from tandem.node.engine import EngineHost
from tandem.node.handles import check_for_decode, consume_params
from tandem.node.perf import EngineClock, NodePerf
from tandem.perfmodel import kv_bytes_per_token
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.sampling import from_proto

logger = logging.getLogger(__name__)

DECODES = Counter("tandem_decode_requests", "Decode requests by outcome", ["outcome"])
DECODE_INFLIGHT = Gauge("tandem_decode_inflight", "Decode requests in flight on this node")
LOCAL_PREFILLS = Counter("tandem_decode_local_prefills", "Requests prefilled on this node itself: on a decode "
                         "node, conditional disaggregation; on a prefill node, the requests it served whole (--colocate)")
KV_WAIT_SECONDS = Histogram("tandem_decode_kv_wait_seconds",
                            "Decode call start to its first new token (KV pull plus one step)",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class DecodeServicer(pb_grpc.DecodeNodeServicer):
    """``handles=False``: a prefill node's, serving whole the requests the coordinator colocates
    there (``prefill_here`` only: its engine produces KV, it pulls none)."""

    def __init__(self, engine: EngineHost, perf: NodePerf, handles: bool = True) -> None:
        self.engine = engine
        self.perf = perf
        self.handles = handles
        self.kv_bytes_per_token = kv_bytes_per_token(engine.layout())

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> None:
        # Written with context.write() rather than as an async generator: a caller's cancel then
        # always lands in this coroutine (and through ``serve`` in the engine request, aborted at
        # once); a generator suspended at `yield` would be left running.
        try:
            async with aclosing(self.serve(request)) as stream:
                async for msg in stream:
                    await context.write(msg)
        except Exception as exc:
            await context.abort(*grpc_status_of(exc))

    async def serve(self, request: pb.DecodeRequest) -> AsyncIterator[pb.DecodeResponse]:
        """One decode's messages, counted and logged: for the Decode RPC and for a call on a
        NodeCalls stream (tandem/node/calls.py). Raises what it failed with; the caller makes it a
        status. The outcome starts as "cancelled"; only a normal end or an error changes it."""
        rid = request.request_id
        outcome = "cancelled"
        with DECODE_INFLIGHT.track_inprogress():
            try:
                async with aclosing(self._decode(request)) as stream:
                    async for msg in stream:
                        yield msg
                outcome = "ok"
            except Exception as exc:
                outcome = "error"
                logger.warning("request %s: decode failed: %s", rid, grpc_status_of(exc)[1])
                raise
            finally:
                DECODES.labels(outcome).inc()
                if outcome == "cancelled":
                    logger.info("request %s: decode cancelled by the caller", rid)

    async def _decode(self, request: pb.DecodeRequest) -> AsyncIterator[pb.DecodeResponse]:
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        if not rid:
            raise InvalidRequest("request_id is required")
        local = request.prefill_here
        if local and request.HasField("handle"):
            raise InvalidRequest("prefill_here takes no KV handle")
        if not local and not self.handles:
            raise InvalidRequest("this prefill node decodes only the requests it prefills itself (prefill_here); "
                                 "a KV handle goes to a decode node")
        if not local and not request.HasField("handle"):
            raise InvalidRequest("decode needs a KV handle (or prefill_here)")
        if not prompt:
            raise InvalidRequest("empty prompt")
        sampling = from_proto(request.sampling)
        sampling.validate(len(prompt), self.engine.max_model_len)
        if not local:
            check_for_decode(request.handle, len(prompt), self.engine.block_size)
        t0 = time.perf_counter()
        first = True
        kv_bytes = 0 if local else len(request.handle.block_ids) * self.engine.block_size * self.kv_bytes_per_token
        with ExitStack() as prefilling:
            # A local prefill is one of this node's prefills (queue, samples) until its first token.
            run = prefilling.enter_context(self.perf.prefill(len(prompt))) if local else None
            self.perf.decode_started(rid, len(prompt), kv_bytes, interval=max(1, request.stream_interval))
            try:
                kv = None if local else consume_params(request.handle)
                async for out in self.engine.generate(rid, prompt, sampling, kv,
                                                      stream_interval=max(1, request.stream_interval)):
                    comp = out.outputs[0]
                    if comp.finish_reason == "abort":
                        # The engine ended it without being asked (shutting down): the request is not done.
                        raise NodeFailed(f"decode node's engine aborted request {rid} (shutting down?)")
                    if comp.finish_reason == "error":
                        if local:  # this request only: the node stays in routing
                            raise RequestAborted(f"decode node's engine failed request {rid}; see its log")
                        # vLLM's load-failure path ("fail" policy): this request only; the coordinator
                        # can prefill it again.
                        raise KVUnavailable(f"KV transfer from {request.handle.address} failed for request {rid}; "
                                            "see the decode node's log")
                    if first and comp.token_ids:
                        first = False
                        if run is not None:
                            run.uncached_tokens = len(prompt) - (out.num_cached_tokens or 0)
                            prefilling.close()
                            LOCAL_PREFILLS.inc()
                            logger.info("request %s: prefilled %d tokens here (%d cached) in %.3f s", rid,
                                        len(prompt), out.num_cached_tokens or 0, time.perf_counter() - t0)
                        else:
                            KV_WAIT_SECONDS.observe(time.perf_counter() - t0)
                            if out.num_cached_tokens is not None:
                                logger.info("request %s: %d prompt tokens arrived as KV", rid, out.num_cached_tokens)
                    # DELTA outputs: the new tokens; timed on the engine's clock
                    self.perf.decode_output(rid, len(comp.token_ids), EngineClock.of(out))
                    if out.finished:  # out of the batch now, not once its last message is written
                        self.perf.decode_ended(rid)
                    yield pb.DecodeResponse(token_ids=list(comp.token_ids), finish_reason=comp.finish_reason or "",
                                            stop_reason=str(comp.stop_reason) if comp.stop_reason is not None else "")
            finally:
                self.perf.decode_ended(rid)


def add_servicer(server: grpc.aio.Server, engine: EngineHost, perf: NodePerf) -> NodeCallsServicer:
    """The DecodeNode service, and the NodeCalls service carrying its calls as messages (returned:
    the node closes its streams when it stops)."""
    servicer = DecodeServicer(engine, perf)
    pb_grpc.add_DecodeNodeServicer_to_server(servicer, server)
    return add_calls_servicer(server, decode=servicer)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DecodeNode"].full_name
