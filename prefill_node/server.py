"""PrefillNode servicer: run the prompt for one token, hand back the first token and a KV handle.

A request's life here: Prefill -> engine (max_tokens=1, kv "produce") -> the
engine holds the blocks under a lease -> the decode node pulls them and acks,
or Release frees them, or the lease runs out.

With ``--colocate`` on the coordinator, a request may instead be served whole
here (a Decode call with ``prefill_here``, decode_node/server.py's servicer):
the engine prefills and decodes it like a colocated vLLM, and no KV moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import grpc
from prometheus_client import Counter, Gauge, Histogram

from tandem.errors import InvalidRequest, grpc_status_of
from tandem.kvtransfer.handle import PRODUCE, TransferHandle
from tandem.kvtransfer.capability import CapabilityRefused
from tandem.kvtransfer.transport import TransferError
from tandem.node.calls import NodeCallsServicer, add_calls_servicer
from tandem.node.engine import EngineHost
from tandem.node.handles import MAX_REQUEST_ID_CHARS, handle_from_proto, handle_to_proto
from tandem.node.perf import NodePerf, engine_prefill_s
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.sampling import from_proto

logger = logging.getLogger(__name__)

PREFILLS = Counter("tandem_prefill_requests", "Prefill requests by outcome", ["outcome"])
PREFILL_INFLIGHT = Gauge("tandem_prefill_inflight", "Prefill requests in flight on this node")
PREFILL_SECONDS = Histogram("tandem_prefill_seconds", "Time to run one prefill on this node",
                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PROMPT_TOKENS = Counter("tandem_prefill_prompt_tokens", "Prompt tokens of the prefills this node ran")
CACHED_TOKENS = Counter("tandem_prefill_cached_tokens", "Prompt tokens a prefill found computed already "
                        "(the engine's own prefix cache or the node's KV store) instead of computing them")
HANDLES_RELEASED = Counter("tandem_kv_handles_released", "KV handles released without a fetch")


class PrefillServicer(pb_grpc.PrefillNodeServicer):
    def __init__(self, engine: EngineHost, perf: NodePerf) -> None:
        self.engine = engine
        self.perf = perf

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        try:
            return await self.serve(request)
        except Exception as exc:
            await context.abort(*grpc_status_of(exc))
            raise  # (abort raises)

    async def serve(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        """One prefill, counted and logged: for the Prefill RPC and for a call on a NodeCalls
        stream (tandem/node/calls.py). Raises what it failed with; the caller makes it a status."""
        rid = request.request_id
        t0 = time.perf_counter()
        with PREFILL_INFLIGHT.track_inprogress():
            try:
                resp = await self._prefill(request)
            except asyncio.CancelledError:
                PREFILLS.labels("cancelled").inc()
                logger.info("request %s: prefill cancelled by the caller", rid)
                raise
            except Exception as exc:
                PREFILLS.labels("error").inc()
                logger.warning("request %s: prefill failed: %s", rid, grpc_status_of(exc)[1])
                raise
        PREFILLS.labels("ok").inc()
        PREFILL_SECONDS.observe(time.perf_counter() - t0)
        return resp

    async def _prefill(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        if not rid or len(rid) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(f"request_id is required (at most {MAX_REQUEST_ID_CHARS} characters)")
        if not prompt:
            raise InvalidRequest("empty prompt")
        sampling = from_proto(request.sampling)
        one = replace(sampling, max_tokens=1, min_tokens=min(sampling.min_tokens, 1))
        one.validate(len(prompt), self.engine.max_model_len)
        t0 = time.perf_counter()
        final = None
        with self.perf.prefill(len(prompt)) as run:
            async for out in self.engine.generate(rid, prompt, one,
                                                  {"tandem": PRODUCE} if request.hold_kv else None,
                                                  priority=request.priority):
                final = out
            if final is None or not final.outputs or not final.outputs[0].token_ids:
                raise RuntimeError("the engine returned no token")
            run.uncached_tokens = len(prompt) - (final.num_cached_tokens or 0)
            run.engine_s = engine_prefill_s(final)
        PROMPT_TOKENS.inc(len(prompt))
        CACHED_TOKENS.inc(final.num_cached_tokens or 0)
        comp = final.outputs[0]
        resp = pb.PrefillResponse(
            first_token=comp.token_ids[0],
            finish_reason=comp.finish_reason or "",
            num_cached_tokens=final.num_cached_tokens or 0,
            prefill_s=time.perf_counter() - t0,
        )
        if request.hold_kv:
            params = final.kv_transfer_params
            if not params:
                raise RuntimeError("the engine held no KV blocks for this request")
            resp.handle.CopyFrom(handle_to_proto(TransferHandle.from_params(params)))
        logger.info("request %s: prefilled %d tokens (%d cached) in %.3f s%s", rid, len(prompt),
                    resp.num_cached_tokens, resp.prefill_s,
                    f" ({run.engine_s:.3f} s from its first step)" if run.engine_s is not None else "")
        return resp

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        h = request.handle
        if h.engine_id != self.engine.engine_id:
            # Held by an earlier process on this address, or not by this node at all: nothing here to free.
            await context.abort(grpc.StatusCode.NOT_FOUND if h.engine_id else grpc.StatusCode.INVALID_ARGUMENT,
                                f"this node's engine is {self.engine.engine_id}; the handle names "
                                f"{h.engine_id[:80] or 'none'}")
        try:
            await self.engine.release_held(h.remote_request_id, h.engine_id, handle_from_proto(h))
        except CapabilityRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"release refused: {exc}")
        except (OSError, TransferError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"release failed: {exc}")
        HANDLES_RELEASED.inc()
        logger.info("request %s: KV handle released", request.request_id)
        return pb.ReleaseResponse()


def add_servicer(server: grpc.aio.Server, engine: EngineHost, perf: NodePerf,
                 whole: pb_grpc.DecodeNodeServicer) -> NodeCallsServicer:
    """The PrefillNode service; ``whole``, the DecodeNode service for the requests the coordinator
    serves whole here (``--colocate``: prefill and decode on this node, no KV moved; made by the
    caller with ``handles=False``, so a KV handle is refused); and the NodeCalls service carrying
    both as messages (returned: the node closes its streams when it stops)."""
    servicer = PrefillServicer(engine, perf)
    pb_grpc.add_PrefillNodeServicer_to_server(servicer, server)
    pb_grpc.add_DecodeNodeServicer_to_server(whole, server)
    # (tandem/cli.py makes ``whole``: decode_node/server.py's servicer, which this module does not import)
    return add_calls_servicer(server, prefill=servicer, decode=whole)  # type: ignore[arg-type]


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PrefillNode"].full_name
