"""One request as the pipeline carries it: what was prepared, the events its client is sent,
what it has been sent so far, and its accounting once it ends (metrics, the scoring of
admission's predictions, the log line)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.logs import log_prompts_enabled
from tandem.sampling import Sampling

from . import metrics as m
from .admission import Plan, Slo
from .router import Router
from .textcodec import ByteDetokenizer, Detokenizer, StopMatcher

logger = logging.getLogger(__name__)


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
            out["x-tandem-prefill"] = ("colocated" if self.plan.colocated else "local" if self.plan.local
                                       else "disaggregated")
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
    # The request's last tokens: only its finish comes after them (a front end may send the two
    # in one message).
    last: bool = False


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
    local_prefill: bool = False  # its decode node prefilled it (conditional disaggregation; or --colocate)
    colocated: bool = False  # and that node is a prefill node, serving it whole (--colocate)


Event = TokenEvent | FinishEvent


@dataclass
class PipelineConfig:
    prefill_timeout_s: float = 120.0  # one Prefill call
    decode_timeout_s: float = 1800.0  # one Decode stream, start to end
    release_timeout_s: float = 10.0
    stall_s: float = 3.0  # no progress this long: probe the node's health
    migration_limit: int = 2  # times one request may move to another decode node
    stream_interval: int = 1  # tokens per decode message after the first (DecodeRequest.stream_interval)


class Progress:
    """What the client has been sent so far, across every leg of the request."""

    def __init__(self, req: Prepared, detok: Detokenizer | ByteDetokenizer, stops: StopMatcher) -> None:
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
            m.observe_many(m.ITL, (now - self.last_token_at) / len(ids), len(ids))
        self.sent.extend(ids)
        self.out.completion_tokens = len(self.sent)
        self.last_token_at = now
        m.add(m.GENERATION_TOKENS, len(ids))
        return TokenEvent(ids, text), stop


def account(req: Prepared, plan: Plan, prog: Progress, leg: int, router: Router, default_slo: Slo,
            decode: Callable[[list[int]], str]) -> None:
    """A request served to its end (after ``leg`` migrations): its metrics, the scoring of
    admission's predictions (each teaches the node it was made for, when the request ran
    there), whether it met its objectives, and its log line."""
    out, rid = prog.out, req.request_id
    out.e2e_s = time.perf_counter() - req.received
    m.E2E.observe(out.e2e_s)
    if out.ttft_s > 0 and out.predicted_ttft_s:
        m.PREDICTION_ERROR.labels("ttft").observe(abs(out.ttft_s - out.predicted_ttft_s) / out.ttft_s)
        where = plan.decode if plan.local else plan.prefill
        if where is not None and where.node_id == out.prefill_node and router.current(where):
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
                    and router.current(plan.decode)):
                plan.decode.calibrate("tpot", out.predicted_tpot_s / plan.tpot_factor, tpot)
    # What `tandem plan --live` replays and checks its predictions against (run() counts it).
    m.REQUEST_PROMPT_TOKENS.observe(len(req.prompt_ids))
    m.REQUEST_GENERATION_TOKENS.observe(out.completion_tokens)
    m.MIX_PROMPT_TOKENS.observe(len(req.prompt_ids))
    m.MIX_GENERATION_TOKENS.observe(out.completion_tokens)
    slo = req.slo.over(default_slo)
    met = (out.reason in ("length", "stop") and (slo.ttft_s is None or out.ttft_s <= slo.ttft_s)
           and (out.completion_tokens <= 1 or slo.tpot_s is None or tpot <= slo.tpot_s))
    req.slo_met = "none" if slo.ttft_s is None and slo.tpot_s is None else "yes" if met else "no"
    # (TTFT's parts too: until its prefill call went out, then that call until the first token.)
    logger.info("request %s: %s after %d tokens (ttft %.3f s, tpot %.1f ms, e2e %.3f s, prefill %s%s, "
                "decode %s, migrations %d, dispatch %.3f s, prefill call %.3f s; predicted ttft %.3f s, "
                "tpot %.1f ms, learned factors x%.4f, x%.4f, of the ttft waiting %.3f s; pace x%.4f%s from %+.4f "
                "%.2f s old)",
                rid, out.reason, out.completion_tokens, out.ttft_s, tpot * 1000, out.e2e_s, out.prefill_node,
                " (local)" if out.local_prefill else "", out.decode_node or "-", leg, out.dispatch_s,
                out.prefill_call_s, out.predicted_ttft_s, out.predicted_tpot_s * 1000, plan.ttft_factor,
                plan.tpot_factor, plan.queued_s + plan.waited_s,  # (a batch request's wait in the batch queue too)
                plan.pace[0], "" if plan.paced else " not applied", plan.pace[1], plan.pace[2])
    if log_prompts_enabled():
        logger.info("request %s: prompt %r -> output %r", rid,
                    decode(req.prompt_ids), decode(prog.detok.ids))
