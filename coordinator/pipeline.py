"""One request's path through the cluster, shared by the gRPC and HTTP front ends.

  prepare: validate + tokenize (bad input costs no engine work); mint the request's
           own id (the client's id is kept for logs and the response only)
  admit:   predict its TTFT and TPOT on every node; start on the best pair, or refuse
           it (RESOURCE_EXHAUSTED / 429) when none meets its SLO (admission.py)
  prefill: Prefill on that node -> first token, streamed at once (TTFT);
           a prefill node that fails is retried once on another node. Or, when
           admission predicted it faster (conditional disaggregation), the decode
           node prefills it itself: Decode(prefill_here), no KV handle
  decode:  pick a decode node -> Decode(prompt + first token, KV handle) -> tokens
  migrate: a decode node that fails or stalls mid-stream does not end the request:
           prompt + every token already sent is prefilled again and handed to
           another decode node (a new *leg*); the client sees one unbroken stream
  finish:  stop strings, EOS and length end it; a cancel or failure releases the
           prefill node's held blocks so nothing leaks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, aclosing
from typing import Any

import grpc

from tandem.errors import DeadlineExceeded, InvalidRequest, Rejected
from tandem.proto import tandem_pb2 as pb
from tandem.sampling import Sampling, to_proto

from . import metrics as m
from .admission import Admission, Plan, Slo
from .estimates import beside_whole_s
from .nodecalls import NodeCallFailed, Watchdog, stream_ended_early
from .prefillq import NodeGone
from .nodeclient import NodeClient
from .router import Router
from .request import Event, FinishEvent, PipelineConfig, Prepared, Progress, TokenEvent, account
from .textcodec import INLINE_CHARS, StopMatcher, TextCodec
from .traffic import BatchQueue, Quotas, check_priority, check_tenant

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 1 << 20
FINISHED = ("length", "stop")  # the finish reasons that end a request; any other is the node's failure
MAX_REQUEST_ID_CHARS = 128


class Pipeline:
    def __init__(self, router: Router, codec: TextCodec, max_model_len: Callable[[], int],
                 served_model: str, cfg: PipelineConfig | None = None, admission: Admission | None = None,
                 quotas: Quotas | None = None, batch_queue: BatchQueue | None = None) -> None:
        self.router = router
        self.admission = admission or Admission(router, "off")
        self.quotas = quotas or Quotas()
        self.batch = batch_queue or BatchQueue(self.admission)
        self.codec = codec
        codec.detokenizer()  # (which kind streams get is worked out now, not on the first request)
        self.max_model_len = max_model_len
        self.served_model = served_model
        self.cfg = cfg or PipelineConfig()
        self.watch = Watchdog(router, self.cfg.stall_s)
        self._background: set[asyncio.Task[None]] = set()

    # prepare ----------------------------------------------------------------
    def prepare(self, *, request_id: str, text: str | None, token_ids: list[int] | None,
                sampling: Sampling, model: str = "", timeout_s: float | None = None,
                slo: Slo | None = None, priority: str = "", tenant: str = "") -> Prepared:
        self._check_names(model, request_id)
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
        # Our own id, whatever the client sent: two clients using the same id never touch
        # each other's requests (engine aborts, KV holds and releases are keyed by it).
        rid = f"req-{uuid.uuid4().hex[:16]}"
        deadline = time.perf_counter() + timeout_s if timeout_s is not None else None
        if request_id:
            logger.info("request %s: client id %r", rid, request_id)
        return Prepared(rid, ids, sampling, client_id=request_id, deadline=deadline, slo=slo or Slo(),
                        priority=check_priority(priority), tenant=check_tenant(tenant))

    def check_model(self, model: str) -> None:
        """An empty name means the served model."""
        if model and model != self.served_model:
            raise InvalidRequest(f"unknown model {model!r}; this cluster serves {self.served_model!r}")

    def _check_names(self, model: str, request_id: str) -> None:
        self.check_model(model)
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")

    async def prepare_async(self, *, text: str | None, **kw: Any) -> Prepared:
        """``prepare``, with a long text tokenized on a worker thread instead of the event loop
        (after the checks that cost nothing; its time comes out of the request's timeout)."""
        if text and INLINE_CHARS < len(text) <= MAX_PROMPT_CHARS:
            self._check_names(kw.get("model", ""), kw.get("request_id", ""))
            t0 = time.perf_counter()
            kw["token_ids"] = await self.codec.encode_async(text)
            if kw.get("timeout_s") is not None:
                kw["timeout_s"] = max(0.0, kw["timeout_s"] - (time.perf_counter() - t0))
            text = None
        return self.prepare(text=text, **kw)

    # run --------------------------------------------------------------------
    async def run(self, req: Prepared) -> AsyncIterator[Event]:
        cost = len(req.prompt_ids) + req.sampling.max_tokens
        try:
            # Paid first (a tenant over its quota holds no place in the batch queue), paid back
            # when admission refuses: a refused request uses nothing.
            self.quotas.charge(req.tenant, cost)
            try:
                if req.priority == "batch":
                    left = None if req.deadline is None else req.deadline - time.perf_counter()
                    plan = await self.batch.admit(req.request_id, len(req.prompt_ids), req.sampling.max_tokens,
                                                  req.slo, left)
                else:
                    plan = self.admission.plan(req.request_id, len(req.prompt_ids), req.sampling.max_tokens,
                                               req.slo, arrival=req.received, prompt_ids=req.prompt_ids)
            except BaseException:
                self.quotas.refund(req.tenant, cost)
                raise
        except Rejected:
            m.REQUESTS.labels("rejected").inc()
            m.SLO_MET.labels(self._unmet(req)).inc()
            raise
        except (asyncio.CancelledError, GeneratorExit):  # gone while a batch request waited
            m.REQUESTS.labels("cancelled").inc()
            self._count_cancelled(req, got_token=False)
            raise
        except Exception:
            m.REQUESTS.labels("error").inc()
            m.SLO_MET.labels(self._unmet(req)).inc()
            raise
        req.plan = plan
        m.RUNNING.inc()
        m.PROMPT_TOKENS.inc(len(req.prompt_ids))
        status = "error"
        got_token = False
        produced = 0
        try:
            # aclosing: a client that goes away closes _serve here and now (its decode call is
            # cancelled, its KV hold released), not whenever the generator is collected.
            async with aclosing(self._serve(req, plan)) as events:
                async for ev in events:
                    if isinstance(ev, FinishEvent):
                        status = ev.reason
                    elif isinstance(ev, TokenEvent) and ev.token_ids:
                        got_token = True
                        produced += len(ev.token_ids)
                    yield ev
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            # What it reserved and did not produce goes back (a chat request with no limit
            # reserves the rest of the context).
            self.quotas.refund(req.tenant, max(0, req.sampling.max_tokens - produced))
            m.RUNNING.dec()
            m.REQUESTS.labels(status).inc()
            if status == "cancelled":
                self._count_cancelled(req, got_token)
            else:
                m.SLO_MET.labels(req.slo_met or self._unmet(req)).inc()

    def _unmet(self, req: Prepared) -> str:
        """How a request that was not served to the end counts against its objectives."""
        slo = req.slo.over(self.admission.default_slo)
        return "none" if slo.ttft_s is None and slo.tpot_s is None else "no"

    def _count_cancelled(self, req: Prepared, got_token: bool) -> None:
        """A request its client gave up on counts against the objectives only when it had
        already missed one: no first token by its TTFT objective (a client timing out an
        overloaded cluster); otherwise the choice was the client's."""
        slo = req.slo.over(self.admission.default_slo)
        if not got_token and slo.ttft_s is not None and time.perf_counter() - req.received > slo.ttft_s:
            m.SLO_MET.labels("no").inc()

    async def _serve(self, req: Prepared, plan: Plan) -> AsyncIterator[Event]:
        """Legs until the request ends: each one prefills what the client has seen so far
        (the prompt, then also every token sent), then decodes on one decode node. The first
        leg starts on admission's choice (``plan``); a migrated leg picks by load alone."""
        rid, s = req.request_id, req.sampling
        prog = Progress(req, self.codec.detokenizer(), StopMatcher(s.stop))
        out = prog.out
        out.predicted_ttft_s, out.predicted_tpot_s = plan.ttft_s or 0.0, plan.tpot_s or 0.0
        leg = 0
        kv_failed_from: set[str] = set()  # prefill nodes whose KV a decode node could not fetch

        def to_come() -> int:  # its output tokens still to come, at most (admission looks ahead with them)
            return s.max_tokens - len(prog.sent)

        tpot_s = req.slo.over(self.admission.default_slo).tpot_s

        def budget(now: float) -> tuple[float, int] | None:
            """What it has left of its TPOT objective: the time its remaining tokens may take and how
            many (as if it runs to max_tokens). None before its first token (a wait then is its
            TTFT's) and after its last."""
            n, done = s.max_tokens, len(prog.sent)
            if not done or done >= n:
                return None
            return tpot_s * (n - 1) - (now - req.received - out.ttft_s), n - done  # type: ignore[operator]

        stream_budget = budget if tpot_s is not None else None

        while not out.reason:
            left = s.remaining(len(prog.sent))
            context = [*req.prompt_ids, *prog.sent]
            avoid = {out.decode_node} if out.decode_node else set()
            first = plan.decode if leg == 0 and plan.decode and self.router.routable(plan.decode) else None
            # Conditional disaggregation: admission chose to prefill on the decode node itself; or
            # the cluster has no prefill pool (P:D 0:N), and every leg prefills where it decodes.
            local = (first is not None and plan.local) or (self.admission.local and self.router.pool_absent("prefill"))
            with ExitStack() as legs_end:
                dnode = pnode = handle = None
                # A reserved decode node counts this stream's prompt as coming (admission's KV room)
                # from before its prefill elsewhere until its first token there: by then its blocks
                # are the node's, in the node's reports.
                awaiting = legs_end.enter_context(ExitStack())
                if local or left.max_tokens > 1:
                    # Reserved before the prefill, so that requests arriving together spread
                    # over the pool (and an empty decode pool costs no prefill work).
                    dnode = legs_end.enter_context(self.router.track(first or await self.router.acquire("decode", avoid),
                                                                     len(context), to_come, stream_budget))
                if leg == 0 and local:  # its call goes now (a prefill node's: after its turn there)
                    out.dispatch_s = time.perf_counter() - req.received
                    m.QUEUE.observe(out.dispatch_s)
                consumed = False  # a completed decode fetched (and so freed) the handle's blocks
                try:
                    if local:
                        assert dnode is not None
                        out.prefill_node, out.local_prefill = dnode.node_id, True
                        out.colocated = dnode.record.role == "prefill"
                        prompt, sampling = context, left
                    else:
                        if dnode is not None:
                            awaiting.enter_context(self.router.track_awaiting(dnode, len(context)))
                        pre, pnode = await self._prefill(req, context, left, hold_kv=dnode is not None, leg=leg,
                                                         prefer_not=kv_failed_from,
                                                         first=plan.prefill if leg == 0 else None)
                        # Known to the finally below before anything else can fail or wait.
                        handle = pre.handle if pre.HasField("handle") else None
                        if dnode is not None and not self.router.routable(dnode):
                            # It failed, began draining or left while the prompt was prefilled; the
                            # handle serves any decode node.
                            awaiting.close()
                            dnode = legs_end.enter_context(self.router.track(
                                await self.router.acquire("decode", avoid), len(context), to_come, stream_budget))
                            awaiting.enter_context(self.router.track_awaiting(dnode, len(context)))
                        if leg == 0:
                            out.prefill_s, out.prefill_node = pre.prefill_s, pnode.node_id
                            out.dispatch_s = req.prefill_sent_at - req.received
                            m.QUEUE.observe(out.dispatch_s)
                            out.prefill_call_s = time.perf_counter() - req.prefill_sent_at
                        ev, stop = prog.take([pre.first_token])
                        if stop is not None:
                            out.reason, out.stop_reason = "stop", stop
                        elif pre.finish_reason == "stop" or dnode is None:
                            out.reason = pre.finish_reason or "length"
                        ev.last = bool(out.reason)
                        yield ev
                        prompt, sampling = [*context, pre.first_token], left.remaining(1)
                    if not out.reason:
                        assert dnode is not None
                        out.decode_node = dnode.node_id
                        t_dec = time.perf_counter()
                        prefilling = legs_end.enter_context(ExitStack())  # a local prefill, until its first token
                        if local:  # its work there: less the prefix admission credited the node with
                            # (a later leg computes it all: the node that held its prefix failed)
                            held, run_s = (plan.prefill_held, plan.prefill_run_s) if leg == 0 else (0, 0.0)
                            prefilling.enter_context(self.router.track_prefill(dnode, max(1, len(context) - held),
                                                                               run_s))
                        started = False  # its tokens came on this leg
                        try:
                            async with aclosing(self._decode(req, dnode, prompt, sampling, handle, leg,
                                                             local)) as stream:
                                async for msg in stream:
                                    ids = list(msg.token_ids)
                                    stop = None
                                    if ids:
                                        if not started:
                                            started = True
                                            if local and not prog.sent:
                                                out.prefill_s = out.prefill_call_s = time.perf_counter() - t_dec
                                            prefilling.close()
                                            awaiting.close()
                                        ev, stop = prog.take(ids)
                                        ev.last = stop is not None or msg.finish_reason in FINISHED
                                        yield ev
                                    if stop is not None:
                                        out.reason, out.stop_reason = "stop", stop
                                        break
                                    if msg.finish_reason:
                                        if msg.finish_reason not in FINISHED:
                                            # "abort": the node's engine ended it (shutting down)
                                            raise stream_ended_early(dnode, msg.finish_reason)
                                        out.reason = msg.finish_reason
                            if not out.reason:
                                raise stream_ended_early(dnode)
                            consumed = True  # tokens came, so the decode side fetched the blocks
                            out.decode_s += time.perf_counter() - t_dec
                        except NodeCallFailed as failed:
                            if out.reason:
                                # Its finish had come (with its last tokens, which the client may
                                # not have been sent yet): the stream failing as it closed (the
                                # client's deadline, the node going away) changes nothing for it.
                                logger.info("request %s: finished; its stream then failed: %s", rid, failed.error)
                                consumed = True
                                out.decode_s += time.perf_counter() - t_dec
                                continue
                            self._migrate_or_raise(req, prog, failed, leg)
                            if failed.cause == "aborted" and pnode is not None:
                                # The KV did not arrive: the path from that prefill node may be
                                # what failed, so the next leg prefills elsewhere if it can.
                                kv_failed_from.add(pnode.node_id)
                            leg += 1
                finally:
                    if handle is not None and pnode is not None and not consumed:
                        self._release_later(rid, pnode, handle)
        out.migrations = leg
        tail = ""
        if not out.stop_reason:  # (stop_reason: a stop string matched, and what followed it is not sent)
            # the text the detokenizer held for an unfinished last character, and the stop matcher's
            held, stop = prog.stops.feed(prog.detok.flush())
            if stop is not None:
                out.reason, out.stop_reason, tail = "stop", stop, held
            else:
                tail = held + prog.stops.flush()
        if tail:
            yield TokenEvent([], tail, last=True)
        account(req, plan, prog, leg, self.router, self.admission.default_slo, self.codec.tok.decode)
        yield out

    def _migrate_or_raise(self, req: Prepared, prog: Progress, failed: NodeCallFailed, leg: int) -> None:
        """Go on to another leg when the failure allows it and the limit is not reached."""
        self._raise_if_client_gave_up(req, failed)
        if failed.node_failed:
            self.router.mark_down(failed.node, str(failed.error))
        if not failed.retryable or leg >= self.cfg.migration_limit:
            if failed.retryable:
                logger.warning("request %s: not migrated again (limit %d): %s", req.request_id,
                               self.cfg.migration_limit, failed.error)
            raise failed.error from failed
        m.MIGRATIONS.labels(failed.node.record.role, failed.cause).inc()  # (a prefill node serving it whole: --colocate)
        logger.warning("request %s: migrating after %d tokens sent: %s", req.request_id, len(prog.sent),
                       failed.error)

    @staticmethod
    def _raise_if_client_gave_up(req: Prepared, failed: NodeCallFailed) -> None:
        """A call cut short by the client's own deadline says nothing about the node: no retry,
        no migration, the node stays in routing."""
        if req.deadline is not None and time.perf_counter() >= req.deadline - 0.05:
            raise DeadlineExceeded(f"the client's deadline passed ({failed.error})") from failed

    # node calls ---------------------------------------------------------------
    def _timeout(self, req: Prepared, limit_s: float) -> float:
        """A call's deadline: its own limit, or less when the client gives up sooner."""
        if req.deadline is None:
            return limit_s
        return max(0.001, min(limit_s, req.deadline - time.perf_counter()))

    async def _prefill(self, req: Prepared, context: list[int], sampling: Sampling, hold_kv: bool,
                       leg: int, prefer_not: set[str], first: NodeClient | None = None,
                       ) -> tuple[pb.PrefillResponse, NodeClient]:
        """Prefill ``context`` for one token on ``first`` (when still routable) or the least loaded
        node, in its turn there (prefillq.py); a failed node is retried once on another, and one
        that leaves routing while the request waits for its turn is simply replaced. Nodes in
        ``prefer_not`` are picked only when no other is available."""
        avoid: set[str] = set(prefer_not)
        order = self.admission.order
        ttft_s = req.slo.over(self.admission.default_slo).ttft_s
        attempt = 0
        while True:
            if attempt == 0 and first is not None and self.router.routable(first):
                node = first
            else:
                node = await self.router.acquire("prefill", avoid)
            # Its prefill's work there: less the prefix the node's KV store holds (what admission
            # credited it with), so the requests queued behind it are predicted right.
            plan = req.plan
            held = plan.prefill_held if plan is not None and node is plan.prefill and leg == 0 else 0
            work = max(1, len(context) - held)
            # A migrated leg: its client is mid-stream, it goes first.
            turn = order.entry(node, req.request_id, work, req.received, ttft_s, urgent=leg > 0,
                               cached=len(context) - work, beside_s=beside_whole_s(node, work))

            def orphaned(resp: pb.PrefillResponse, node: NodeClient = node) -> None:
                # Answered, but the request was cancelled meanwhile: nobody will fetch its blocks.
                if resp.HasField("handle"):
                    self._release_later(req.request_id, node, resp.handle)

            call = None
            try:
                with self.router.track(node, work):
                    async with order.turn(node, turn, req.deadline):
                        with self.router.track_sent(node, work):
                            call = node.calls.Prefill(  # type: ignore[attr-defined]
                                pb.PrefillRequest(request_id=f"{req.request_id}-p{leg}.{attempt}",
                                                  prompt_token_ids=context,
                                                  sampling=to_proto(sampling, pb.SamplingParams), hold_kv=hold_kv,
                                                  priority=order.engine_priority(node, turn)),
                                timeout=self._timeout(req, self.cfg.prefill_timeout_s))
                            t0 = req.prefill_sent_at = time.perf_counter()
                            resp = await self.watch.wait(call, node, orphaned)
            except NodeGone as gone:
                logger.info("request %s: %s; another node", req.request_id, gone)
                avoid.add(node.node_id)
                first = None
                continue
            except NodeCallFailed as failed:
                self._raise_if_client_gave_up(req, failed)
                if failed.node_failed:
                    self.router.mark_down(node, str(failed.error))
                if attempt == 1 or not failed.retryable:
                    raise failed.error from failed
                m.RETRIES.inc()
                logger.warning("request %s: prefill failed, retrying on another node: %s", req.request_id,
                               failed.error)
                avoid.add(node.node_id)
                attempt += 1
                continue
            finally:
                if call is not None:
                    _cancel(call)
            m.PREFILL.observe(time.perf_counter() - t0)
            return resp, node

    def _decode(self, req: Prepared, node: NodeClient, prompt: list[int], sampling: Sampling,
                handle: pb.KVHandle | None, leg: int, local: bool = False) -> AsyncIterator[pb.DecodeResponse]:
        """Stream a decode: from ``handle``'s KV, or (``local``) prefilling ``prompt`` on the node.
        Closing the stream cancels the call."""
        call = node.calls.Decode(  # type: ignore[attr-defined]
            pb.DecodeRequest(request_id=f"{req.request_id}-d{leg}", prompt_token_ids=prompt,
                             sampling=to_proto(sampling, pb.SamplingParams), handle=handle, prefill_here=local,
                             stream_interval=self.cfg.stream_interval),
            timeout=self._timeout(req, self.cfg.decode_timeout_s))
        return self.watch.stream(call, node)

    def _release_later(self, rid: str, node: NodeClient, handle: pb.KVHandle) -> None:
        async def release() -> None:
            try:
                await node.stub.Release(pb.ReleaseRequest(request_id=rid, handle=handle),  # type: ignore[attr-defined]
                                        timeout=self.cfg.release_timeout_s)
                logger.info("request %s: released its KV blocks on %s", rid, node.node_id)
            except grpc.aio.AioRpcError as exc:
                logger.warning("request %s: could not release KV on %s (the lease frees it): %s",
                               rid, node.node_id, exc.details())

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _cancel(call: object) -> None:
    cancel = getattr(call, "cancel", None)
    if cancel is not None:
        cancel()
