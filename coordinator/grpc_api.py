"""The Coordinator gRPC service: Generate (server streaming) and ClusterStatus."""

from __future__ import annotations

import logging
import time
from contextlib import aclosing

import grpc

from tandem.errors import InvalidRequest, TandemError, grpc_status_of, grpc_trailers_of
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.sampling import from_proto

from .admission import Slo
from .auth import ApiKeys
from .pipeline import Pipeline
from .request import FinishEvent, TokenEvent

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 << 20


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, pipeline: Pipeline, cluster: str, keys: ApiKeys | None = None) -> None:
        self.pipeline = pipeline
        self.cluster = cluster
        self.keys = keys or ApiKeys(env="")

    def _tenant(self, context: grpc.aio.ServicerContext, claimed: str) -> str:
        auth = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        return self.keys.tenant(auth if isinstance(auth, str) else None, claimed)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # context.write() style, not an async generator, so that a client's cancel always
        # lands here and closes the pipeline (which cancels the decode call, frees KV).
        held: pb.GenerateResponse | None = None
        try:
            tenant = self._tenant(context, request.tenant)
            if request.ByteSize() > MAX_REQUEST_BYTES:
                raise InvalidRequest(f"request is {request.ByteSize()} bytes; at most {MAX_REQUEST_BYTES} accepted")
            which = request.WhichOneof("prompt")
            if which is None:
                raise InvalidRequest("empty prompt: set text or token_ids")
            prepared = await self.pipeline.prepare_async(
                request_id=request.request_id,
                text=request.text if which == "text" else None,
                token_ids=list(request.token_ids.ids) if which == "token_ids" else None,
                sampling=from_proto(request.sampling if request.HasField("sampling") else None),
                model=request.model,
                timeout_s=context.time_remaining(),
                slo=_slo(request),
                priority=request.priority,
                tenant=tenant,
            )
            rid = prepared.public_id
            # The last tokens wait for the finish (between them: the decode stream's close and the
            # accounting) and go in one message with it: a message less per request. Should the
            # request fail in between, they are sent before its status.
            async with aclosing(self.pipeline.run(prepared)) as events:
                async for ev in events:
                    if isinstance(ev, TokenEvent):
                        if held is None:
                            msg = pb.GenerateResponse(request_id=rid, token_ids=ev.token_ids, text=ev.text)
                        else:  # a stop matcher's tail after them
                            msg = held
                            msg.token_ids.extend(ev.token_ids)
                            msg.text += ev.text
                        held = msg if ev.last else None
                        if held is None:
                            await context.write(msg)
                    elif isinstance(ev, FinishEvent):
                        msg = held or pb.GenerateResponse(request_id=rid)
                        held = None
                        msg.finish.CopyFrom(_finish_pb(ev))
                        await context.write(msg)
        except TandemError as exc:
            await _flush(context, held)
            code, msg = grpc_status_of(exc)
            await context.abort(code, msg, trailing_metadata=grpc_trailers_of(exc))
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            logger.exception("request (client id %r): internal error", request.request_id)
            await _flush(context, held)
            code, msg = grpc_status_of(exc)
            await context.abort(code, msg)

    async def ClusterStatus(self, request: pb.ClusterStatusRequest,
                            context: grpc.aio.ServicerContext) -> pb.ClusterStatusResponse:
        try:
            self._tenant(context, "")
        except TandemError as exc:
            code, msg = grpc_status_of(exc)
            await context.abort(code, msg)
        nodes = []
        for n in sorted(self.pipeline.router.nodes(), key=lambda n: (n.record.role, n.record.node_id)):
            info = pb.NodeInfo(node_id=n.record.node_id, role=n.record.role, grpc_address=n.record.grpc_address,
                               kv_address=n.record.kv_address, model=n.record.model, outstanding=n.outstanding,
                               served=n.served, draining=n.record.draining, down=not n.up, load_age_s=-1.0)
            if n.load is not None:
                info.prefill_queue = len(n.load.prefill_queue)
                info.decode_batch = n.load.decode_batch
                info.perf_samples = sum(f.samples for f in n.load.fits)
                info.load_age_s = time.monotonic() - n.load_at
                info.kv_chunks_disk = sum(1 for t in n.chunks.held.values() if t == "disk")
                info.kv_chunks_ram = len(n.chunks.held) - info.kv_chunks_disk
                info.kv_engine_blocks = len(n.blocks.held)
                info.fits.extend(n.load.fits)
                info.speeds.extend(n.load.speeds)
            nodes.append(info)
        return pb.ClusterStatusResponse(cluster=self.cluster, model=self.pipeline.served_model, nodes=nodes)


async def _flush(context: grpc.aio.ServicerContext, held: pb.GenerateResponse | None) -> None:
    """Tokens held for the finish, sent ahead of the error that came instead (best effort: the
    client may be gone)."""
    if held is not None:
        try:
            await context.write(held)
        except Exception:  # the status that follows is what matters
            pass


def _slo(request: pb.GenerateRequest) -> Slo:
    if not request.HasField("slo"):
        return Slo()
    s = request.slo
    return Slo.from_ms(s.ttft_ms if s.HasField("ttft_ms") else None, s.tpot_ms if s.HasField("tpot_ms") else None,
                       where="slo.")


def _finish_pb(ev: FinishEvent) -> pb.Finish:
    return pb.Finish(
        reason=ev.reason, stop_reason=ev.stop_reason,
        usage=pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens),
        timings=pb.Timings(ttft_s=ev.ttft_s, e2e_s=ev.e2e_s, prefill_s=ev.prefill_s, decode_s=ev.decode_s,
                           prefill_node=ev.prefill_node, decode_node=ev.decode_node,
                           predicted_ttft_s=ev.predicted_ttft_s, predicted_tpot_s=ev.predicted_tpot_s,
                           local_prefill=ev.local_prefill, dispatch_s=ev.dispatch_s,
                           prefill_call_s=ev.prefill_call_s, colocated=ev.colocated),
        migrations=ev.migrations,
    )


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
