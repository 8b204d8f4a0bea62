"""A discrete-event simulator of a Tandem cluster, driven by node profiles.

It plays a trace (``tandem bench``'s workloads) through P prefill and D decode
nodes whose times come from a profile (``Timings``: DistServe's forms, the
same ones the nodes fit online, see tandem/perfmodel.py):

- **Coordinator.** Requests wait in one queue at the coordinator and go to a
  prefill node when it is free, in arrival order (``fifo``) or by deadline
  (``slack``, close to Tandem's default order: earliest deadline first among
  the requests that can still meet their TTFT objective, then the ones that
  cannot, oldest first; Tandem's own queue is one per prefill node and drops
  the longest requests when a set cannot all make it (Moore-Hodgson), which
  this single queue does not). Each prefill node runs one prefill at a time:
  ``prefill_s(tokens)``.
- **First token.** The prefill produces the first token (TTFT ends there).
- **Transfer.** The decode node with the fewest requests assigned when it
  arrived takes the request (booked then, as the coordinator books it: it
  counts in that node's load from then on); its KV arrives ``transfer_s(bytes)`` later (transfers do not
  contend with each other: a simplification).
- **Decode.** Continuous batching: a step of B running requests holding L
  context tokens takes ``step_s(B, L)`` and gives each of them a token; a
  request that arrives mid-step joins at the next step, up to ``max_batch``
  and, when ``kv_capacity_tokens`` is set, while its whole prompt and output
  fit beside the running ones (reserved up front: no preemption).

- **Admission** and **conditional disaggregation** (``admission``, ``local``; off by default):
  what they decide and how, in tandem/simpredict.py.

- **Colocation** (``colocate``, off by default; the coordinator's --colocate, on by default
  there): a prefill node serves a request whole when the choice above is predicted to miss the
  SLO and that is not (tandem/simpredict.py, ``home_choice``). Each prefill node then is an
  engine like a decode node's: its prompts (the streams it serves whole, and the prefill calls
  the coordinator sends it, one at a time, as before) go in chunks of up to
  ``prefill_step_tokens`` in its steps, beside the batch of the streams it serves whole, in the
  order they reached it; a prefill call's last chunk gives its first token and sends its KV on to
  its decode node, a prompt served whole joins the batch. A prompt served whole goes to the
  engine at once, past the requests waiting for the pool.

- **Prefix caching** (``prefix_cache``, off by default; entries with ``input_ids``): each
  node's engine keeps the whole blocks of the prompts it computed (or, on a decode node, took in
  as KV) by a hash of their tokens chained to the blocks before (vLLM's prefix cache); a prefill
  computes only the tokens past the longest run of them from the prompt's start (the last prompt
  token always: ``prefill_s`` of the uncached tokens after the cached ones), and the predictions
  (tandem/simpredict.py) count that too. Of the idle prefill nodes, the one where it costs least (prefill after what it
  holds, and the load) takes a request (Tandem's router credits a held prefix against load). A prefill engine keeps
  ``prefill_cache_tokens`` (0: no bound), least recently used out first; a decode engine what
  its running requests leave of ``kv_capacity_tokens``. Blocks of ``block_tokens`` (32: a node's
  --block-size default).
- **The KV store** (``store_ram_tokens``, 0: none; with prefix caching): each node keeps the
  whole ``chunk_tokens`` chunks of the prompts it computes (a prefill node's, a decode node's own
  prefills) in a RAM tier of ``store_ram_tokens``, least recently used out first to an unbounded
  disk tier (``store_disk``) or gone; a node holds a prompt's longest run of stored chunks from
  its start, and those past what its engine holds are loaded before the prefill at the
  coordinator's costs (``coordinator/prefix.load_cost_s``: the node's learned load fit,
  ``Timings.store_load``, or the per-token constants), a disk
  chunk going back into RAM. Where a prefill goes, the cost counts: prefill after the held
  prefix plus its load.

- **Node speed** (``prefill_speed``, ``decode_speed``; off by default): each node's work takes
  its fit's time times a factor drawn as tandem/nodespeed.py measures real nodes' (a slow part
  that lasts about a second, each piece's own jitter, and a bias: the factor's mean), which the
  predictions above do not see, as a real coordinator's predictions from a node's fit do not;
  the coordinator's view of a busy prefill node is the predicted end until the prefill ends.
  Seeded (``speed_seed``).

Not modelled yet (the simulator says so in its results): sharing chunks between nodes, and
network contention.
"""

from __future__ import annotations

import copy
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tandem.coordinator.calibration import Calibration
from tandem.nodespeed import NodeSpeed
from tandem.perfmodel import beside_s, chunk_tokens
from tandem.simcache import PrefixCache, StoreTiers, block_keys
from tandem.simconfig import SimConfig
from tandem.simpredict import ClusterState, _Decode
from tandem.simresults import Outcome, mean_summary, summary

__all__ = ["Learned", "PrefixCache", "StoreTiers", "block_keys", "simulate", "simulate_draws", "simulate_summary"]

SPEED_DRAWS = 4  # draws of the nodes' speeds a summary averages, where they vary

ARRIVE, PREFILLED, JOIN, STEPPED, START, HSTEPPED, HSTART = range(7)  # events (H: a prefill node's engine)


def simulate(cfg: SimConfig, trace: Sequence[Any]) -> list[Outcome]:
    """Each entry of ``trace`` needs ``arrival_s``, ``input_len`` and ``output_len``; one Outcome per
    entry, in the trace's order. Requests that cannot fit a decode node's KV cache at all end
    uncompleted."""
    return _Cluster(cfg, trace).run()


@dataclass
class Learned:
    """What a simulated coordinator learned from its finished requests (its calibrations: the
    prefill pool's, each decode node's), to start the next trace with, as a real coordinator
    serving one trace after another keeps its own."""

    pool: Calibration
    decode: list[dict[str, Calibration]]
    homes: list[dict[str, Calibration]] = field(default_factory=list)  # colocation: each prefill node's engine's


def simulate_summary(cfg: SimConfig, trace: Sequence[Any], slo_ttft_s: float, slo_tpot_s: float,
                     draws: int = SPEED_DRAWS) -> dict[str, Any]:
    """``simresults.summary`` of ``trace`` against these objectives; where the nodes' speeds vary,
    the mean over ``draws`` draws of them (seeds ``speed_seed`` on)."""
    return simulate_draws(cfg, trace, slo_ttft_s, slo_tpot_s, draws)[0]


def simulate_draws(cfg: SimConfig, trace: Sequence[Any], slo_ttft_s: float, slo_tpot_s: float,
                   draws: int = SPEED_DRAWS, learned: Sequence[Learned] = ()) -> tuple[dict[str, Any], list[Learned]]:
    """``simulate_summary``, each draw starting from what the same draw learned on the trace
    before (``learned``, by draw; none: afresh); with what each learned by this trace's end."""
    sums, after = [], []
    for k in range(draws if cfg.speeds_vary else 1):
        # (a draw with no such draw before, the speeds having varied only now: the last one's)
        cluster = _Cluster(replace(cfg, speed_seed=cfg.speed_seed + k), trace,
                           learned[min(k, len(learned) - 1)] if learned else None)
        sums.append(summary(cluster.run(), slo_ttft_s, slo_tpot_s))
        after.append(cluster.learned())
    return mean_summary(sums), after


class _Cluster(ClusterState):
    """The event loop: arrivals, prefills, KV arriving, decode steps, each moving the state on."""

    def __init__(self, cfg: SimConfig, trace: Sequence[Any], learned: Learned | None = None) -> None:
        super().__init__(cfg, trace)
        if learned is not None:
            self.pool_cal = copy.deepcopy(learned.pool)
            # (a decode node the cluster before lacked starts afresh, as a newly joined one does)
            for dn, cal in zip(self.decodes, learned.decode):
                dn.cal = copy.deepcopy(cal)
            for h, cal in zip(self.homes, learned.homes):
                h.cal = copy.deepcopy(cal)
        self.events: list[tuple[float, int, int, int, int]] = []  # (time, seq, kind, node, request)
        self.seq = 0
        # each node's speed against its fit (prefill nodes first), unseen by the predictions
        rng = random.Random(cfg.speed_seed)
        self.speeds = ([NodeSpeed(cfg.prefill_speed, rng) for _ in range(cfg.num_prefill)]
                       + [NodeSpeed(cfg.decode_speed, rng) for _ in range(cfg.num_decode)])

    def learned(self) -> Learned:
        """Its calibrations as they stand (copies)."""
        return Learned(copy.deepcopy(self.pool_cal), [copy.deepcopy(dn.cal) for dn in self.decodes],
                       [copy.deepcopy(h.cal) for h in self.homes])

    def ran(self, node: int, now: float, took: float) -> float:
        """What work predicted at ``took`` seconds, starting at ``now`` on ``node`` (prefill nodes
        first, then decode nodes), took."""
        speed = self.speeds[node]
        return took * speed.factor(now) if speed.speed.varies else took

    def push(self, t: float, kind: int, node: int, req: int) -> None:
        """An event at ``t`` (ties run in the order pushed)."""
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, node, req))

    def run(self) -> list[Outcome]:
        """Every arrival, then events in time order until none is left; each request's Outcome."""
        for i, e in enumerate(self.trace):
            self.push(e.arrival_s, ARRIVE, -1, i)
        while self.events:
            now, _, kind, node, i = heapq.heappop(self.events)
            if kind == ARRIVE:
                self.arrive(i, now)
            elif kind == PREFILLED:
                self.prefilled(node, i, now)
            elif kind == JOIN:
                self.join(node, i, now)
            elif kind in (START, HSTART):
                self.step(self.homes[node] if kind == HSTART else self.decodes[node], now)
            else:
                self.stepped(self.homes[node] if kind == HSTEPPED else self.decodes[node], now)
        return self.out

    def next_request(self, now: float) -> int | None:
        """The coordinator's next request for an idle prefill node (``order``), or None."""
        cfg, queue = self.cfg, self.queue
        while queue:
            key, i = queue[0]
            # a request that cannot make its deadline now never can again: after the ones that can
            if cfg.order == "slack" and now + self.queued_cost[i] > key:
                heapq.heappop(queue)
                heapq.heappush(self.late, i)
                continue
            heapq.heappop(queue)
            return i
        return heapq.heappop(self.late) if self.late else None

    def dispatch(self, now: float) -> None:
        """Idle prefill nodes take queued requests, each the node where it costs least (with
        colocation, one whose streams served whole it would not push past their objective first).
        With colocation the prefill goes into the node's engine, behind the prompts it serves
        whole that are there, and runs in its steps beside their batch."""
        pre = self.cfg.prefill
        while self.idle and (i := self.next_request(now)) is not None:
            self.queued_s -= self.queued_cost.pop(i)  # (before ``stalls``: not in the backlog of its own)
            # the idle node where it costs least (the prefix it holds), the first of those
            node = min(self.idle, key=lambda n: (self.stalls(n, i, now), self.prefill_cost(pre, i, self.held_on(
                self.prefill_caches[n], self.prefill_stores[n], i, pre)), n))
            self.idle.remove(node)
            self.out[i].prefill_node = node
            held = self.held_on(self.prefill_caches[node], self.prefill_stores[node], i, pre, touch=True)
            took = self.prefill_cost(pre, i, held)
            if self.homes:
                home = self.homes[node]
                self.busy_until[node] = now + self.local_queue_s(home) + took  # as predicted: the coordinator's view
                self.engine_prefill(home, i, held, now, leaves=True)
                continue
            self.busy_until[node] = now + took  # as predicted: the coordinator's view
            self.push(now + self.ran(node, now, took), PREFILLED, node, i)

    def engine_prefill(self, dn: _Decode, i: int, held: tuple[int, float], now: float, leaves: bool = False) -> None:
        """Request ``i``'s prompt into an engine's queue of prefills, past ``held`` (tokens, load
        seconds); ``leaves``: a prefill node's prefill call, decoded elsewhere."""
        if not dn.local:
            dn.busy_since = now
        dn.local.append(i)
        if leaves:
            dn.leaves.add(i)
        n = self.trace[i].input_len - held[0]
        dn.local_left[i] = n
        dn.local_total[i] = (n, held[0], held[1])
        if not dn.stepping:
            dn.stepping = True
            self.push(now, HSTART if dn.home else START, dn.index, -1)

    def step(self, dn: _Decode, now: float) -> None:
        """An engine (a decode node's, or with colocation a prefill node's) starts a step: requests
        waiting join its batch while there is room, a chunk of the prefill at the head of its
        queue rides along; nothing to do, it idles."""
        cfg, trace, t = self.cfg, self.trace, self.timings(dn)
        cap = cfg.prefill_cache_tokens if dn.home else cfg.kv_capacity_tokens
        while dn.waiting and len(dn.running) < cfg.max_batch:
            i = dn.waiting[0]
            need = trace[i].input_len + trace[i].output_len
            if cap and dn.reserved + need > cap and dn.running:
                break
            dn.waiting.pop(0)
            self.out[i].decode_wait_s = now - self.joined_at.pop(i)
            dn.reserved += need
            heapq.heappush(dn.running, (dn.step_no + trace[i].output_len - 1, i))
            dn.base += trace[i].input_len + 1 - dn.step_no
        took = 0.0
        if dn.local:  # a chunk of the local prefill at its head rides in this step
            r = dn.local[0]
            left = dn.local_left[r]
            c = min(chunk_tokens(self.budget(dn), len(dn.running)), left)
            total, held, load_s = dn.local_total[r]
            done = total - left
            # (the held prefix's load goes before its first chunk)
            took = t.prefill_s(done + c, held) - (t.prefill_s(done, held) if done else -load_s)
            dn.chunk = (r, c)
        if not dn.running and dn.chunk is None:
            dn.stepping = False
            return
        dn.stepping = True
        b, ctx = len(dn.running), dn.base + len(dn.running) * dn.step_no
        if dn.chunk is not None:
            took += beside_s(t, b, ctx)  # the chunk's own time holds the step's overhead
        else:
            took += t.step_s(b, ctx)
        if dn.home:
            self.push(now + self.ran(dn.index, now, took), HSTEPPED, dn.index, -1)
        else:
            self.push(now + self.ran(cfg.num_prefill + dn.index, now, took), STEPPED, dn.index, -1)

    def arrive(self, i: int, now: float) -> None:
        """Request ``i`` arrives: refused, prefilled on a decode node, served whole on a prefill
        node (colocation: where the choice so far is predicted to miss the SLO and that is not),
        or queued for the prefill pool."""
        cfg, e, o = self.cfg, self.trace[i], self.out[i]
        if cfg.local:
            d, ok = self.local_choice(i, now)
        else:
            d, ok = None, self.admit(i, now) if cfg.admission or self.homes else True
        if self.homes and not ok and e.output_len > 1 and (home := self.home_choice(i, now)) is not None:
            p, raw_ttft, raw_tpot = home
            h = self.homes[p]
            o.local, o.colocated, o.prefill_node = True, True, p
            h.assigned += 1
            h.arrivals.add(e.output_len, now)
            self.raw[i] = (raw_ttft, raw_tpot)
            self.engine_prefill(h, i, self.engine_held(h, i, touch=True), now)
            return
        if cfg.admission and not ok:
            o.refused = True
            self.raw.pop(i, None)
            return
        if d is not None:
            dn = self.decodes[d]
            o.local, o.decode_node = True, d
            dn.assigned += 1
            dn.arrivals.add(e.output_len, now)
            self.engine_prefill(dn, i, self.decode_held(d, i, touch=True), now)
            return
        if self.decodes_it(i):  # its decode node booked now, as the coordinator books it
            d = self.booked_node()
            dn = self.decodes[d]
            dn.assigned += 1
            dn.arrivals.add(e.output_len, now)
            dn.booked.add(i)
            o.decode_node = d
        heapq.heappush(self.queue, (e.arrival_s if cfg.order == "fifo" else e.arrival_s + cfg.slo_ttft_s, i))
        self.queued_cost[i] = self.pool_prefill_s(i)
        self.queued_s += self.queued_cost[i]
        self.dispatch(now)

    def decodes_it(self, i: int) -> bool:
        """Request ``i`` goes on to a decode node after its prefill: more than one token, and a
        prompt and output that fit a decode node's KV cache."""
        e, cap = self.trace[i], self.cfg.kv_capacity_tokens
        return e.output_len > 1 and not (cap and e.input_len + e.output_len > cap)

    def prefilled(self, node: int, i: int, now: float) -> None:
        """Prefill node ``node`` finished request ``i``: its first token; its KV on the way to the
        decode node booked for it at its arrival."""
        cfg = self.cfg
        self.idle.append(node)
        self.idle.sort()
        self.busy_until[node] = now  # (done, sooner or later than predicted: nothing left there)
        self.prefill_caches[node].add(self.keys(i))
        if (store := self.prefill_stores[node]) is not None:
            store.save(self.chunks(i))
        o, e = self.out[i], self.trace[i]
        o.ttft_s = now - o.arrival_s
        self.produced_start[i] = now
        self.dispatch(now)
        if e.output_len <= 1:
            o.e2e_s, o.completed = o.ttft_s, True
            self.finished(i)
            return
        if not self.decodes_it(i):
            o.never_fits = True  # can never fit a decode node: not completed
            self.raw.pop(i, None)
            return
        d = o.decode_node
        dn = self.decodes[d]
        dn.booked.discard(i)
        dn.fetching.add(i)
        self.push(now + cfg.decode.transfer_s(e.input_len * cfg.kv_bytes_per_token), JOIN, d, i)

    def join(self, node: int, i: int, now: float) -> None:
        """Request ``i``'s KV arrived at decode node ``node``: it waits for a place in the batch."""
        dn = self.decodes[node]
        self.decode_caches[node].add(self.keys(i), self.decode_room(node))  # its KV is in the engine's cache
        dn.fetching.discard(i)
        dn.waiting.append(i)
        self.joined_at[i] = now
        if not dn.stepping:  # start after every other join of this instant: one batch
            dn.stepping = True
            self.push(now, START, node, -1)

    def stepped(self, dn: _Decode, now: float) -> None:
        """An engine's step ended: a token each, the finished leave, a prefill's chunk counted (its
        last: the first token, and it joins the batch, or a prefill node's prefill call goes on
        to its decode node); the next step starts."""
        dn.step_no += 1
        while dn.running and dn.running[0][0] <= dn.step_no:
            _, r = heapq.heappop(dn.running)
            e, o = self.trace[r], self.out[r]
            dn.base -= e.input_len + 1 - (dn.step_no - (e.output_len - 1))
            dn.reserved -= e.input_len + e.output_len
            dn.assigned -= 1
            o.e2e_s = now - o.arrival_s
            o.tpot_s = (now - self.produced_start.pop(r)) / (e.output_len - 1)
            o.completed = True
            self.finished(r)
        if dn.chunk is not None:  # a local prefill's chunk went with the step
            r, c = dn.chunk
            dn.chunk = None
            dn.local_left[r] -= c
            if not dn.local_left[r]:  # its last: the first token, and it joins the batch next step
                del dn.local_left[r], dn.local_total[r]
                dn.local.pop(0)
                if not dn.local:
                    dn.busy.append((dn.busy_since, now))
                    dn.busy_since = None
                if r in dn.leaves:  # a prefill call: on to its decode node
                    dn.leaves.discard(r)
                    self.prefilled(dn.index, r, now)
                    self.step(dn, now)
                    return
                if dn.home:
                    self.prefill_caches[dn.index].add(self.keys(r))
                    store = self.prefill_stores[dn.index]
                else:
                    self.decode_caches[dn.index].add(self.keys(r), self.decode_room(dn.index))
                    store = self.decode_stores[dn.index]
                if store is not None:
                    store.save(self.chunks(r))
                e, o = self.trace[r], self.out[r]
                o.ttft_s = now - o.arrival_s
                if e.output_len <= 1:
                    o.e2e_s, o.completed = o.ttft_s, True
                    self.finished(r)
                    dn.assigned -= 1
                else:
                    self.produced_start[r] = now
                    self.joined_at[r] = now
                    dn.waiting.insert(0, r)
        self.step(dn, now)
