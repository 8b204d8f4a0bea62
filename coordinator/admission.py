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

import heapq
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from tandem.errors import InvalidRequest, Rejected

from . import metrics as m
from .estimates import (DecodeView, Estimate, LocalEstimate, decode_estimate, decode_load, decode_view, life_load,
                        local_estimate, prefill_estimate, pushed)
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
NO_HOLD = Held()
LOCAL_GAIN = 0.2  # prefill on the decode node when that starts this much sooner (and both meet the SLO)


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


# Predictions this close are the same, and the load decides: two nodes of one kind differ by the
# noise of their fits (a node just restarted from its cached profile against one refined by what
# it served), and a node that is never picked never refines its fit. Real differences are larger:
# one prefill queued doubles a prediction.
TIE_REL, TIE_ABS_S = 0.2, 0.005
IDLE_TIE = 3.0
# Nodes whose held prefixes of a prompt differ by fewer tokens than this are still "alike" (a block or
# two of a common start is not worth giving up the sharing of work between them).
AFFINITY_TOKENS = 128


def tied(seconds: float, low: float) -> bool:
    """Whether a prediction of ``seconds`` is as good as the lowest, ``low`` (``TIE_REL`` / ``TIE_ABS_S``)."""
    return seconds <= max(low * (1 + TIE_REL), low + TIE_ABS_S)


def _best(estimates: list[Estimate]) -> Estimate:
    """The lowest prediction; among those within ``TIE_REL`` / ``TIE_ABS_S`` of it, the least
    loaded, so nodes alike share the work.
    A node with no model yet is taken first while it is idle, otherwise only when none has one."""
    known = [e for e in estimates if e.seconds is not None]
    # Beside nodes that have a model, one without gets work while it is idle: its first requests
    # are its samples (otherwise it would never learn).
    learning = [e for e in estimates if e.seconds is None and e.node.outstanding == 0] if known else []
    if learning:
        return min(learning, key=lambda e: (e.node.served, e.node.node_id))
    if known:
        best = min(known, key=lambda e: e.seconds)  # type: ignore[arg-type,return-value]
        low = best.seconds
        assert low is not None

        def alike(e: Estimate) -> bool:
            assert e.seconds is not None
            if abs(e.cached_tokens.tokens - best.cached_tokens.tokens) >= AFFINITY_TOKENS:
                return False  # a prefix held on one node is a real difference, not fit noise
            if tied(e.seconds, low):
                return True
            # Two idle nodes: only their fits differ, and a node just restarted carries its cached
            # profile's (taken at startup, a few times slower than what a node serving warm
            # predicts). Within IDLE_TIE of each other they take turns, and both keep learning.
            return e.queue_s == 0 and best.queue_s == 0 and e.seconds <= low * IDLE_TIE

        pool = [e for e in known if alike(e)]
    else:
        pool = estimates
    return min(pool, key=lambda e: (e.node.outstanding, e.node.served, e.seconds or 0.0, e.node.node_id))


class _Decisions:
    def __init__(self, count: bool) -> None:
        self.count = count

    def __call__(self, decision: str) -> None:
        if self.count:
            m.ADMISSIONS.labels(decision).inc()


@dataclass
class _Option:
    ttft: Estimate | None
    tpot: Estimate | None
    local: bool = False
    colocated: bool = False  # local, on a prefill node: served whole there (--colocate)
    # A local prefill with no prefill pool to send it to instead: its decode node's running
    # streams' step, with the prefill's stall spread over their tokens.
    others: Estimate | None = None

    def misses(self, slo: Slo) -> list[tuple[str, Estimate, float]]:
        """("TTFT" | "TPOT" | "others" | "queue" | "streams", the estimate, the objective) for each
        objective it misses; "others": its prefill would push the node's running streams past the
        TPOT objective; "queue": it meets its own TTFT only by pushing queued requests past
        theirs; "streams": it meets its own TPOT only by pushing running streams past theirs."""
        out = []
        for what, e, limit in (("TTFT", self.ttft, slo.ttft_s), ("TPOT", self.tpot, slo.tpot_s),
                               ("others", self.others, slo.tpot_s)):
            if limit is not None and e is not None and e.seconds is not None and e.seconds > limit:
                out.append((what, e, limit))
        if slo.ttft_s is not None and self.ttft is not None and self.ttft.pushes and not out:
            out.append(("queue", self.ttft, slo.ttft_s))
        if slo.tpot_s is not None and self.tpot is not None and self.tpot.pushes and not out:
            out.append(("streams", self.tpot, slo.tpot_s))
        return out

    @property
    def ttft_s(self) -> float | None:
        return self.ttft.seconds if self.ttft is not None else None


def candidates(nodes: list[NodeClient], held: dict[str, Held], k: int,
               load: Callable[[NodeClient], tuple[int, int]]) -> list[NodeClient]:
    """Of a pool, the nodes a request's predictions look at: all of them up to ``k`` (0: all);
    past that, those holding the most of its prompt (up to half of ``k``), then the least loaded
    by ``load`` (``prefill_rank``; a decode node's ``decode_load``: what the node reports or
    this coordinator counts). Each node's prediction walks its queue or its streams, so admission's cost per
    request grew with the pool: a fifth of the coordinator's own CPU with 4 + 4 nodes on the twentieth sitting's
    load run. Power-of-k choices: the node a full look would pick is almost always among the
    least loaded and the prefix holders."""
    if k <= 0 or len(nodes) <= k:
        return nodes
    holders = sorted((n for n in nodes if held.get(n.node_id, NO_HOLD).tokens > 0),
                     key=lambda n: (-held[n.node_id].tokens, load(n)))[:k // 2]
    taken = {n.node_id for n in holders}
    return holders + heapq.nsmallest(k - len(holders), (n for n in nodes if n.node_id not in taken), key=load)


def prefill_rank(node: NodeClient) -> tuple[int, int]:
    """A prefill node's load for ``candidates``: the prompt tokens queued or running there, this
    coordinator's or the node's report (other coordinators' too), whichever is more."""
    load = node.fresh_load()
    return max(node.prefills.total, sum(load.prefill_queue) if load is not None else 0), 0


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
        # the disaggregated choice would miss its SLO and that would not (``_choose``); always: every
        # request it is predicted to serve within its SLO that way, running streams kept within
        # theirs (the prefill pool as colocated engines, for comparison runs); off: never.
        if colocate not in COLOCATE:
            raise ValueError(f"--colocate must be one of {', '.join(COLOCATE)}, got {colocate!r}")
        self.colocate = colocate
        # A newcomer may not push a running stream past its TPOT objective (estimates.pushed); off:
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
        hviews = ({n.node_id: decode_view(n, self.protect) for n in prefills} if self.colocate != "off"
                  else {})
        stalls = {e.node.node_id: _stalled(hviews[e.node.node_id], slo, e.idle_seconds) for e in pre
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
        p = (self.rng.choice(pre) if self.routing == "random" else _best(pre)) if pre else None
        d = _best(dec) if dec else None
        remote = _Option(p, d) if p is not None else None
        if remote is not None and p is not None and (pushes := stalls.get(p.node.node_id, 0)):
            # (Above the objective, so a miss: the disaggregated choice gives way as any miss does.)
            remote.others = Estimate(p.node, slo.tpot_s * (1.0 + pushes),  # type: ignore[operator]
                                     describe=lambda: f"{p.node.node_id}: its prefill there would push {pushes} "
                                     f"of the streams that node serves whole past their TPOT objective")
        local = self._local(decoders, prompt_tokens, max_tokens, slo, held, lives, views,
                            alone=self.router.pool_absent("prefill")) if self.local else None
        home = None
        if self.colocate != "off" and max_tokens > 1 and prefills:
            # The prefill nodes as decode nodes of their own: their streams, their batch over the
            # request's life, what a prefill there would do to those streams.
            hlives = {n.node_id: life_load(n, max_tokens, hviews[n.node_id]) for n in prefills}
            home = self._local(prefills, prompt_tokens, max_tokens, slo, held, hlives, hviews)
            if home is not None:
                home.colocated = True
        always = self.colocate == "always" and home is not None and not home.misses(slo)
        chosen = home if always else _choose(remote, local, slo, home)
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
                logger.info("request %s: %s%s: %s; %s", rid, decision,
                            (f", served whole on prefill node {plan.decode.node_id}" if plan.colocated  # type: ignore[union-attr]
                             else f", prefills on decode node {plan.decode.node_id}" if plan.local else ""),  # type: ignore[union-attr]
                            chosen.ttft.detail if chosen.ttft else "-", chosen.tpot.detail if chosen.tpot else "-")
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
            if what == "queue":
                parts.append(f"predicted TTFT {e.seconds * 1000:.0f} ms meets {limit * 1000:.0f} ms only by pushing "
                             f"{e.pushes} queued request(s) past theirs ({e.detail})")
                waits.append(1)
                continue
            if what == "streams":
                parts.append(f"predicted TPOT {e.seconds * 1000:.0f} ms meets {limit * 1000:.0f} ms only by pushing "
                             f"{e.pushes} running stream(s) past theirs ({e.detail})")
                waits.append(1)
                continue
            if what == "others":
                where = "prefill" if e.node.record.role == "prefill" else "decode"  # (a prefill node's: --colocate)
                parts.append(f"prefilling it on the {where} node would push its running streams past the TPOT "
                             f"objective: {e.detail}")
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
        # Load, for the overload margin: a refusal waiting could help (one no idle node would avoid
        # says nothing of the load), and not one the margin alone caused (it would feed itself).
        if count and retry is not None and (not margin or chosen.misses(Slo(asked.ttft_s, base_tpot))):
            self.pressure.note(True)
        msg = f"request refused, no node is predicted to meet its SLO: {'; '.join(parts)}"
        if count:
            logger.info("request %s: %s", rid, msg)
        raise Rejected(msg, plan.ttft_s, plan.tpot_s, retry)

    def _local(self, decoders: list[NodeClient], prompt_tokens: int, max_tokens: int, slo: Slo,
               held: dict[str, Held], lives: dict[str, tuple[float, float]], views: dict[str, DecodeView],
               alone: bool = False) -> _Option | None:
        """The best decode node to prefill this request itself, among those where that does not
        push the streams they are decoding past the TPOT objective (with none set: where no other
        prefill is running): the soonest start among those that meet both of its objectives, or
        with none, among them all. ``alone``: there is no prefill pool to send it to instead (none
        registered, none coming back), so with no such node the best of the rest, carrying what it
        would do to their streams (a miss: admission refuses it)."""
        fits: list[tuple[LocalEstimate, NodeClient]] = []
        harmful: list[tuple[LocalEstimate, NodeClient, float, str]] = []
        unknown: list[NodeClient] = []
        for n in decoders:
            view = views[n.node_id]
            est = local_estimate(n, prompt_tokens, max_tokens, held.get(n.node_id, Held()), lives.get(n.node_id),
                                 self.kv_room, view)
            if est is None:
                unknown.append(n)
                continue
            batch, context, step = view.batch, view.context, view.step
            if self.protect and slo.tpot_s is not None and batch and _all_known(view):
                # Every stream running there is this coordinator's, and it knows what each has left of
                # its objective: none may be pushed past it (``pushed``), by the step with this request
                # in the batch and the node's recent share of local prefills beside it, or by the
                # plain step and this prefill's stall once, whichever is more for it, on top of the
                # stall of the local prefills queued there ahead of it.
                # (The steps at their fit, not calibrated: see ``estimates.pushed``.)
                pushes = pushed(view.tpot_left, view.step_now, step(batch + 1, context + prompt_tokens), est.stall_s,
                                n.model.step_s(batch + 1, context + prompt_tokens), est.ahead_s)
                if pushes:
                    # (Above the objective, so a miss; the fewest pushed first.)
                    harmful.append((est, n, slo.tpot_s * (1.0 + pushes),
                                    f"prefilling it there would push {pushes} of its running streams past their "
                                    f"TPOT objective (a stall of {est.stall_s * 1000:.0f} ms once)"))
                    continue
            elif slo.tpot_s is not None and batch:
                # Its streams' step: with the node's recent share of time in local prefills beside it
                # (those to come, at the recent rate), or this prefill's own stall spread over
                # their tokens when that is more (a longer prompt than the recent ones): not both,
                # the recent share already counts a prefill like this one.
                # (Their step calibrated as the node's TPOT predictions, a raw one scattering far wider
                # than what happens; this prefill's stall, a prefill time, as its TTFT there.)
                theirs = max(n.calibrated("tpot", view.step_now),
                             n.calibrated("tpot", n.model.step_s(batch, context)) + est.harm_s)
                if theirs > slo.tpot_s:
                    harmful.append((est, n, theirs, f"it would slow the running streams to {theirs * 1000:.0f} ms a "
                                    f"token > {slo.tpot_s * 1000:.0f} ms (its {batch} streams' step, with its recent "
                                    "local prefills beside it or with this one's stall spread over their tokens, "
                                    "whichever is more)"))
                    continue
            elif batch and not alone and (n.prefilling or (view.load is not None and view.load.prefill_queue)):
                continue
            fits.append((est, n))
        if fits:
            # The soonest start among the nodes that meet both objectives there, if any do (a node
            # holding the prompt's prefix starts it soonest, but its batch may be the larger).
            meet = [(e, n) for e, n in fits if not _Option(e.ttft, e.tpot).misses(slo)] or fits
            best = _best([e.ttft for e, _ in meet])
            est = next(e for e, n in meet if n is best.node)
            return _Option(est.ttft, est.tpot, local=True)
        if not (alone and (harmful or unknown)):
            return None
        if unknown:  # a node with no model yet takes it (the least loaded): unpredicted, it learns from it
            m = min(unknown, key=lambda n: (n.outstanding, n.served, n.node_id))
            return _Option(Estimate(m, None), None, local=True)
        est, n, theirs, why = min(harmful, key=lambda h: h[2])
        others = Estimate(n, theirs, describe=lambda: f"{n.node_id}: {why} (no prefill node to send it to)")
        return _Option(est.ttft, est.tpot, local=True, others=others)


def _kept(headroom: float, margin: float) -> str:
    """What the TPOT objective was admitted against less, in words."""
    def pct(x: float) -> str:
        return f"{x:.0%}" if x >= 0.01 else f"{x:.1%}"

    parts = ([f"{pct(headroom)} headroom"] if headroom else []) + ([f"{pct(margin)} overload margin"] if margin else [])
    return " and ".join(parts)


def _stalled(view: DecodeView, slo: Slo, stall_s: float) -> int:
    """On a prefill node serving streams whole (--colocate): how many of them a prefill sent there
    would push past their TPOT objective, waiting ``stall_s`` (its prefill alone) for it once at
    their plain step, behind the prompts queued in its engine (``pushed``; a stream missing anyway
    is not counted). 0 without a TPOT objective, with protection off (no budgets asked), or where
    this coordinator does not know every stream there."""
    if slo.tpot_s is None or not view.tpot_left or not _all_known(view):
        return 0
    model = view.node.model
    plain = model.step_s(view.batch, view.context)
    return pushed(view.tpot_left, view.step_now, view.step_now, stall_s, plain, view.queue_s)


def _all_known(view: DecodeView) -> bool:
    """Whether this coordinator knows what each stream running on the view's node has left of its
    TPOT objective: as many of its streams there have their first token (and a budget) as the node
    reports running (another coordinator's, or one without an objective, would not be protected)."""
    if not view.node.budgets:
        return False
    load = view.load
    return len(view.tpot_left) >= (load.decode_batch if load is not None else len(view.node.inflight))


def _choose(remote: _Option | None, local: _Option | None, slo: Slo, home: _Option | None = None
            ) -> _Option | None:
    """Disaggregated unless prefilling on the decode node is predicted to meet the SLO where the
    prefill pool would not, or, when the prefill pool has work queued, to start clearly sooner
    (``LOCAL_GAIN``); with no prefill node, the decode node. And when that choice misses the SLO
    (a decode pool at its TPOT objective's edge, most often), ``home``, a prefill node serving the
    request whole, if it meets it: the prefill pool's spare time decodes (``--colocate``)."""
    chosen = _choose_disagg(remote, local, slo)
    if home is None or home.ttft_s is None or chosen is None or chosen.ttft_s is None:
        return chosen  # (no prefill pool, or a node not predicted: routed by load as before)
    if chosen.misses(slo) and not home.misses(slo):
        return home
    return chosen


def _choose_disagg(remote: _Option | None, local: _Option | None, slo: Slo) -> _Option | None:
    """``_choose`` without colocation."""
    if local is None or local.ttft_s is None:
        return remote if remote is not None or local is None else local  # (no prefill pool: unpredicted)
    if remote is None or remote.ttft_s is None:
        return local if remote is None else remote
    local_ok, remote_ok = not local.misses(slo), not remote.misses(slo)
    if local_ok != remote_ok:
        return local if local_ok else remote
    if not local_ok:
        # Neither: the prefill pool (refused with its numbers; with admission off, served there: a
        # prefill that misses anyway must not also stall the decode node's streams).
        return remote
    # Both meet it: only a queue in the prefill pool is worth the decode node's time (two idle
    # nodes differ by the noise of their fits, and the decode node's steps are its streams').
    assert remote.ttft is not None
    queued = remote.ttft.queue_s > 0
    return local if queued and local.ttft_s < remote.ttft_s * (1 - LOCAL_GAIN) else remote
