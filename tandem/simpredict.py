"""What the simulator (tandem/sim.py) decides with: a cluster's state as the event loop leaves it,
and the predictions admission and conditional disaggregation make from it. The event loop moves
the state on; these read it (``local_choice``, ``admit`` and what they call), and keep the
caches' recency as a real node would (``touch``).

- **Admission** (``admission``, off by default): at arrival, the prefill work ahead shared by the
  prefill pool plus the request's own prefill against the TTFT objective, and its step over its
  life on the least loaded decode node against TPOT (the batch there as admission forecasts it,
  ``estimates.life_load``: each request there for as many steps as it has tokens to come, and
  arrivals at the node's recent rate), each step as its streams see it with the node's local
  prefills beside them the share of the last 10 s they ran (``pace.stepper`` on a node's
  ``prefill_busy``; until the thirty-second sitting, the plain step); a request predicted to miss either is refused
  (it counts as missed). With admission, running streams are protected as the coordinator's
  ``--protect-streams`` (on by default) protects them: each knows what it has left of its TPOT
  objective, and a newcomer that would push one past it (``coordinator/pace.pushed``: at
  the step with it in the batch, after the stall of the local prefills queued there and, for a
  local prefill, its own stall once) is prefilled locally only where it pushes nobody, and is
  refused when every decode node would be pushed (a disaggregated request is still booked on the
  least loaded decode node, not one chosen by this). With conditional
  disaggregation on too (as Tandem ships), the choice below is made first and the request is
  refused when the option chosen is predicted to miss.

- **Calibration** (``calibrate``, on by default, as the coordinator always calibrates): every
  prediction above but the pushes' steps goes through the coordinator's own ``Calibration``
  (coordinator/calibration.py), learned from the simulated requests as they complete: each decode
  node's ``tpot`` and ``ttft_local``, and the prefill pool's ``ttft`` (one for the
  pool: these predictions are the pool's, where the coordinator's are each prefill node's). Each
  request teaches with the raw predictions of the option it took, as ``coordinator/request.account``
  does. A trace starts with none learned unless given what one before taught (``sim.Learned``:
  `tandem plan --validate` carries them from rate to rate, as the real coordinator's carry). (Until the thirty-second sitting the simulator predicted raw. On
  that sitting's 1:1 chat run the real coordinator began each rate with a flat TPOT line, learned
  as the rate before drained, that let in streams whose raw predictions were over the objective;
  replayed calibrated, and carried from rate to rate, the simulator's mean attainment error fell
  9.6 -> 5.6 points.)

- **Colocation** (``colocate``, off by default): where the choice above (the prefill pool, or a
  decode node's local prefill) is predicted to miss the SLO, a prefill node serves the request
  whole if that is predicted to meet it (``home_choice``, ``choice.choose``'s *home*): its TTFT
  behind the prompts in that node's engine, its TPOT over its life among the streams the node
  serves whole with the node's prefills beside them (``stepper`` on its share of time
  prefilling, at the node's step budget), and with admission, none of those streams pushed past
  its objective (at the plain step, behind every prompt the coordinator has for the node,
  ``backlog_s``; without admission, their step within the objective, as for a local prefill)
  and no request waiting for the pool pushed past its TTFT (``queue_pushed``, the prefill
  order's ``pushed_by``). A prefill call is kept off a node whose streams it would push past
  theirs while another will do, and with every node pushing one, the disaggregated choice misses
  (``stalls_everywhere``, ``choice.stalled``); the pool's wait counts the prompts its nodes serve
  whole (``pool_wait_s``). Not modelled: the beside term in a prefill call's own TTFT prediction
  (``estimates.beside_whole_s``).

- **Conditional disaggregation** (``local``, off by default): at arrival the request is
  prefilled on a decode node itself when Tandem's admission would choose that (the same rule,
  ``coordinator/choice.choose``, on this simulator's predictions): predicted to meet the TTFT
  objective where the prefill pool would not, or, with work queued in the pool, to start
  ``LOCAL_GAIN`` sooner (each option's TPOT checked too); never where its prefill would push the
  node's streams past the TPOT objective (with none set: never beside another local prefill). A
  node's load is every request sent there, as the coordinator counts it. There the prompt goes in
  chunks inside the node's decode steps (vLLM's chunked prefill: ``step_tokens`` a step, less
  one for each stream decoding there, whose tokens the scheduler takes first): each such step
  takes the chunk's share of the decode node's own prefill time plus what the batch's step costs
  over an empty one (admission's ``beside``); its first token
  comes with the last chunk, and it joins the batch at the next step (no transfer). With no
  prefill pool (P:D 0:N) every request prefills on a decode node: the soonest start among the
  nodes meeting both objectives (or all), and of those within the coordinator's tie band
  (``TIE_REL`` / ``TIE_ABS_S``) the one with the fewest requests sent there, passing over nodes
  whose streams the prefill would push past TPOT while another will do (as the coordinator does).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tandem.coordinator.calibration import Calibration
from tandem.perfmodel import beside_s, chunk_steps
from tandem.simcache import PrefixCache, StoreTiers, block_keys
from tandem.simconfig import SimConfig
from tandem.simhome import Colocation
from tandem.simresults import Outcome
from tandem.timings import Timings


def _arrivals() -> Any:
    from tandem.coordinator.nodeclient import Arrivals  # (the coordinator's; grpc only when simulating)

    return Arrivals()


@dataclass
class _Decode:
    """A decode node's state: its batch, the requests waiting or arriving, its own prefills. With
    colocation a prefill node's engine is one too (``home``): its batch is the streams it serves
    whole, and its prefills are those and the pool's prefill calls (``leaves``)."""

    index: int = 0  # among the decode nodes, or (``home``) the prefill nodes
    home: bool = False  # a prefill node's engine (colocation)
    leaves: set[int] = field(default_factory=set)  # of ``local``: prefill calls whose requests decode elsewhere
    running: list[tuple[int, int]] = field(default_factory=list)  # heap of (finish step, request)
    waiting: list[int] = field(default_factory=list)
    assigned: int = 0
    step_no: int = 0
    base: int = 0  # Σ (prompt + 1 − join step) of the running: context = base + B·step_no
    reserved: int = 0  # KV tokens reserved by the running requests
    stepping: bool = False
    local: list[int] = field(default_factory=list)  # requests it prefills itself, in order
    local_left: dict[int, int] = field(default_factory=dict)  # ... their prompt tokens not yet computed
    chunk: tuple[int, int] | None = None  # (request, tokens) of the local prefill in the step running
    local_total: dict[int, tuple[int, int, float]] = field(default_factory=dict)  # ... (to compute, cached, load s)
    fetching: set[int] = field(default_factory=set)  # requests whose KV is on its way here
    booked: set[int] = field(default_factory=set)  # requests to come here, their prefill still in the pool
    arrivals: Any = field(default_factory=_arrivals)  # those sent here lately (admission's)
    # spans of time with a local prefill here (start, end), and the start of the one now: its
    # ``prefill_busy`` as a node reports it
    busy: deque[tuple[float, float]] = field(default_factory=deque)
    busy_since: float | None = None
    # how its predictions turn out, per kind (tpot, ttft_local): the coordinator's calibration
    cal: dict[str, Calibration] = field(default_factory=lambda: {k: Calibration.of(k) for k in ("tpot", "ttft_local")})


class ClusterState(Colocation):
    """A simulated cluster's state (what the event loop keeps) and the predictions made from it."""

    def __init__(self, cfg: SimConfig, trace: Sequence[Any]) -> None:
        self.cfg, self.trace = cfg, trace
        self.out = [Outcome(e.arrival_s) for e in trace]
        self.queue: list[tuple[float, int]] = []  # (deadline or arrival, request)
        self.late: list[int] = []  # slack order: requests that can no longer meet their deadline, oldest first
        self.idle = list(range(cfg.num_prefill))
        self.busy_until = [0.0] * cfg.num_prefill  # when each prefill node's current prefill ends
        self.queued_s = 0.0  # prefill time of the requests waiting at the coordinator
        self.decodes = [_Decode(index=d) for d in range(cfg.num_decode)]
        # colocation: each prefill node's engine, which runs the pool's prefills and the streams it
        # serves whole
        self.homes = [_Decode(index=p, home=True) for p in range(cfg.num_prefill)] if cfg.colocate else []
        self.produced_start: dict[int, float] = {}
        self.joined_at: dict[int, float] = {}  # requests waiting at a decode node for a place in its batch
        # Prefix caching: each engine's cache; each request's block keys (none without input_ids or
        # with prefix caching off); what each queued request's prefill was counted at in ``queued_s``.
        self.prefill_caches = [PrefixCache(cfg.prefill_cache_tokens, cfg.block_tokens) for _ in range(cfg.num_prefill)]
        self.decode_caches = [PrefixCache(0, cfg.block_tokens) for _ in range(cfg.num_decode)]
        self.stores = cfg.store_ram_tokens > 0 and cfg.prefix_cache

        def tiers() -> StoreTiers | None:
            return StoreTiers(cfg.store_ram_tokens, cfg.store_disk, cfg.chunk_tokens) if self.stores else None

        self.prefill_stores = [tiers() for _ in range(cfg.num_prefill)]
        self.decode_stores = [tiers() for _ in range(cfg.num_decode)]
        self.keys_of: dict[int, list[int]] = {}
        self.chunks_of: dict[int, list[int]] = {}
        self.queued_cost: dict[int, float] = {}
        self.pool_cal = Calibration.of("ttft")  # the prefill pool's TTFT predictions
        # each admitted request's raw predictions (TTFT, TPOT; 0: none) for the option it took
        self.raw: dict[int, tuple[float, float]] = {}

    def calibrated(self, dn: _Decode | None, kind: str, raw_s: float) -> float:
        """A raw ``kind`` prediction for decode node ``dn`` (None: the prefill pool's TTFT) as the
        requests finished so far say such predictions turn out (``calibrate``; else itself)."""
        if not self.cfg.calibrate:
            return raw_s
        return (self.pool_cal if dn is None else dn.cal[kind])(raw_s)

    def learn(self, dn: _Decode | None, kind: str, raw_s: float, actual_s: float) -> None:
        """A request's outcome against the raw prediction it was admitted on (0: none made)."""
        if self.cfg.calibrate and raw_s > 0:
            (self.pool_cal if dn is None else dn.cal[kind]).learn(raw_s, actual_s)

    def finished(self, i: int) -> None:
        """Request ``i`` completed: its TTFT and TPOT teach the calibrations of where it ran, as
        ``coordinator/request.account`` does at a request's end (its TTFT on the prefill pool's,
        or on its decode node's local one; served whole, its prefill node's)."""
        raw = self.raw.pop(i, None)
        if raw is None:
            return
        o = self.out[i]
        dn = (self.homes[o.prefill_node] if o.colocated else self.decodes[o.decode_node] if o.decode_node >= 0
              else None)
        if o.local:
            self.learn(dn, "ttft_local", raw[0], o.ttft_s)
        else:
            self.learn(None, "ttft", raw[0], o.ttft_s)
        if o.tpot_s > 0 and dn is not None:
            self.learn(dn, "tpot", raw[1], o.tpot_s)

    def timings(self, dn: _Decode) -> Timings:
        """An engine's times: a decode node's, or (colocation) a prefill node's."""
        return self.cfg.prefill if dn.home else self.cfg.decode

    def budget(self, dn: _Decode) -> int:
        """An engine's prompt tokens a step."""
        return self.cfg.prefill_step_tokens if dn.home else self.cfg.step_tokens

    def stepper(self, dn: _Decode, now: float) -> Callable[[float, float], float]:
        """A decode node's step as its streams see it, with its local prefills beside them the
        share of the last ``BUSY_WINDOW_S`` they ran (the coordinator's ``pace.stepper`` on
        the node's ``prefill_busy``; on a prefill node, all its prefills, as it reports them)."""
        from tandem.coordinator.pace import shared_step
        from tandem.node.perf import busy_share

        return shared_step(self.timings(dn), busy_share(dn.busy, dn.busy_since, now), self.budget(dn))

    def keys(self, i: int) -> list[int]:
        """Request ``i``'s prompt as chained block keys (the engines' prefix caches): none without
        ``input_ids`` or with prefix caching off."""
        if i not in self.keys_of:
            ids = getattr(self.trace[i], "input_ids", None) if self.cfg.prefix_cache else None
            self.keys_of[i] = block_keys(ids, self.cfg.block_tokens) if ids else []
        return self.keys_of[i]

    def chunks(self, i: int) -> list[int]:
        """Request ``i``'s prompt as chained chunk keys (the KV store's): none without a store."""
        if i not in self.chunks_of:
            ids = getattr(self.trace[i], "input_ids", None) if self.stores else None
            self.chunks_of[i] = block_keys(ids, self.cfg.chunk_tokens) if ids else []
        return self.chunks_of[i]

    def held_on(self, engine: PrefixCache, store: StoreTiers | None, i: int, timings: Timings,
                touch: bool = False) -> tuple[int, float]:
        """(prompt tokens of request ``i`` a node with these timings holds, seconds to load those
        its engine lacks)."""
        n = self.trace[i].input_len
        eng = engine.cached(self.keys(i), n, touch)
        if store is None:
            return eng, 0.0
        from tandem.coordinator.prefix import load_cost_s  # (only with a store: it imports the coordinator)

        stored, on_disk = store.held(self.chunks(i), n, touch)
        if stored <= eng:
            return eng, 0.0
        return stored, load_cost_s(stored - eng, min(on_disk, stored - eng), timings.learned_load())

    def prefill_cost(self, timings: Timings, i: int, held: tuple[int, float]) -> float:
        """Request ``i``'s prefill with these times past ``held`` (tokens held, seconds to load them)."""
        return timings.prefill_s(self.trace[i].input_len - held[0], held[0]) + held[1]

    def pool_prefill_s(self, i: int) -> float:
        """Its prefill where the prefill pool would do it cheapest: past the prefix a node holds,
        and that prefix's load."""
        pre = self.cfg.prefill
        return min(self.prefill_cost(pre, i, self.held_on(c, s, i, pre)) for c, s in zip(self.prefill_caches,
                                                                                         self.prefill_stores))

    def decode_room(self, d: int) -> int:
        """Blocks decode node ``d``'s cache may keep (0: unbounded): what its running requests'
        reservations leave, and their prompts' own blocks (held by them, not evictable)."""
        if not self.cfg.kv_capacity_tokens:
            return 0
        running = sum(self.trace[r].input_len // self.cfg.block_tokens for _, r in self.decodes[d].running)
        return max(1, (self.cfg.kv_capacity_tokens - self.decodes[d].reserved) // self.cfg.block_tokens + running)

    def decode_held(self, d: int, i: int, touch: bool = False) -> tuple[int, float]:
        """``held_on`` decode node ``d``, its cache trimmed first to what its running requests leave."""
        self.decode_caches[d].trim(self.decode_room(d))
        return self.held_on(self.decode_caches[d], self.decode_stores[d], i, self.cfg.decode, touch)

    def engine_held(self, dn: _Decode, i: int, touch: bool = False) -> tuple[int, float]:
        """``held_on`` an engine: a decode node's (``decode_held``) or a prefill node's."""
        if dn.home:
            return self.held_on(self.prefill_caches[dn.index], self.prefill_stores[dn.index], i, self.cfg.prefill,
                                touch)
        return self.decode_held(dn.index, i, touch)

    def budgets(self, dn: _Decode, now: float) -> list[tuple[float, int]]:
        """What each stream running on a decode node has left of its TPOT objective: (seconds until
        its last token is due, tokens still to come), as the coordinator's ``NodeClient.budgets``
        keeps them (its output length standing in for ``max_tokens``)."""
        return [(self.produced_start[r] + self.cfg.slo_tpot_s * (self.trace[r].output_len - 1) - now, fin - dn.step_no)
                for fin, r in dn.running if fin > dn.step_no]

    def local_queue_s(self, dn: _Decode, only: Sequence[int] | None = None) -> float:
        """What the prompts queued on a decode node (``only``: those of them) have still to run,
        each past its held prefix and with its load (``estimates._local_queue``). Its engine, as
        this simulator's engines do, starts each prompt in a step of its own (the nodes'
        ``--prompt-steps own``), so a prompt not begun costs its whole prefill, the steps' fixed
        cost with it (``estimates.queued_prefill_s``)."""
        dec, queue_s = self.timings(dn), 0.0
        for r, left in dn.local_left.items():
            if only is not None and r not in only:
                continue
            total, held_r, load_r = dn.local_total[r]
            done = total - left
            queue_s += dec.prefill_s(total, held_r) - (dec.prefill_s(done, held_r) if done else -load_r)
        return queue_s

    def pushes(self, dn: _Decode, i: int, now: float, local: tuple[float, float] | None = None) -> int:
        """With admission (the coordinator's ``--protect-streams``, on by default): how many of the
        node's running streams request ``i`` would push past their TPOT objective by joining its
        batch, on top of the local prefills queued there already (``pace.pushed``). ``local``:
        prefilled there, (its stall once, the queued ones' stall), calibrated as its local TTFT
        there, beside the plain step (``choice.local_option``'s; else ``decode_estimate``'s)."""
        if not (self.cfg.admission and self.cfg.slo_tpot_s > 0 and dn.running):
            return 0
        from tandem.coordinator.pace import pushed

        e = self.trace[i]
        b, ctx = self.load(dn)
        mine = ctx + e.input_len + e.output_len // 2
        if dn.home:
            # A prefill node's streams served whole: judged at its plain steps, behind every prompt
            # this coordinator has for it (``choice.local_option``, ``choice.stalled``).
            plain, (stall, ahead) = self.cfg.prefill.step_s, local or (0.0, 0.0)
            return pushed(self.budgets(dn, now), plain(b, ctx), plain(b + 1, mine), stall, plain(b + 1, mine),
                          max(ahead, self.backlog_s(dn)))
        step = self.stepper(dn, now)
        step_new = step(b + 1, mine)  # (the steps at the fit: ``pace.pushed``)
        if local is not None:
            return pushed(self.budgets(dn, now), step(b, ctx), step_new, local[0], self.cfg.decode.step_s(b + 1, mine),
                          local[1])
        return pushed(self.budgets(dn, now), step(b, ctx), step_new,
                      ahead_s=self.calibrated(dn, "ttft_local", self.local_queue_s(dn)))

    def pushes_everywhere(self, i: int, now: float) -> bool:
        """No decode node would take request ``i`` into its batch without pushing a stream past its
        objective (``pushes``): protected, a miss wherever it goes."""
        return self.trace[i].output_len > 1 and all(self.pushes(dn, i, now) for dn in self.decodes)

    def life_tpot(self, dn: _Decode, i: int, now: float) -> float:
        """Request ``i``'s step on a decode node over its life, as admission forecasts it
        (``estimates.life_load``): each request there stays for the tokens it has to come, and
        requests keep arriving at the node's recent rate (``Arrivals``), each staying their mean
        output. A disaggregated request counts there from its arrival, as the coordinator books
        it (until the thirty-first sitting: once its prefill ended). (Until the twenty-ninth
        sitting: the step of the batch now, one request added.)"""
        e = self.trace[i]
        tokens, mine = e.output_len, e.input_len + e.output_len // 2
        b, ctx = self.load(dn)
        # to come: the running's steps left; the first token made, the rest; a local prefill's, all
        lefts = ([fin - dn.step_no for fin, _ in dn.running]
                 + [self.trace[r].output_len - 1 for r in (*dn.waiting, *dn.fetching, *dn.booked)]
                 + [self.trace[r].output_len for r in dn.local if r not in dn.leaves])
        step = self.stepper(dn, now)
        if not lefts or tokens < 1:
            return step(b + 1, ctx + mine)
        from tandem.coordinator.pace import forward_batch

        rate, mean = dn.arrivals.rate(now)
        life = forward_batch(lefts, tokens, rate * step(b + 1, ctx), mean)
        return step(life + 1, life * ctx / b + mine)

    def admit(self, i: int, now: float) -> bool:
        """Admission, from the same profile: the prefill work ahead of it shared by the prefill
        pool, plus its own prefill, against the TTFT objective; its step over its life on the
        least loaded decode node (``life_tpot``) against TPOT."""
        e = self.trace[i]
        ahead = self.queued_s + self.pool_wait_s(now)
        ttft = ahead / self.cfg.num_prefill + self.pool_prefill_s(i)
        dn = self.decodes[self.booked_node()]
        tpot = self.life_tpot(dn, i, now) if e.output_len > 1 else 0.0
        self.raw[i] = (ttft, tpot)
        return (self.calibrated(None, "ttft", ttft) <= self.cfg.slo_ttft_s
                and self.calibrated(dn, "tpot", tpot) <= self.cfg.slo_tpot_s and not self.pushes_everywhere(i, now)
                and not self.stalls_everywhere(i, now))

    def booked_node(self) -> int:
        """The decode node a disaggregated request is booked on at its arrival: the fewest
        requests sent there, the first of those."""
        return min(range(len(self.decodes)), key=lambda k: (self.decodes[k].assigned, k))

    def load(self, dn: _Decode) -> tuple[int, int]:
        """(requests, their context tokens) on a decode node as the coordinator counts them: every
        one sent there (running, waiting for a place, its KV arriving, prefilling there or booked
        there while the prefill pool has it)."""
        ctx = dn.base + len(dn.running) * dn.step_no
        ctx += sum(self.trace[r].input_len for r in (*dn.waiting, *dn.fetching, *dn.local, *dn.booked)
                   if r not in dn.leaves)
        return dn.assigned, ctx

    def engine_ttft(self, dn: _Decode, i: int) -> tuple[float, float, float, float, float, float]:
        """Request ``i`` prefilled on an engine that decodes it (a decode node's local prefill, or a
        prefill node serving it whole): (its TTFT there, what its prefill adds to each of the
        node's streams' tokens, the whole stall it makes them wait once, the stall of the prefills
        queued there before it: calibrated as the node's local TTFTs; its TTFT raw; its prefill
        alone, raw)."""
        from tandem.coordinator.estimates import MIN_OTHERS_TOKENS

        e, t = self.trace[i], self.timings(dn)
        b, ctx = self.load(dn)
        held = self.engine_held(dn, i)
        own = e.input_len - held[0]
        run_s = self.prefill_cost(t, i, held)
        beside = chunk_steps(sum(dn.local_left.values()) + own, self.budget(dn), b) * beside_s(t, b, ctx)
        queue = self.local_queue_s(dn)
        raw = queue + run_s + beside
        f = self.calibrated(dn, "ttft_local", raw) / raw if raw > 0 else 1.0
        stall = (run_s + beside) * f
        return raw * f, stall / max(e.output_len, MIN_OTHERS_TOKENS), stall, queue * f, raw, run_s

    def local_choice(self, i: int, now: float) -> tuple[int | None, bool]:
        """The decode node to prefill request ``i`` on, or None for the prefill pool (admission's rule),
        and whether that choice is predicted to meet both objectives without pushing the chosen
        decode node's streams past TPOT (what admission, when on, refuses by)."""
        from tandem.coordinator.choice import LOCAL_GAIN

        e, dec = self.trace[i], self.cfg.decode

        def raw_tpot(dn: _Decode) -> float:  # its step over its life there, raw (0: one token)
            return self.life_tpot(dn, i, now) if e.output_len > 1 else 0.0

        def tpot_misses(dn: _Decode) -> bool:
            return self.cfg.slo_tpot_s > 0 and self.calibrated(dn, "tpot", raw_tpot(dn)) > self.cfg.slo_tpot_s

        def meets(ttft: float, tpot_missed: bool) -> bool:  # both objectives
            return (self.cfg.slo_ttft_s <= 0 or ttft <= self.cfg.slo_ttft_s) and not tpot_missed

        def harms(dn: _Decode, harm: float, stall_s: float, ahead_s: float) -> bool:
            """Its prefill there pushes the node's streams past TPOT: protected (with admission),
            any stream pushed past its own objective (``pushes``, after the stall of the prefills
            queued there, ``ahead_s``, and its own); else their step (with the node's recent local
            prefills beside, or plain with its stall spread over their tokens, whichever is more)
            past the objective."""
            if self.cfg.admission:
                return self.pushes(dn, i, now, (stall_s, ahead_s)) > 0
            b, ctx = self.load(dn)
            return (self.cfg.slo_tpot_s > 0 and b > 0
                    and max(self.calibrated(dn, "tpot", self.stepper(dn, now)(b, ctx)),
                            self.calibrated(dn, "tpot", dec.step_s(b, ctx)) + harm) > self.cfg.slo_tpot_s)

        def local_ttft(dn: _Decode) -> tuple[float, float, float, float, float]:
            return self.engine_ttft(dn, i)[:5]

        if not self.cfg.num_prefill:
            # No prefill pool: a decode node whatever it costs: among those meeting both objectives (or
            # all, with none), the soonest start; those within the coordinator's TIE_REL / TIE_ABS_S of
            # it are alike, and the least loaded of them takes it.
            from tandem.coordinator.choice import tied

            est = [local_ttft(dn) for dn in self.decodes]
            ok = [meets(t, tpot_misses(dn)) and not harms(dn, harm, stall, ahead)
                  for (t, harm, stall, ahead, _), dn in zip(est, self.decodes)]
            pool = [d for d in range(len(self.decodes)) if ok[d]] or list(range(len(self.decodes)))
            low = min(est[d][0] for d in pool)
            alike = [d for d in pool if tied(est[d][0], low)]
            d = min(alike, key=lambda d: (self.decodes[d].assigned, d))
            self.raw[i] = (est[d][4], raw_tpot(self.decodes[d]))
            return d, ok[d]
        raw_wait = (self.queued_s + self.pool_wait_s(now)) / self.cfg.num_prefill
        raw_remote = raw_wait + self.pool_prefill_s(i)
        f = self.calibrated(None, "ttft", raw_remote) / raw_remote if raw_remote > 0 else 1.0
        wait, remote = raw_wait * f, raw_remote * f  # (both parts scaled alike, as the coordinator's)
        booked = self.decodes[self.booked_node()]  # where it would decode
        best: tuple[float, int, float] | None = None
        remote_ok = (meets(remote, tpot_misses(booked)) and not self.pushes_everywhere(i, now)
                     and not self.stalls_everywhere(i, now))
        for d, dn in enumerate(self.decodes):
            b, ctx = self.load(dn)
            ttft, harm, stall, ahead, raw = local_ttft(dn)
            if self.cfg.slo_tpot_s > 0:
                if harms(dn, harm, stall, ahead):
                    continue
            elif b and dn.local:
                continue
            if best is None or ttft < best[0]:
                best = (ttft, d, raw)
        remote_raw = (raw_remote, raw_tpot(booked))
        if best is None:
            self.raw[i] = remote_raw
            return None, remote_ok
        local, d, raw = best
        local_ok = meets(local, tpot_misses(self.decodes[d]))
        if local_ok != remote_ok:
            choice: tuple[int | None, bool] = (d, True) if local_ok else (None, True)
        elif not local_ok:
            choice = (None, False)
        else:
            choice = (d, True) if wait > 0 and local < remote * (1 - LOCAL_GAIN) else (None, True)
        self.raw[i] = (raw, raw_tpot(self.decodes[d])) if choice[0] is not None else remote_raw
        return choice
