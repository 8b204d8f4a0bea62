"""Colocation in the simulator (``SimConfig.colocate``; the coordinator's --colocate): the
predictions about prefill nodes that serve requests whole, read from a ``simpredict.ClusterState``
(which takes them in as a base class): the prefill pool's wait with the prompts its nodes serve
whole, what a prompt stalls those streams, the requests waiting for the pool a prompt served
whole would push past their TTFT, and which node serves a request whole (``home_choice``). What
they decide and how: tandem/simpredict.py's module docstring, "Colocation"."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.simpredict import _Decode


class Colocation:
    """``ClusterState``'s colocation predictions (its state: ``homes``, ``busy_until``,
    ``queue``, ``queued_cost``, ``queued_s``; its other predictions)."""

    homes: list[Any]
    busy_until: list[float]
    queue: list[tuple[float, int]]
    queued_cost: dict[int, float]
    queued_s: float
    cfg: Any
    trace: Any

    def pool_wait_s(self, now: float) -> float:
        """The prefill pool's work ahead of a new prefill call, summed over its nodes, as predicted:
        each node's call in progress (``busy_until``), and with colocation the prompts it serves
        whole that its engine runs before its next call (those that came after the call in
        progress; the ones before it are in ``busy_until``), as the coordinator's
        ``prefill_estimate`` counts a node's prompts served whole (not the beside term)."""
        wait = sum(max(0.0, t - now) for t in self.busy_until)
        for h in self.homes:
            calls = [k for k, r in enumerate(h.local) if r in h.leaves]
            after = h.local[calls[-1] + 1:] if calls else h.local
            if after:
                wait += self.local_queue_s(h, after)
        return wait

    def backlog_s(self, home: _Decode) -> float:
        """On a prefill node (colocation): what every prompt this coordinator has for it stalls the
        streams it serves whole, model only (``estimates.backlog_s``): those in its engine, and its
        share of the requests waiting for the prefill pool."""
        return self.local_queue_s(home) + self.queued_s / self.cfg.num_prefill

    def stalls_everywhere(self, i: int, now: float) -> bool:
        """With admission and colocation: every prefill node would push a stream it serves whole
        past its TPOT objective by prefilling request ``i`` (``stalls``); a node with no stream
        there never does."""
        return bool(self.homes) and all(self.stalls(p, i, now) for p in range(len(self.homes)))

    def stalls(self, p: int, i: int, now: float) -> bool:
        """With colocation and admission: whether prefilling request ``i`` on prefill node ``p``
        pushes a stream it serves whole past its objective (``choice.stalled``: the prefill alone
        once, at the plain step, behind the node's backlog)."""
        if not (self.homes and self.cfg.admission and self.homes[p].running):
            return False
        from tandem.coordinator.pace import pushed

        h, pre = self.homes[p], self.cfg.prefill
        b, ctx = self.load(h)
        plain = pre.step_s(b, ctx)
        stall = self.prefill_cost(pre, i, self.engine_held(h, i))
        return pushed(self.budgets(h, now), plain, plain, stall, plain, self.backlog_s(h)) > 0

    def queue_pushed(self, p: int, run_s: float, now: float) -> int:
        """How many more of the requests waiting for the prefill pool would miss their TTFT
        objective if prefill node ``p`` first ran ``run_s`` of work that skips the queue (a prompt
        it serves whole: ``PrefillOrder.pushed_by``): the queue in its order, each to the node free
        first."""
        if not self.queue or self.cfg.order == "fifo":  # (fifo: the coordinator holds no queue)
            return 0
        waiting = sorted(self.queue)

        def late(free: list[float]) -> int:
            n = 0
            for _, r in waiting:
                k = min(range(len(free)), key=free.__getitem__)
                free[k] += self.queued_cost[r]
                n += free[k] > self.trace[r].arrival_s + self.cfg.slo_ttft_s
            return n

        free = [max(now, t) for t in self.busy_until]
        after = list(free)
        after[p] += run_s
        return max(0, late(after) - late(free))

    def home_choice(self, i: int, now: float) -> tuple[int, float, float] | None:
        """Colocation: the prefill node to serve request ``i`` whole, with its raw TTFT and TPOT
        there, or None: among the nodes where it meets both objectives (its TPOT over its life
        with the node's prefills beside, ``life_tpot``), pushes none of the streams that node
        serves whole past theirs (with admission: ``pushes``) and pushes no request waiting for
        the pool past its TTFT (``queue_pushed``), the soonest start; those tied with it, the
        fewest served whole there (``choice.local_option`` over the prefill nodes)."""
        from tandem.coordinator.choice import tied

        meet: list[tuple[float, int, float, float]] = []
        for h in self.homes:
            ttft, harm, stall, ahead, raw, run_s = self.engine_ttft(h, i)
            tpot = self.life_tpot(h, i, now)
            if ttft > self.cfg.slo_ttft_s or self.calibrated(h, "tpot", tpot) > self.cfg.slo_tpot_s:
                continue
            if self.queue_pushed(h.index, run_s, now):
                continue
            if self.cfg.admission:
                if self.pushes(h, i, now, (stall, ahead)):
                    continue
            elif h.assigned:
                # Unprotected (no budgets asked): the streams' step, with the node's recent prefills
                # beside or plain with this one's stall spread over their tokens, whichever is more,
                # within the objective (``choice.local_option``'s, ``local_choice``'s ``harms``).
                b, ctx = self.load(h)
                theirs = max(self.calibrated(h, "tpot", self.stepper(h, now)(b, ctx)),
                             self.calibrated(h, "tpot", self.cfg.prefill.step_s(b, ctx)) + harm)
                if theirs > self.cfg.slo_tpot_s:
                    continue
            meet.append((ttft, h.index, raw, tpot))
        if not meet:
            return None
        low = min(m[0] for m in meet)
        _, p, raw, tpot = min((m for m in meet if tied(m[0], low)), key=lambda m: (self.homes[m[1]].assigned, m[1]))
        return p, raw, tpot
