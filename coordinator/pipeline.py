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
from typing import Any
from contextlib import ExitStack, aclosing
from dataclasses import dataclass, field

import grpc

from tandem.errors import DeadlineExceeded, InvalidRequest, Rejected
from tandem.logs import log_prompts_enabled
from tandem.proto import tandem_pb2 as pb
from tandem.sampling import Sampling, to_proto

from . import metrics as m
from .admission import Admission, Plan, Slo
from .nodecalls import NodeCallFailed, Watchdog, stream_ended_early
from .prefillq import NodeGone
from .router import NodeClient, Router
from .textcodec import INLINE_CHARS, Detokenizer, StopMatcher, TextCodec
from .traffic import BatchQueue, Quotas, check_priority, check_tenant

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 1 << 20
FINISHED = ("length", "stop")  # the finish reasons that end a request; any other is the node's failure
MAX_REQUEST_ID_CHARS = 128


@dataclass
class Prepared:
    request_id: str  # minted by the coordinator: engines, KV handles and logs use it
    prompt_ids: list[int]
    sampling: Sampling
    client_id: str = ""  # the client's own id, for logs and the response only
    received: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # perf_counter time by which the client gives up, if it said
    slo: Slo = field(default_factory=Slo)  # the request's own; admission fills in the cluster's defaults
    plan: Plan | None = None  # admission's, once run() has started
    priority: str = "interactive"  # or "batch" (traffic.py)
    tenant: str = ""
    prefill_sent_at: float = 0.0  # perf_counter when its latest Prefill call went out
    slo_met: str = ""  # once served to the end: "yes" or "no" (both objectives met), "none" (it had none)

    def plan_headers(self) -> dict[str, str]:
        """What admission predicted and chose, for the HTTP response's headers."""
        out: dict[str, str] = {}
        if self.plan is not None:
            if self.plan.ttft_s is not None:
                out["x-tandem-predicted-ttft-ms"] = f"{self.plan.ttft_s * 1000:.1f}"
            if self.plan.tpot_s is not None:
                out["x-tandem-predicted-tpot-ms"] = f"{self.plan.tpot_s * 1000:.2f}"
            out["x-tandem-prefill"] = "local" if self.plan.local else "disaggregated"
            # The nodes the predictions are for (a retry or migration may move it later).
            prefill = self.plan.decode if self.plan.local else self.plan.prefill
            if prefill is not None:
                out["x-tandem-prefill-node"] = prefill.node_id
            if self.plan.decode is not None:
                out["x-tandem-decode-node"] = self.plan.decode.node_id
        return out

    @property
    def public_id(self) -> str:
        """The id the client sees: its own, or the minted one when it sent none."""
        return self.client_id or self.request_id


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
    migrations: int = 0
    predicted_ttft_s: float = 0.0  # admission's prediction for the nodes it chose (0: none)
    predicted_tpot_s: float = 0.0
    dispatch_s: float = 0.0  # received -> the first prefill (or local decode) call sent: admission, routing, its turn
    prefill_call_s: float = 0.0  # that call, as the coordinator saw it, until the first token came
    local_prefill: bool = False  # its decode node prefilled it (conditional disaggregation)


Event = TokenEvent | FinishEvent


@dataclass
class PipelineConfig:
    prefill_timeout_s: float = 120.0  # one Prefill call
    decode_timeout_s: float = 1800.0  # one Decode stream, start to end
    release_timeout_s: float = 10.0
    stall_s: float = 3.0  # no progress this long: probe the node's health
    migration_limit: int = 2  # times one request may move to another decode node
    stream_interval: int = 1  # tokens per decode message after the first (DecodeRequest.stream_interval)


class _Progress:
    """What the client has been sent so far, across every leg of the request."""

    def __init__(self, req: Prepared, detok: Detokenizer, stops: StopMatcher) -> None:
        self.req = req
        self.detok = detok
        self.stops = stops
        self.sent: list[int] = []
        self.last_token_at = 0.0
        self.out = FinishEvent(reason="", prompt_tokens=len(req.prompt_ids), completion_tokens=0)

    def take(self, ids: list[int]) -> tuple[TokenEvent, str | None]:
        """The event for new tokens, and the stop string they completed (if any)."""
        text, stop = self.stops.feed(self.detok.add(ids))
        now = time.perf_counter()
        if not self.sent:
            self.out.ttft_s = now - self.req.received
            m.TTFT.observe(self.out.ttft_s)
        elif ids:  # a group (--stream-interval): its gap spread over its tokens, as vLLM counts per token
            each = (now - self.last_token_at) / len(ids)
            for _ in ids:
                m.ITL.observe(each)
        self.sent.extend(ids)
        self.out.completion_tokens = len(self.sent)
        self.last_token_at = now
        m.GENERATION_TOKENS.inc(len(ids))
        return TokenEvent(ids, text), stop


class Pipeline:
    def __init__(self, router: Router, codec: TextCodec, max_model_len: Callable[[], int],
                 served_model: str, cfg: PipelineConfig | None = None, admission: Admission | None = None,
                 quotas: Quotas | None = None, batch_queue: BatchQueue | None = None) -> None:
        self.router = router
        self.admission = admission or Admission(router, "off")
        self.quotas = quotas or Quotas()
        self.batch = batch_queue or BatchQueue(self.admission)
        self.codec = codec
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
        prog = _Progress(req, self.codec.detokenizer(), StopMatcher(s.stop))
        out = prog.out
        out.predicted_ttft_s, out.predicted_tpot_s = plan.ttft_s or 0.0, plan.tpot_s or 0.0
        leg = 0
        kv_failed_from: set[str] = set()  # prefill nodes whose KV a decode node could not fetch
        while not out.reason:
            left = s.remaining(len(prog.sent))
            context = [*req.prompt_ids, *prog.sent]
            # Conditional disaggregation: admission chose to prefill on the decode node itself.
            local = leg == 0 and plan.local and plan.decode is not None and self.router.routable(plan.decode)
            with ExitStack() as legs_end:
                dnode = pnode = handle = None
                if local:
                    dnode = legs_end.enter_context(self.router.track(plan.decode, len(context)))  # type: ignore[arg-type]
                elif left.max_tokens > 1:
                    # Reserved before the prefill, so that requests arriving together spread
                    # over the pool (and an empty decode pool costs no prefill work).
                    avoid = {out.decode_node} if out.decode_node else set()
                    first = plan.decode if leg == 0 and plan.decode and self.router.routable(plan.decode) else None
                    dnode = legs_end.enter_context(self.router.track(first or await self.router.acquire("decode", avoid),
                                                                     len(context)))
                if leg == 0 and local:  # its call goes now (a prefill node's: after its turn there)
                    out.dispatch_s = time.perf_counter() - req.received
                    m.QUEUE.observe(out.dispatch_s)
                consumed = False  # a completed decode fetched (and so freed) the handle's blocks
                try:
                    if local:
                        assert dnode is not None
                        out.prefill_node, out.local_prefill = dnode.node_id, True
                        prompt, sampling = context, left
                    else:
                        pre, pnode = await self._prefill(req, context, left, hold_kv=dnode is not None, leg=leg,
                                                         prefer_not=kv_failed_from,
                                                         first=plan.prefill if leg == 0 else None)
                        # Known to the finally below before anything else can fail or wait.
                        handle = pre.handle if pre.HasField("handle") else None
                        if dnode is not None and not self.router.routable(dnode):
                            # It failed, began draining or left while the prompt was prefilled; the
                            # handle serves any decode node.
                            dnode = legs_end.enter_context(self.router.track(
                                await self.router.acquire("decode", avoid), len(context)))
                        if leg == 0:
                            out.prefill_s, out.prefill_node = pre.prefill_s, pnode.node_id
                            out.dispatch_s = req.prefill_sent_at - req.received
                            m.QUEUE.observe(out.dispatch_s)
                            out.prefill_call_s = time.perf_counter() - req.prefill_sent_at
                        ev, stop = prog.take([pre.first_token])
                        yield ev
                        if stop is not None:
                            out.reason, out.stop_reason = "stop", stop
                        elif pre.finish_reason == "stop" or dnode is None:
                            out.reason = pre.finish_reason or "length"
                        prompt, sampling = [*context, pre.first_token], left.remaining(1)
                    if not out.reason:
                        assert dnode is not None
                        out.decode_node = dnode.node_id
                        t_dec = time.perf_counter()
                        prefilling = legs_end.enter_context(ExitStack())  # a local prefill, until its first token
                        if local:  # its work there: less the prefix admission credited the node with
                            held = req.plan.prefill_held if req.plan is not None and leg == 0 else 0
                            prefilling.enter_context(self.router.track_prefill(dnode, max(1, len(context) - held)))
                        try:
                            async with aclosing(self._decode(req, dnode, prompt, sampling, handle, leg,
                                                             local)) as stream:
                                async for msg in stream:
                                    ids = list(msg.token_ids)
                                    stop = None
                                    if ids:
                                        if local and not prog.sent:
                                            out.prefill_s = out.prefill_call_s = time.perf_counter() - t_dec
                                        prefilling.close()
                                        ev, stop = prog.take(ids)
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
        tail = prog.stops.flush() if not out.stop_reason else ""  # stop_reason: a stop string matched
        if tail:
            yield TokenEvent([], tail)
        out.e2e_s = time.perf_counter() - req.received
        m.E2E.observe(out.e2e_s)
        # Every prediction is scored, and teaches the node it was made for (when the request ran there).
        if out.ttft_s > 0 and out.predicted_ttft_s:
            m.PREDICTION_ERROR.labels("ttft").observe(abs(out.ttft_s - out.predicted_ttft_s) / out.ttft_s)
            where = plan.decode if plan.local else plan.prefill
            if where is not None and where.node_id == out.prefill_node and self.router.current(where):
                # A batch request's wait in the batch queue is in both; the node learns from the rest.
                where.calibrate("ttft_local" if plan.local else "ttft",
                                (out.predicted_ttft_s - plan.waited_s) / plan.ttft_factor, out.ttft_s - plan.waited_s)
        tpot = 0.0
        if out.completion_tokens > 1:
            tpot = (prog.last_token_at - req.received - out.ttft_s) / (out.completion_tokens - 1)
            m.TPOT.observe(tpot)
            if out.predicted_tpot_s and not leg and tpot > 0:
                m.PREDICTION_ERROR.labels("tpot").observe(abs(tpot - out.predicted_tpot_s) / tpot)
                if (plan.decode is not None and plan.decode.node_id == out.decode_node
                        and self.router.current(plan.decode)):
                    plan.decode.calibrate("tpot", out.predicted_tpot_s / plan.tpot_factor, tpot)
        # What `tandem plan --live` replays and checks its predictions against (run() counts it).
        m.REQUEST_PROMPT_TOKENS.observe(len(req.prompt_ids))
        m.REQUEST_GENERATION_TOKENS.observe(out.completion_tokens)
        m.MIX_PROMPT_TOKENS.observe(len(req.prompt_ids))
        m.MIX_GENERATION_TOKENS.observe(out.completion_tokens)
        slo = req.slo.over(self.admission.default_slo)
        met = (out.reason in ("length", "stop") and (slo.ttft_s is None or out.ttft_s <= slo.ttft_s)
               and (out.completion_tokens <= 1 or slo.tpot_s is None or tpot <= slo.tpot_s))
        req.slo_met = "none" if slo.ttft_s is None and slo.tpot_s is None else "yes" if met else "no"
        logger.info("request %s: %s after %d tokens (ttft %.3f s, tpot %.1f ms, e2e %.3f s, prefill %s%s, "
                    "decode %s, migrations %d; predicted ttft %.3f s, tpot %.1f ms)", rid, out.reason,
                    out.completion_tokens, out.ttft_s, tpot * 1000, out.e2e_s, out.prefill_node,
                    " (local)" if out.local_prefill else "", out.decode_node or "-", leg, out.predicted_ttft_s,
                    out.predicted_tpot_s * 1000)
        if log_prompts_enabled():
            logger.info("request %s: prompt %r -> output %r", rid,
                        self.codec.tok.decode(req.prompt_ids), self.codec.tok.decode(prog.detok.ids))
        yield out

    def _migrate_or_raise(self, req: Prepared, prog: _Progress, failed: NodeCallFailed, leg: int) -> None:
        """Go on to another leg when the failure allows it and the limit is not reached."""
        self._raise_if_client_gave_up(req, failed)
        if failed.node_failed:
            self.router.mark_down(failed.node, str(failed.error))
        if not failed.retryable or leg >= self.cfg.migration_limit:
            if failed.retryable:
                logger.warning("request %s: not migrated again (limit %d): %s", req.request_id,
                               self.cfg.migration_limit, failed.error)
            raise failed.error from failed
        m.MIGRATIONS.labels("decode", failed.cause).inc()
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
            turn = order.entry(node, req.request_id, work, req.received, ttft_s, urgent=leg > 0)

            def orphaned(resp: pb.PrefillResponse, node: NodeClient = node) -> None:
                # Answered, but the request was cancelled meanwhile: nobody will fetch its blocks.
                if resp.HasField("handle"):
                    self._release_later(req.request_id, node, resp.handle)

            call = None
            try:
                with self.router.track(node, work):
                    async with order.turn(node, turn, req.deadline):
                        call = node.stub.Prefill(  # type: ignore[attr-defined]
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

    async def _decode(self, req: Prepared, node: NodeClient, prompt: list[int], sampling: Sampling,
                      handle: pb.KVHandle | None, leg: int, local: bool = False) -> AsyncIterator[pb.DecodeResponse]:
        """Stream a decode: from ``handle``'s KV, or (``local``) prefilling ``prompt`` on the node."""
        call = node.stub.Decode(  # type: ignore[attr-defined]
            pb.DecodeRequest(request_id=f"{req.request_id}-d{leg}", prompt_token_ids=prompt,
                             sampling=to_proto(sampling, pb.SamplingParams), handle=handle, prefill_here=local,
                             stream_interval=self.cfg.stream_interval),
            timeout=self._timeout(req, self.cfg.decode_timeout_s))
        try:
            async with aclosing(self.watch.stream(call, node)) as messages:
                async for msg in messages:
                    yield msg
        finally:
            _cancel(call)

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
