"""Admission: predict a new request's TTFT and TPOT on every candidate node, pick, or refuse.

For each routable prefill node the predicted TTFT is the time its queue
(the prefills there now, as its load stream says, or this coordinator's own
in flight there, whichever is more) takes plus this prompt's prefill, both
from the node's fitted model (tandem/perfmodel.py). For each routable decode
node the predicted TPOT is the mean gap after the first token: the KV fetch
plus one step (the node's ``transfer`` fit, by KV bytes) and then
``max_tokens - 2`` steps of its batch with this request added (its
``decode`` fit, by batch size and context tokens).

The request goes to the prefill node with the lowest predicted TTFT and the
decode node with the lowest predicted TPOT (the pair with the most headroom,
since the two are independent; ties: fewest outstanding). When the request
has an SLO (its own, or the cluster's default) and even that pair misses it,
the request is refused with RESOURCE_EXHAUSTED / HTTP 429 before any engine
work, carrying both predictions, and a Retry-After when waiting can help
(the miss comes from queued work; an SLO that an idle node cannot meet gets
none). A node with no model yet (no samples: ``--profile off`` and nothing
served) is not predicted: it is picked by load and never causes a refusal.
With admission ``off`` the same predictions route the request and nothing
is refused (for comparison runs). A migrated leg does not come here at all.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from tandem.errors import InvalidRequest, Rejected
from tandem.perfmodel import kv_bytes_per_token

from . import metrics as m
from .router import NodeClient, Router

logger = logging.getLogger(__name__)

MODES = ("on", "off")
MAX_SLO_MS = 3_600_000.0


@dataclass(frozen=True)
class Slo:
    """Latency objectives in seconds; None: none."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @classmethod
    def from_ms(cls, ttft_ms: float | None, tpot_ms: float | None, where: str = "") -> Slo:
        """Validated: positive, finite, at most an hour; InvalidRequest naming the field."""
        def one(v: float | None, name: str) -> float | None:
            if v is None:
                return None
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= MAX_SLO_MS):
                raise InvalidRequest(f"{where}{name} must be a number of milliseconds in (0, {MAX_SLO_MS:.0f}], "
                                     f"got {v!r}")
            return float(v) / 1000.0

        return cls(one(ttft_ms, "ttft_ms"), one(tpot_ms, "tpot_ms"))

    def over(self, default: Slo) -> Slo:
        """This SLO with the default filling what it leaves unset."""
        return Slo(self.ttft_s if self.ttft_s is not None else default.ttft_s,
                   self.tpot_s if self.tpot_s is not None else default.tpot_s)


@dataclass
class Estimate:
    node: NodeClient
    seconds: float | None  # None: the node has no model yet
    idle_seconds: float | None = None  # the same on an idle node
    detail: str = ""


@dataclass
class Plan:
    """Where a request starts, and what was predicted for it there (None: not predicted)."""

    prefill: NodeClient | None
    decode: NodeClient | None
    ttft_s: float | None = None
    tpot_s: float | None = None


def prefill_estimate(node: NodeClient, tokens: int) -> Estimate:
    model = node.model
    if not model.prefill.samples:
        return Estimate(node, None)
    load = node.fresh_load()
    reported = list(load.prefill_queue) if load is not None else []
    own = list(node.inflight.values())
    queue = own if sum(own) > sum(reported) else reported
    queue_s = sum(model.prefill_s(t) for t in queue)
    run_s = model.prefill_s(tokens)
    return Estimate(node, queue_s + run_s, run_s,
                    f"{node.node_id}: queue {len(queue)} prompts {queue_s * 1000:.0f} ms + prefill "
                    f"{run_s * 1000:.0f} ms")


def decode_estimate(node: NodeClient, prompt_tokens: int, max_tokens: int) -> Estimate:
    """Mean time per output token after the first, for a request of ``max_tokens`` (>= 2)."""
    model = node.model
    if not model.decode.samples:
        return Estimate(node, None)
    load = node.fresh_load()
    own = list(node.inflight.values())
    batch, context = len(own), sum(own)
    if load is not None and load.decode_batch + load.decode_waiting >= batch:
        batch = load.decode_batch + load.decode_waiting
        context = max(context, load.decode_context)
    mine = prompt_tokens + max_tokens // 2  # its mean context over the steps
    block = int(node.record.layout.get("block_size", 1) or 1)
    kv = -(-prompt_tokens // block) * block * kv_bytes_per_token(node.record.layout)
    # The fetch plus its first step; with no transfer samples yet, one step stands in for it.
    first = model.transfer_s(kv) if model.transfer.samples else model.step_s(batch + 1, context + mine)

    def tpot(b: int, ctx: int) -> float:
        return (first + (max_tokens - 2) * model.step_s(b + 1, ctx + mine)) / (max_tokens - 1)

    busy, idle = tpot(batch, context), tpot(0, 0)
    return Estimate(node, busy, idle, f"{node.node_id}: batch {batch} + 1, step {model.step_s(batch + 1, context + mine) * 1000:.1f} ms, "
                                      f"KV {kv >> 10} KiB in {first * 1000:.0f} ms")


TIE_REL, TIE_ABS_S = 0.05, 0.002  # predictions this close are the same: the load decides


def _best(estimates: list[Estimate]) -> Estimate:
    """The lowest prediction; among those within ``TIE_REL`` / ``TIE_ABS_S`` of it (two nodes of one
    kind differ by the noise of their fits), the least loaded, so equal nodes share the work.
    Nodes with no prediction only when none has one."""
    known = [e for e in estimates if e.seconds is not None]
    if known:
        low = min(e.seconds for e in known)  # type: ignore[type-var]
        pool = [e for e in known if e.seconds <= max(low * (1 + TIE_REL), low + TIE_ABS_S)]  # type: ignore[operator]
    else:
        pool = estimates
    return min(pool, key=lambda e: (e.node.outstanding, e.node.served, e.seconds or 0.0, e.node.node_id))


class Admission:
    def __init__(self, router: Router, mode: str = "on", default_slo: Slo = Slo()) -> None:
        if mode not in MODES:
            raise ValueError(f"--admission must be on or off, got {mode!r}")
        self.router = router
        self.mode = mode
        self.default_slo = default_slo

    def plan(self, rid: str, prompt_tokens: int, max_tokens: int, slo: Slo) -> Plan:
        """The nodes a new request starts on, or Rejected. An empty pool leaves its side to the
        pipeline (which waits for a node or answers UNAVAILABLE)."""
        slo = slo.over(self.default_slo)
        pre = [prefill_estimate(n, prompt_tokens) for n in self.router.routable_nodes("prefill")]
        dec = ([decode_estimate(n, prompt_tokens, max_tokens) for n in self.router.routable_nodes("decode")]
               if max_tokens > 1 else [])
        p = _best(pre) if pre else None
        d = _best(dec) if dec else None
        plan = Plan(p.node if p else None, d.node if d else None, p.seconds if p else None,
                    d.seconds if d else None)
        if plan.ttft_s is None and plan.tpot_s is None:
            m.ADMISSIONS.labels("unpredicted").inc()
            return plan
        misses = []
        if slo.ttft_s is not None and p is not None and p.seconds is not None and p.seconds > slo.ttft_s:
            misses.append(("TTFT", p, slo.ttft_s))
        if slo.tpot_s is not None and d is not None and d.seconds is not None and d.seconds > slo.tpot_s:
            misses.append(("TPOT", d, slo.tpot_s))
        if not misses or self.mode == "off":
            m.ADMISSIONS.labels("admitted" if not misses else "over_slo_admitted").inc()
            return plan
        m.ADMISSIONS.labels("rejected").inc()
        parts, waits = [], []
        for what, e, limit in misses:
            assert e.seconds is not None
            never = e.idle_seconds is not None and e.idle_seconds > limit
            parts.append(f"predicted {what} {e.seconds * 1000:.0f} ms > SLO {limit * 1000:.0f} ms "
                         f"({e.detail}){'; not met even on an idle node' if never else ''}")
            if not never:
                waits.append(max(1, math.ceil(e.seconds - limit)) if what == "TTFT" else 1)
        retry = max(waits) if len(waits) == len(misses) else None
        msg = f"request refused, no node is predicted to meet its SLO: {'; '.join(parts)}"
        logger.info("request %s: %s", rid, msg)
        raise Rejected(msg, plan.ttft_s, plan.tpot_s, retry)
