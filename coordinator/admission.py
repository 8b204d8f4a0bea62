"""Admission: predict a new request's TTFT and TPOT on every candidate node, pick, or refuse.

For each candidate prefill node (up to ``--admission-candidates`` of the
routable ones: ``candidates``) the predicted TTFT is the wait for its turn
there plus this prompt's prefill; for each candidate decode node the predicted
TPOT is the mean gap after the first token (the KV fetch, then the steps of
the batch it joins); and on a decode node that would prefill it itself, both
(estimates.py makes each, from the node's fitted model, tandem/perfmodel.py).

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

A close miss on idle nodes may be served as a *trial* instead (trials.py): a
model learns only from what its node serves, so one reading a node slow would
otherwise refuse for good.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from tandem.errors import InvalidRequest, Rejected

from . import metrics as m
from .choice import Option, best, candidates, choose, choose_disagg, local_option, prefill_rank, stalled
from .estimates import Estimate, decode_estimate, decode_load, decode_view, life_load, prefill_estimate
from .prefillq import PrefillOrder
from .prefix import ROUTINGS, Held, held_prefixes
from .nodeclient import NodeClient
from .router import Router
from .pressure import Pressure
from .trials import Trials

logger = logging.getLogger(__name__)

MODES = ("on", "off")
COLOCATE = ("off", "on", "always")  # --colocate
MAX_SLO_MS = 3_600_000.0
DEFAULT_CANDIDATES = 8  # the most nodes of each pool a request's predictions look at (--admission-candidates)


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
class Plan:
    """Where a request starts, and what was predicted for it there (None: not predicted)."""

    prefill: NodeClient | None
    decode: NodeClient | None
    ttft_s: float | None = None
    tpot_s: float | None = None
    local: bool = False  # the decode node prefills it (no prefill node)
    colocated: bool = False  # and that "decode node" is a prefill node, serving it whole (--colocate)
    queued_s: float = 0.0  # of ttft_s, the wait for work already queued there
    ttft_factor: float = 1.0  # the calibration factors in ttft_s / tpot_s (their model-only values:
    tpot_factor: float = 1.0  # divided by these, less waited_s; what the nodes learn from)
    waited_s: float = 0.0  # of ttft_s, the time a batch request waited in the batch queue (traffic.py)
    prefill_held: int = 0  # prompt tokens the prefilling node holds (cached or loaded there, not computed)
    prefill_run_s: float = 0.0  # a local prefill's own time on an idle node, model only (what it adds
    # to the TTFT of the local prefills queued behind it: estimates._local_queue)
    # The prefilling node's pace when admitted (NodeClient.pace: the factor, the reading, its age),
    # in ttft_s with --pace on (then in ttft_factor too); for the log either way
    pace: tuple[float, float, float] = (1.0, 0.0, math.inf)
    paced: bool = False



class _Decisions:
    def __init__(self, count: bool) -> None:
        self.count = count

    def __call__(self, decision: str) -> None:
        if self.count:
            m.ADMISSIONS.labels(decision).inc()



class Admission:
    def __init__(self, router: Router, mode: str = "on", default_slo: Slo = Slo(), local: bool = True,
                 headroom: float = 0.0, order: PrefillOrder | None = None, routing: str = "prefix",
                 rng: random.Random | None = None, protect: bool = True, kv_room: bool = True,
                 candidates: int = DEFAULT_CANDIDATES, trial_s: float = 0.0, overload_margin: float = 0.0,
                 colocate: str = "off", clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in MODES:
            raise ValueError(f"--admission must be on or off, got {mode!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"--routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        # prefix: each prefill node's predicted TTFT counts what its KV store holds of the prompt (loaded,
        # not computed), so a request goes where its prefix is unless that node's queue costs more;
        # least-loaded: the same predictions without that credit; random: any routable prefill node.
        self.routing = routing
        self.rng = rng or random.Random()
        if not 0.0 <= headroom < 1.0:
            raise ValueError(f"--admission-headroom must be in [0, 1), got {headroom}")
        # Admit against the TPOT objective less this share: a decode batch keeps growing after a
        # request joins it. (A prefill queue does not grow ahead of a request already in it, and
        # the TTFT predictions are close: no headroom there.)
        self.headroom = headroom
        self.router = router
        self.mode = mode
        self.default_slo = default_slo
        self.local = local  # conditional disaggregation: a decode node may prefill a request itself
        # on: a prefill node may serve a request whole (prefill and decode there, no KV moved) when
        # the disaggregated choice would miss its SLO and that would not (``choose``); always: every
        # request it is predicted to serve within its SLO that way, running streams kept within
        # theirs (the prefill pool as colocated engines, for comparison runs); off: never (the default
        # here, for decisions on a synthetic cluster; the coordinator passes --colocate, on by default).
        if colocate not in COLOCATE:
            raise ValueError(f"--colocate must be one of {', '.join(COLOCATE)}, got {colocate!r}")
        self.colocate = colocate
        # A newcomer may not push a running stream past its TPOT objective (pace.pushed); off:
        # it is checked against its own objective only, a local prefill's stall against the
        # objective spread over the newcomer's tokens (as until the eighteenth sitting).
        self.protect = protect
        # A prompt waits for room in a decode node's KV cache (estimates.kv_wait); off: not predicted.
        self.kv_room = kv_room
        # The most nodes of each pool a request's predictions look at (``candidates``); 0: all.
        if candidates < 0:
            raise ValueError(f"--admission-candidates must be >= 0, got {candidates}")
        self.candidates = candidates
        self.order = order or PrefillOrder(router, "slack")
        # Trials (trials.py), at most one each this many seconds; 0: none (the default here, for
        # decisions on a synthetic cluster; the coordinator passes --admission-trial-s).
        self.trials = Trials(trial_s, clock)
        # The overload margin (pressure.py): up to this share of the TPOT objective kept free, by the
        # recent share of load refusals; 0: none (the default here; the coordinator passes
        # --admission-overload-margin).
        self.pressure = Pressure(overload_margin, clock=clock)
        if headroom + overload_margin >= 1.0:
            raise ValueError(f"--admission-headroom plus --admission-overload-margin must be below 1, got "
                             f"{headroom} + {overload_margin}")

    def plan(self, rid: str, prompt_tokens: int, max_tokens: int, slo: Slo, count: bool = True,
             arrival: float | None = None, prompt_ids: list[int] | None = None) -> Plan:
        """The nodes a new request starts on, or Rejected. An empty pool leaves its side to the
        pipeline (which waits for a node or answers UNAVAILABLE). ``count=False``: a look, not a
        decision (the batch queue's), so no metric moves and nothing is logged. ``arrival``
        (perf_counter; default now): when its TTFT started counting. ``prompt_ids``: for prefix
        routing (without them, no node gets credit for a cached prefix)."""
        decide = _Decisions(count)
        asked = slo.over(self.default_slo)
        margin = self.pressure.margin() if self.mode == "on" else 0.0
        if count:
            m.OVERLOAD_MARGIN.set(margin)
        keep = 1.0 - self.headroom - margin
        slo = Slo(asked.ttft_s, None if asked.tpot_s is None else asked.tpot_s * keep)
        base_tpot = None if asked.tpot_s is None else asked.tpot_s * (1.0 - self.headroom)  # without the margin
        arrival = time.perf_counter() if arrival is None else arrival
        decoders = self.router.routable_nodes("decode")
        prefills = self.router.routable_nodes("prefill")
        # What each node holds of the prompt: a prefill node's for the prefill pool, a decode node's for
        # a local prefill there (its engine's cache has the prompts it decoded).
        held = held_prefixes(prefills + decoders, prompt_ids) if self.routing == "prefix" and prompt_ids else {}
        if self.routing != "random":
            prefills = candidates(prefills, held, self.candidates, prefill_rank)
        decoders = candidates(decoders, held, self.candidates, decode_load)
        pre = [prefill_estimate(n, prompt_tokens, self.order, arrival, slo.ttft_s, held.get(n.node_id, Held()))
               for n in prefills]
        # A node where it would push queued requests past their objective only when every node would.
        pre = [e for e in pre if not e.pushes] or pre
        # Prefill nodes serving streams whole (--colocate): their state as decode nodes, and what this
        # prompt's prefill there would do to those streams (a node pushing none of them past their
        # TPOT objective first, as above).
        # (Only those that say they serve requests whole: a prefill node of an older version does not.)
        whole = [n for n in prefills if n.record.serves_whole] if self.colocate != "off" else []
        hviews = {n.node_id: decode_view(n, self.protect) for n in whole}
        stalls = {e.node.node_id: stalled(hviews[e.node.node_id], slo, e.idle_seconds) for e in pre
                  if e.idle_seconds is not None and e.node.node_id in hviews}
        pre = [e for e in pre if not stalls.get(e.node.node_id)] or pre
        # Each decode node's state, and its batch over the request's life, looked at once (O(its streams)).
        views = ({n.node_id: decode_view(n, self.protect) for n in decoders} if max_tokens > 1 or self.local
                 else {})
        lives = ({n.node_id: life_load(n, max_tokens, views[n.node_id]) for n in decoders} if max_tokens > 1
                 else {})
        dec = ([decode_estimate(n, prompt_tokens, max_tokens, lives[n.node_id], self.protect, self.kv_room,
                                views[n.node_id]) for n in decoders] if lives else [])
        # A node where it would push running streams past their objective only when every node would.
        dec = [e for e in dec if not e.pushes] or dec
        p = (self.rng.choice(pre) if self.routing == "random" else best(pre)) if pre else None
        d = best(dec) if dec else None
        remote = Option(p, d) if p is not None else None
        if remote is not None and p is not None and (pushes := stalls.get(p.node.node_id, 0)):
            # (Above the objective, so a miss: the disaggregated choice gives way as any miss does.)
            remote.others = Estimate(p.node, slo.tpot_s * (1.0 + pushes),  # type: ignore[operator]
                                     describe=lambda: f"{p.node.node_id}: its prefill there would push {pushes} "
                                     f"of the streams that node serves whole past their TPOT objective")
        local = local_option(decoders, prompt_tokens, max_tokens, slo, held, lives, views, self.protect,
                             self.kv_room, alone=self.router.pool_absent("prefill")) if self.local else None
        home = None
        if max_tokens > 1 and whole:
            # The prefill nodes as decode nodes of their own: their streams, their batch over the
            # request's life, what a prefill there would do to those streams.
            hlives = {n.node_id: life_load(n, max_tokens, hviews[n.node_id]) for n in whole}
            # Its prompt goes to the node's engine at once, ahead of the requests waiting in the
            # prefill order there: one it would push past their TTFT objective is a miss, as a
            # prefill-order request's would be ("queue").
            home = local_option(whole, prompt_tokens, max_tokens, slo, held, hlives, hviews, self.protect,
                                self.kv_room, queue_pushes=self.order.pushed_by)
            if home is not None:
                home.colocated = True
        always = self.colocate == "always" and home is not None and not home.misses(slo)
        chosen = home if always else choose(remote, local, slo, home)
        if chosen is None:  # no prefill node, and no decode node that could do it: the pipeline waits
            decide("unpredicted")
            return Plan(None, d.node if d else None)
        if chosen.local:
            assert chosen.ttft is not None
            plan = Plan(None, chosen.ttft.node, chosen.ttft_s, chosen.tpot.seconds if chosen.tpot else None,
                        local=True, colocated=chosen.colocated, ttft_factor=chosen.ttft.factor,
                        tpot_factor=chosen.tpot.factor if chosen.tpot else 1.0,
                        prefill_run_s=chosen.ttft.idle_seconds or 0.0)
        else:
            plan = Plan(p.node if p else None, d.node if d else None, p.seconds if p else None,
                        d.seconds if d else None, ttft_factor=p.factor if p else 1.0,
                        tpot_factor=d.factor if d else 1.0)
        if (ttft_node := plan.decode if plan.local else plan.prefill) is not None:
            plan.pace, plan.paced = ttft_node.pace(), ttft_node.paced
        if plan.ttft_s is None and plan.tpot_s is None:
            decide("unpredicted")
            return plan
        if chosen.ttft is not None and chosen.ttft.seconds is not None:
            plan.queued_s = chosen.ttft.queue_s
        if chosen.ttft is not None:  # a prefill node's, or the decode node's for a local prefill
            plan.prefill_held = chosen.ttft.cached_tokens.capped(prompt_tokens - 1).tokens
        if count and chosen.ttft is not None and chosen.ttft.cached_tokens.tokens:  # (a local prefill's too)
            c = chosen.ttft.cached_tokens
            for where, n in (("engine", c.engine), ("ram", c.loaded - c.disk), ("disk", c.disk)):
                if n:
                    m.PREFIX_TOKENS.labels(where).inc(n)
        misses = chosen.misses(slo)
        if not misses or self.mode == "off":
            decision = "admitted" if not misses else "over_slo_admitted"
            decide(decision)
            if count:  # what each prediction stood on, to compare with the finish's actual times
                self.pressure.note(False)  # (with admission off it is never asked: no margin)
                logger.info("request %s: %s%s: %s; %s%s", rid, decision,
                            (f", served whole on prefill node {plan.decode.node_id}" if plan.colocated  # type: ignore[union-attr]
                             else f", prefills on decode node {plan.decode.node_id}" if plan.local else ""),  # type: ignore[union-attr]
                            chosen.ttft.detail if chosen.ttft else "-", chosen.tpot.detail if chosen.tpot else "-",
                            _instead(chosen, remote, local, slo))
            return plan
        if count and self.trials.take((plan.prefill, plan.decode), misses):
            decide("trial")
            self.pressure.note(False)
            logger.info("request %s: admitted as a trial on idle nodes (at most one each %g s), though "
                        "predicted to miss: %s; %s", rid, self.trials.interval_s,
                        "; ".join(f"{what} {e.seconds * 1000:.0f} ms > {limit * 1000:.0f} ms"  # type: ignore[operator]
                                  for what, e, limit in misses),
                        chosen.tpot.detail if chosen.tpot else "-")
            return plan
        decide("rejected")
        parts, waits = [], []
        for what, e, limit in misses:
            assert e.seconds is not None
            if what in PUSHES:  # others' objectives: load, it may pass
                parts.append(_brief(what, e, limit))
                waits.append(1)
                continue
            # (A TPOT miss only by the overload margin is load: the objective less the headroom alone.)
            never = e.idle_seconds is not None and e.idle_seconds > (base_tpot if what == "TPOT" else limit)
            target = (f" (the SLO {asked.tpot_s * 1000:.0f} ms less {_kept(self.headroom, margin)})"  # type: ignore[operator]
                      if keep < 1.0 and what == "TPOT" else "")
            parts.append(f"predicted {what} {e.seconds * 1000:.0f} ms > {limit * 1000:.0f} ms{target} "
                         f"({e.detail}){'; not met even on an idle node' if never else ''}")
            if not never:
                waits.append(max(1, math.ceil(e.seconds - limit)) if what == "TTFT" else 1)
        retry = max(waits) if len(waits) == len(misses) else None
        if whole and max_tokens > 1 and chosen is not home:  # (--colocate: why not that either)
            if home is None:
                parts.append("no prefill node could serve it whole (each would push the streams it serves past "
                             "their TPOT objective, is prefilling beside them, or has no model yet)")
            elif home_misses := home.misses(slo):
                parts.append(f"served whole on prefill node {home.ttft.node.node_id}: "  # type: ignore[union-attr]
                             + "; ".join(_brief(*miss) for miss in home_misses))
        # Load, for the overload margin: a refusal waiting could help (one no idle node would avoid
        # says nothing of the load), and not one the margin alone caused (it would feed itself).
        if count and retry is not None and (not margin or chosen.misses(Slo(asked.ttft_s, base_tpot))):
            self.pressure.note(True)
        msg = f"request refused, no node is predicted to meet its SLO: {'; '.join(parts)}"
        if count:
            logger.info("request %s: %s", rid, msg)
        raise Rejected(msg, plan.ttft_s, plan.tpot_s, retry)


PUSHES = ("queue", "streams", "others")  # the misses that are other requests' objectives (``Option.misses``)


def _brief(what: str, e: Estimate, limit: float) -> str:
    """One of an option's misses (``Option.misses``) in words, with what its prediction stood on:
    the refusal's own and its line on serving the request whole (--colocate) say them alike."""
    assert e.seconds is not None
    if what == "queue":
        return (f"predicted TTFT {e.seconds * 1000:.0f} ms meets {limit * 1000:.0f} ms only by pushing "
                f"{e.pushes} queued request(s) past theirs ({e.detail})")
    if what == "streams":
        return (f"predicted TPOT {e.seconds * 1000:.0f} ms meets {limit * 1000:.0f} ms only by pushing "
                f"{e.pushes} running stream(s) past theirs ({e.detail})")
    if what == "others":
        where = "prefill" if e.node.record.role == "prefill" else "decode"  # (a prefill node's: --colocate)
        return f"prefilling it on the {where} node would push its running streams past the TPOT objective: {e.detail}"
    return f"predicted {what} {e.seconds * 1000:.0f} ms > {limit * 1000:.0f} ms ({e.detail})"


def _instead(chosen: Option, remote: Option | None, local: Option | None, slo: Slo) -> str:
    """Why a request served whole (--colocate) was not disaggregated: the misses of the choice it
    would otherwise have had, words as a refusal's (empty for any other, or none missed)."""
    other = choose_disagg(remote, local, slo) if chosen.colocated else None
    misses = other.misses(slo) if other is not None else []
    return "; the disaggregated choice: " + "; ".join(_brief(*miss) for miss in misses) if misses else ""


def _kept(headroom: float, margin: float) -> str:
    """What the TPOT objective was admitted against less, in words."""
    def pct(x: float) -> str:
        return f"{x:.0%}" if x >= 0.01 else f"{x:.1%}"

    parts = ([f"{pct(headroom)} headroom"] if headroom else []) + ([f"{pct(margin)} overload margin"] if margin else [])
    return " and ".join(parts)
