"""One request's path through the cluster, shared by the gRPC and HTTP front ends.

  prepare: validate + tokenize (bad input costs no engine work)
  prefill: pick a prefill node -> Prefill -> first token, streamed at once (TTFT)
  decode:  pick a decode node -> Decode(prompt + first token, KV handle) -> tokens
  finish:  stop strings, EOS and length end it; a cancel or failure releases the
           prefill node's held blocks so nothing leaks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import grpc

from tandem.errors import InvalidRequest, NodeFailed, error_from_grpc
from tandem.logs import log_prompts_enabled
from tandem.proto import tandem_pb2 as pb
from tandem.sampling import Sampling, to_proto

from . import metrics as m
from .router import NodeClient, Router
from .textcodec import TextCodec

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 1 << 20
MAX_REQUEST_ID_CHARS = 128


@dataclass
class Prepared:
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    received: float = field(default_factory=time.perf_counter)


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str


@dataclass
class FinishEvent:
    reason: str
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_node: str = ""
    decode_node: str = ""


Event = TokenEvent | FinishEvent


class StopMatcher:
    """Finds stop strings in streamed text, holding back what could still become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop string that matched or None)."""
        if not self.stops:
            return delta, None
        self._pending += delta
        hits = [(self._pending.find(s), s) for s in self.stops if s in self._pending]
        if hits:
            pos, stop = min(hits)
            out, self._pending = self._pending[:pos], ""
            return out, stop
        cut = max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, None

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class Pipeline:
    def __init__(self, router: Router, codec: TextCodec, max_model_len: Callable[[], int],
                 served_model: str, prefill_timeout_s: float = 300.0) -> None:
        self.router = router
        self.codec = codec
        self.max_model_len = max_model_len
        self.served_model = served_model
        self.prefill_timeout_s = prefill_timeout_s
        self._background: set[asyncio.Task[None]] = set()

    # prepare ----------------------------------------------------------------
    def prepare(self, *, request_id: str, text: str | None, token_ids: list[int] | None,
                sampling: Sampling, model: str = "") -> Prepared:
        if model and model != self.served_model:
            raise InvalidRequest(f"unknown model {model!r}; this cluster serves {self.served_model!r}")
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
        if text is not None:
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidRequest(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
            ids = self.codec.encode(text) if text else []
        else:
            ids = list(token_ids or [])
            self.codec.check_ids(ids)
        if not ids:
            raise InvalidRequest("empty prompt")
        limit = self.max_model_len()
        if len(ids) >= limit:
            raise InvalidRequest(f"prompt is {len(ids)} tokens; the model's context is {limit} tokens")
        sampling.validate(len(ids), limit)
        return Prepared(request_id or f"req-{uuid.uuid4().hex[:16]}", ids, sampling)

    # run --------------------------------------------------------------------
    async def run(self, req: Prepared) -> AsyncIterator[Event]:
        s = req.sampling
        prefill_node = self.router.pick("prefill")
        decode_node = self.router.pick("decode") if s.max_tokens > 1 else None
        m.RUNNING.inc()
        m.PROMPT_TOKENS.inc(len(req.prompt_ids))
        status = "error"
        with ExitStack() as reserved:
            if decode_node is not None:
                # Count the decode node as busy from the moment it is chosen, so that
                # requests arriving together do not all pick the same idle node.
                reserved.enter_context(self.router.track(decode_node))
            try:
                async for ev in self._run(req, prefill_node, decode_node):
                    if isinstance(ev, FinishEvent):
                        status = ev.reason
                    yield ev
            except asyncio.CancelledError:
                status = "cancelled"
                raise
            finally:
                m.RUNNING.dec()
                m.REQUESTS.labels(status).inc()

    async def _run(self, req: Prepared, pnode: NodeClient, dnode: NodeClient | None) -> AsyncIterator[Event]:
        rid, s = req.request_id, req.sampling
        detok = self.codec.detokenizer()
        stops = StopMatcher(s.stop)
        m.QUEUE.observe(time.perf_counter() - req.received)

        t_call = time.perf_counter()
        with self.router.track(pnode):
            try:
                pre = await pnode.stub.Prefill(  # type: ignore[attr-defined]
                    pb.PrefillRequest(request_id=rid, prompt_token_ids=req.prompt_ids,
                                      sampling=to_proto(s, pb.SamplingParams), hold_kv=dnode is not None),
                    timeout=self.prefill_timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise error_from_grpc(exc.code(), exc.details() or "", f"prefill node {pnode.record.node_id}") from exc
        m.PREFILL.observe(time.perf_counter() - t_call)
        handle = pre.handle if pre.HasField("handle") else None
        owned = handle is not None  # we must release it unless decode consumes it

        out = FinishEvent(reason="", prompt_tokens=len(req.prompt_ids), completion_tokens=1,
                          prefill_s=pre.prefill_s, prefill_node=pnode.record.node_id)
        try:
            first = pre.first_token
            text, stop = stops.feed(detok.add([first]))
            now = time.perf_counter()
            out.ttft_s = now - req.received
            m.TTFT.observe(out.ttft_s)
            m.GENERATION_TOKENS.inc()
            last_token_at = now
            yield TokenEvent([first], text)

            if stop is not None:
                out.reason, out.stop_reason = "stop", stop
            elif pre.finish_reason == "stop" or dnode is None:
                out.reason = pre.finish_reason or "length"
            else:
                out.decode_node = dnode.record.node_id
                t_dec = time.perf_counter()
                call = dnode.stub.Decode(pb.DecodeRequest(  # type: ignore[attr-defined]
                    request_id=rid, prompt_token_ids=[*req.prompt_ids, first],
                    sampling=to_proto(s.remaining(1), pb.SamplingParams), handle=handle))
                owned = False
                try:
                    async for msg in call:
                        ids = list(msg.token_ids)
                        if ids:
                            text, stop = stops.feed(detok.add(ids))
                            now = time.perf_counter()
                            m.ITL.observe(now - last_token_at)
                            m.GENERATION_TOKENS.inc(len(ids))
                            last_token_at = now
                            out.completion_tokens += len(ids)
                            yield TokenEvent(ids, text)
                        if stop is not None:
                            out.reason, out.stop_reason = "stop", stop
                            call.cancel()
                            break
                        if msg.finish_reason:
                            out.reason = msg.finish_reason
                except grpc.aio.AioRpcError as exc:
                    owned = True  # it may never have fetched: free the blocks now
                    raise error_from_grpc(exc.code(), exc.details() or "",
                                          f"decode node {dnode.record.node_id}") from exc
                except BaseException:
                    call.cancel()
                    owned = True
                    raise
                out.decode_s = time.perf_counter() - t_dec
                if not out.reason:
                    raise NodeFailed(f"decode node {dnode.record.node_id} ended the stream without a finish reason")
            tail = stops.flush() if stop is None else ""
            if tail:
                yield TokenEvent([], tail)
            out.e2e_s = time.perf_counter() - req.received
            m.E2E.observe(out.e2e_s)
            if out.completion_tokens > 1:
                m.TPOT.observe((last_token_at - req.received - out.ttft_s) / (out.completion_tokens - 1))
            logger.info("request %s: %s after %d tokens (ttft %.3f s, e2e %.3f s, prefill %s, decode %s)",
                        rid, out.reason, out.completion_tokens, out.ttft_s, out.e2e_s,
                        out.prefill_node, out.decode_node or "-")
            if log_prompts_enabled():
                logger.info("request %s: prompt %r -> output %r", rid,
                            self.codec.tok.decode(req.prompt_ids), self.codec.tok.decode(detok.ids))
            yield out
        finally:
            if owned and handle is not None:
                self._release_later(rid, pnode, handle)

    def _release_later(self, rid: str, node: NodeClient, handle: pb.KVHandle) -> None:
        async def release() -> None:
            try:
                await node.stub.Release(pb.ReleaseRequest(request_id=rid, handle=handle), timeout=10)  # type: ignore[attr-defined]
                logger.info("request %s: released its KV blocks on %s", rid, node.record.node_id)
            except grpc.aio.AioRpcError as exc:
                logger.warning("request %s: could not release KV on %s (the lease frees it): %s",
                               rid, node.record.node_id, exc.details())

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
