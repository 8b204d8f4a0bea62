"""Which option admission (admission.py) takes for a request, from the estimates (estimates.py).

The options: the prefill pool then the decode pool (*remote*: the best prefill node by its
predicted TTFT, the best decode node by its TPOT, ``best``), a decode node prefilling the request
itself (*local*, conditional disaggregation: ``local_option``), and with --colocate a prefill node
serving it whole (*home*: ``local_option`` over the prefill nodes). ``choose`` picks among them;
``Option.misses`` says which objectives the pick misses, and admission refuses on those.
Which nodes a request's predictions look at at all: ``candidates``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .estimates import DecodeView, Estimate, LocalEstimate, local_estimate
from .nodeclient import NodeClient
from .pace import pushed
from .prefix import Held

if TYPE_CHECKING:
    from .admission import Slo

NO_HOLD = Held()
LOCAL_GAIN = 0.2  # prefill on the decode node when that starts this much sooner (and both meet the SLO)


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


def best(estimates: list[Estimate]) -> Estimate:
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
        top = min(known, key=lambda e: e.seconds)  # type: ignore[arg-type,return-value]
        low = top.seconds
        assert low is not None

        def alike(e: Estimate) -> bool:
            assert e.seconds is not None
            if abs(e.cached_tokens.tokens - top.cached_tokens.tokens) >= AFFINITY_TOKENS:
                return False  # a prefix held on one node is a real difference, not fit noise
            if tied(e.seconds, low):
                return True
            # Two idle nodes: only their fits differ, and a node just restarted carries its cached
            # profile's (taken at startup, a few times slower than what a node serving warm
            # predicts). Within IDLE_TIE of each other they take turns, and both keep learning.
            return e.queue_s == 0 and top.queue_s == 0 and e.seconds <= low * IDLE_TIE

        pool = [e for e in known if alike(e)]
    else:
        pool = estimates
    return min(pool, key=lambda e: (e.node.outstanding, e.node.served, e.seconds or 0.0, e.node.node_id))


@dataclass
class Option:
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


def local_option(decoders: list[NodeClient], prompt_tokens: int, max_tokens: int, slo: Slo,
                 held: dict[str, Held], lives: dict[str, tuple[float, float]], views: dict[str, DecodeView],
                 protect: bool = True, kv_room: bool = True, alone: bool = False,
                 queue_pushes: Callable[[NodeClient, float], int] | None = None) -> Option | None:
    """The best decode node to prefill this request itself, among those where that does not
    push the streams they are decoding past the TPOT objective (with none set: where no other
    prefill is running): the soonest start among those that meet both of its objectives, or
    with none, among them all. ``alone``: there is no prefill pool to send it to instead (none
    registered, none coming back), so with no such node the best of the rest, carrying what it
    would do to their streams (a miss: admission refuses it). ``protect``, ``kv_room``: admission's
    (``Admission.protect``: its streams' budgets asked; ``Admission.kv_room``). ``queue_pushes``:
    on prefill nodes (--colocate), how many requests waiting in the prefill order for a node a
    prefill of so many seconds sent straight to its engine would push past their TTFT objective
    (``PrefillOrder.pushed_by``): a node that pushes any is a "queue" miss, passed over while
    another meets the objectives."""
    fits: list[tuple[LocalEstimate, NodeClient]] = []
    harmful: list[tuple[LocalEstimate, NodeClient, float, str]] = []
    unknown: list[NodeClient] = []
    for n in decoders:
        view = views[n.node_id]
        est = local_estimate(n, prompt_tokens, max_tokens, held.get(n.node_id, Held()), lives.get(n.node_id),
                             kv_room, view)
        if est is None:
            unknown.append(n)
            continue
        if queue_pushes is not None and est.ttft.idle_seconds:
            est.ttft.pushes = queue_pushes(n, est.ttft.idle_seconds)
        batch, context, step = view.batch, view.context, view.step
        if protect and slo.tpot_s is not None and batch and all_known(view):
            # Every stream running there is this coordinator's, and it knows what each has left of
            # its objective: none may be pushed past it (``pushed``), by the step with this request
            # in the batch and the node's recent share of local prefills beside it, or by the
            # plain step and this prefill's stall once, whichever is more for it, on top of the
            # stall of the local prefills queued there ahead of it.
            # (The steps at their fit, not calibrated: see ``pace.pushed``.)
            # (On a prefill node, every prompt it has to prefill stalls them: those in its engine,
            # which run before this one, and the prefill calls still waiting their turn in the
            # prefill order, after it: ``backlog_s``; and its streams are judged at the plain step,
            # ``stalled``'s reason.)
            plain = n.model.step_s(batch + 1, context + prompt_tokens)
            if n.record.role == "prefill":
                ahead, now, new = max(est.ahead_s, view.backlog_s), n.model.step_s(batch, context), plain
            else:
                ahead, now, new = est.ahead_s, view.step_now, step(batch + 1, context + prompt_tokens)
            pushes = pushed(view.tpot_left, now, new, est.stall_s, plain, ahead)
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
        meet = [(e, n) for e, n in fits if not Option(e.ttft, e.tpot).misses(slo)] or fits
        top = best([e.ttft for e, _ in meet])
        est = next(e for e, n in meet if n is top.node)
        return Option(est.ttft, est.tpot, local=True)
    if not (alone and (harmful or unknown)):
        return None
    if unknown:  # a node with no model yet takes it (the least loaded): unpredicted, it learns from it
        m = min(unknown, key=lambda n: (n.outstanding, n.served, n.node_id))
        return Option(Estimate(m, None), None, local=True)
    est, n, theirs, why = min(harmful, key=lambda h: h[2])
    others = Estimate(n, theirs, describe=lambda: f"{n.node_id}: {why} (no prefill node to send it to)")
    return Option(est.ttft, est.tpot, local=True, others=others)



def stalled(view: DecodeView, slo: Slo, stall_s: float) -> int:
    """On a prefill node serving streams whole (--colocate): how many of them a prefill sent there
    would push past their TPOT objective, waiting ``stall_s`` (its prefill alone) for it once at
    their plain step, behind every prompt this coordinator has for the node (``backlog_s``: the
    prefill calls still waiting their turn in the prefill order too, not only those in its
    engine; ``pushed``; a stream missing anyway is not counted). 0 without a TPOT objective, with
    protection off (no budgets asked), or where this coordinator does not know every stream there.
    (Counting only the engine's queue, as the fortieth sitting did, each prefill of a burst found
    the same slack free: the streams served whole that missed their objective on its runs had
    waited 0.8-1.2 s in the median for prefills admitted after them, those that met it 0.6-0.7.)

    The streams are judged at the node's plain step, not at its step with its recent share of
    prefills beside it (``DecodeView.step_now``, ``pace.stepper``): that share is this pool's
    own prefills, the ones this check lets in one by one, so at the shared pace a stream whose
    slack they would take counted as missing anyway and was not protected (the share read
    0.24-0.44 at the admissions of streams served whole on the forty-first sitting's colo41b, a
    stream at the edge paced at ~1.5 x its plain step, and the check fired 6 times for the 242
    requests admitted to be served whole)."""
    if slo.tpot_s is None or not view.tpot_left or not all_known(view):
        return 0
    plain = view.node.model.step_s(view.batch, view.context)
    return pushed(view.tpot_left, plain, plain, stall_s, plain, max(view.queue_s, view.backlog_s))


def all_known(view: DecodeView) -> bool:
    """Whether this coordinator knows what each stream running on the view's node has left of its
    TPOT objective: as many of its streams there have their first token (and a budget) as the node
    reports running (another coordinator's, or one without an objective, would not be protected)."""
    if not view.node.budgets:
        return False
    load = view.load
    return len(view.tpot_left) >= (load.decode_batch if load is not None else len(view.node.inflight))


def choose(remote: Option | None, local: Option | None, slo: Slo, home: Option | None = None
            ) -> Option | None:
    """Disaggregated unless prefilling on the decode node is predicted to meet the SLO where the
    prefill pool would not, or, when the prefill pool has work queued, to start clearly sooner
    (``LOCAL_GAIN``); with no prefill node, the decode node. And when that choice misses the SLO
    (a decode pool at its TPOT objective's edge, most often), ``home``, a prefill node serving the
    request whole, if it meets it: the prefill pool's spare time decodes (``--colocate``)."""
    chosen = choose_disagg(remote, local, slo)
    if home is None or home.ttft_s is None or chosen is None or chosen.ttft_s is None:
        return chosen  # (no prefill pool, or a node not predicted: routed by load as before)
    if chosen.misses(slo) and not home.misses(slo):
        return home
    return chosen


def choose_disagg(remote: Option | None, local: Option | None, slo: Slo) -> Option | None:
    """``choose`` without colocation."""
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
