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
- **Transfer.** The decode node with the fewest requests assigned takes the
  request; its KV arrives ``transfer_s(bytes)`` later (transfers do not
  contend with each other: a simplification).
- **Decode.** Continuous batching: a step of B running requests holding L
  context tokens takes ``step_s(B, L)`` and gives each of them a token; a
  request that arrives mid-step joins at the next step, up to ``max_batch``
  and, when ``kv_capacity_tokens`` is set, while its whole prompt and output
  fit beside the running ones (reserved up front: no preemption).

- **Admission** (``admission``, off by default): at arrival, the prefill work ahead shared by the
  prefill pool plus the request's own prefill against the TTFT objective, and its step over its
  life on the least loaded decode node against TPOT (the batch there as admission forecasts it,
  ``estimates.life_load``: each request there for as many steps as it has tokens to come, and
  arrivals at the node's recent rate); a request predicted to miss either is refused
  (it counts as missed). With admission, running streams are protected as the coordinator's
  ``--protect-streams`` (on by default) protects them: each knows what it has left of its TPOT
  objective, and a newcomer that would push one past it (``coordinator/estimates.pushed``: at
  the step with it in the batch, after the stall of the local prefills queued there and, for a
  local prefill, its own stall once) is prefilled locally only where it pushes nobody, and is
  refused when every decode node would be pushed (a disaggregated request still joins the least
  loaded decode node when its prefill ends, not one chosen by this). With conditional
  disaggregation on too (as Tandem ships), the choice below is made first and the request is
  refused when the option chosen is predicted to miss. Tandem's own admission predicts per node
  and calibrates per node; this does not.

- **Conditional disaggregation** (``local``, off by default): at arrival the request is
  prefilled on a decode node itself when Tandem's admission would choose that (the same rule,
  ``coordinator/admission._choose``, on this simulator's predictions): predicted to meet the TTFT
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

- **Prefix caching** (``prefix_cache``, off by default; entries with ``input_ids``): each
  node's engine keeps the whole blocks of the prompts it computed (or, on a decode node, took in
  as KV) by a hash of their tokens chained to the blocks before (vLLM's prefix cache); a prefill
  computes only the tokens past the longest run of them from the prompt's start (the last prompt
  token always: ``prefill_s`` of the uncached tokens after the cached ones), and the predictions
  above count that too. Of the idle prefill nodes, the one where it costs least (prefill after what it
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

Not modelled yet (the simulator says so in its results): sharing chunks between nodes, and
network contention.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tandem.perfmodel import beside_s, chunk_steps, chunk_tokens
from tandem.simcache import PrefixCache, StoreTiers, block_keys
from tandem.simconfig import SimConfig
from tandem.simresults import Outcome
from tandem.timings import Timings

def _arrivals() -> Any:
    from tandem.coordinator.nodeclient import Arrivals  # (the coordinator's; grpc only when simulating)

    return Arrivals()


@dataclass
class _Decode:
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
    arrivals: Any = field(default_factory=_arrivals)  # those sent here lately (admission's)


def simulate(cfg: SimConfig, trace: Sequence[Any]) -> list[Outcome]:
    """Each entry of ``trace`` needs ``arrival_s``, ``input_len`` and ``output_len``; one Outcome per
    entry, in the trace's order. Requests that cannot fit a decode node's KV cache at all end
    uncompleted."""
    out = [Outcome(e.arrival_s) for e in trace]
    events: list[tuple[float, int, int, int, int]] = []  # (time, seq, kind, node, request)
    seq = 0

    def push(t: float, kind: int, node: int, req: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, node, req))

    ARRIVE, PREFILLED, JOIN, STEPPED, START = range(5)
    for i, e in enumerate(trace):
        push(e.arrival_s, ARRIVE, -1, i)
    queue: list[tuple[float, int]] = []  # (deadline or arrival, request)
    late: list[int] = []  # slack order: requests that can no longer meet their deadline, oldest first
    idle = list(range(cfg.num_prefill))
    busy_until = [0.0] * cfg.num_prefill  # when each prefill node's current prefill ends
    queued_s = 0.0  # prefill time of the requests waiting at the coordinator
    decodes = [_Decode() for _ in range(cfg.num_decode)]
    produced_start: dict[int, float] = {}
    joined_at: dict[int, float] = {}  # requests waiting at a decode node for a place in its batch
    # Prefix caching: each engine's cache; each request's block keys (none without input_ids or
    # with prefix caching off); what each queued request's prefill was counted at in ``queued_s``.
    prefill_caches = [PrefixCache(cfg.prefill_cache_tokens, cfg.block_tokens) for _ in range(cfg.num_prefill)]
    decode_caches = [PrefixCache(0, cfg.block_tokens) for _ in range(cfg.num_decode)]
    stores = cfg.store_ram_tokens > 0 and cfg.prefix_cache
    prefill_stores = [StoreTiers(cfg.store_ram_tokens, cfg.store_disk, cfg.chunk_tokens) if stores else None
                      for _ in range(cfg.num_prefill)]
    decode_stores = [StoreTiers(cfg.store_ram_tokens, cfg.store_disk, cfg.chunk_tokens) if stores else None
                     for _ in range(cfg.num_decode)]
    keys_of: dict[int, list[int]] = {}
    chunks_of: dict[int, list[int]] = {}
    queued_cost: dict[int, float] = {}

    def keys(i: int) -> list[int]:
        if i not in keys_of:
            ids = getattr(trace[i], "input_ids", None) if cfg.prefix_cache else None
            keys_of[i] = block_keys(ids, cfg.block_tokens) if ids else []
        return keys_of[i]

    def chunks(i: int) -> list[int]:
        if i not in chunks_of:
            ids = getattr(trace[i], "input_ids", None) if stores else None
            chunks_of[i] = block_keys(ids, cfg.chunk_tokens) if ids else []
        return chunks_of[i]

    def held_on(engine: PrefixCache, store: StoreTiers | None, i: int, timings: Timings,
                touch: bool = False) -> tuple[int, float]:
        """(prompt tokens of request ``i`` a node with these timings holds, seconds to load those
        its engine lacks)."""
        n = trace[i].input_len
        eng = engine.cached(keys(i), n, touch)
        if store is None:
            return eng, 0.0
        from tandem.coordinator.prefix import load_cost_s  # (only with a store: it imports the coordinator)

        stored, on_disk = store.held(chunks(i), n, touch)
        if stored <= eng:
            return eng, 0.0
        return stored, load_cost_s(stored - eng, min(on_disk, stored - eng), timings.learned_load())

    def prefill_cost(timings: Timings, i: int, held: tuple[int, float]) -> float:
        return timings.prefill_s(trace[i].input_len - held[0], held[0]) + held[1]

    def pool_prefill_s(i: int) -> float:
        """Its prefill where the prefill pool would do it cheapest: past the prefix a node holds,
        and that prefix's load."""
        return min(prefill_cost(cfg.prefill, i, held_on(c, s, i, cfg.prefill)) for c, s in zip(prefill_caches, prefill_stores))

    def decode_room(d: int) -> int:
        """Blocks decode node ``d``'s cache may keep (0: unbounded): what its running requests'
        reservations leave, and their prompts' own blocks (held by them, not evictable)."""
        if not cfg.kv_capacity_tokens:
            return 0
        running = sum(trace[r].input_len // cfg.block_tokens for _, r in decodes[d].running)
        return max(1, (cfg.kv_capacity_tokens - decodes[d].reserved) // cfg.block_tokens + running)

    def decode_held(d: int, i: int, touch: bool = False) -> tuple[int, float]:
        decode_caches[d].trim(decode_room(d))
        return held_on(decode_caches[d], decode_stores[d], i, cfg.decode, touch)

    def budgets(dn: _Decode, now: float) -> list[tuple[float, int]]:
        """What each stream running on a decode node has left of its TPOT objective: (seconds until
        its last token is due, tokens still to come), as the coordinator's ``NodeClient.budgets``
        keeps them (its output length standing in for ``max_tokens``)."""
        return [(produced_start[r] + cfg.slo_tpot_s * (trace[r].output_len - 1) - now, fin - dn.step_no)
                for fin, r in dn.running if fin > dn.step_no]

    def local_queue_s(dn: _Decode) -> float:
        """What the prompts queued on a decode node have still to run, each past its held prefix
        and with its load, less the steps' fixed cost, which they share (``estimates._local_queue``)."""
        dec, queue_s = cfg.decode, 0.0
        for r, left in dn.local_left.items():
            total, held_r, load_r = dn.local_total[r]
            done = total - left
            queue_s += dec.prefill_s(total, held_r) - (dec.prefill_s(done, held_r) if done
                                                         else dec.prefill_s(0) - load_r)
        return queue_s

    def pushes(dn: _Decode, i: int, now: float, stall_s: float = 0.0) -> int:
        """With admission (the coordinator's ``--protect-streams``, on by default): how many of the
        node's running streams request ``i`` would push past their TPOT objective by joining its
        batch (after ``stall_s`` once, its prefill there), on top of the local prefills queued
        there already (``estimates.pushed``)."""
        if not (cfg.admission and cfg.slo_tpot_s > 0 and dn.running):
            return 0
        from tandem.coordinator.estimates import pushed

        e = trace[i]
        b, ctx = load(dn)
        step_new = cfg.decode.step_s(b + 1, ctx + e.input_len + e.output_len // 2)
        return pushed(budgets(dn, now), cfg.decode.step_s(b, ctx), step_new, stall_s, step_new, local_queue_s(dn))

    def pushes_everywhere(i: int, now: float) -> bool:
        """No decode node would take request ``i`` into its batch without pushing a stream past its
        objective (``pushes``): protected, a miss wherever it goes."""
        return trace[i].output_len > 1 and all(pushes(dn, i, now) for dn in decodes)

    def life_tpot(dn: _Decode, i: int, now: float) -> float:
        """Request ``i``'s step on a decode node over its life, as admission forecasts it
        (``estimates.life_load``): each request there stays for the tokens it has to come, and
        requests keep arriving at the node's recent rate (``Arrivals``), each staying their mean
        output. Unlike the coordinator, which books a decode node before the prefill, this one
        counts a disaggregated request there once its prefill ends. (Until the twenty-ninth
        sitting: the step of the batch now, one request added.)"""
        e = trace[i]
        tokens, mine = e.output_len, e.input_len + e.output_len // 2
        b, ctx = load(dn)
        # to come: the running's steps left; the first token made, the rest; a local prefill's, all
        lefts = ([fin - dn.step_no for fin, _ in dn.running]
                 + [trace[r].output_len - 1 for r in (*dn.waiting, *dn.fetching)]
                 + [trace[r].output_len for r in dn.local])
        if not lefts or tokens < 1:
            return cfg.decode.step_s(b + 1, ctx + mine)
        from tandem.coordinator.estimates import forward_batch

        rate, mean = dn.arrivals.rate(now)
        life = forward_batch(lefts, tokens, rate * cfg.decode.step_s(b + 1, ctx), mean)
        return cfg.decode.step_s(life + 1, life * ctx / b + mine)

    def admit(i: int, now: float) -> bool:
        """Admission, from the same profile: the prefill work ahead of it shared by the prefill
        pool, plus its own prefill, against the TTFT objective; its step over its life on the
        least loaded decode node (``life_tpot``) against TPOT."""
        e = trace[i]
        ahead = queued_s + sum(max(0.0, t - now) for t in busy_until)
        ttft = ahead / cfg.num_prefill + pool_prefill_s(i)
        dn = min(decodes, key=lambda d: d.assigned)
        tpot = life_tpot(dn, i, now) if e.output_len > 1 else 0.0
        return ttft <= cfg.slo_ttft_s and tpot <= cfg.slo_tpot_s and not pushes_everywhere(i, now)

    def load(dn: _Decode) -> tuple[int, int]:
        """(requests, their context tokens) on a decode node as the coordinator counts them: every
        one sent there (running, waiting for a place, its KV arriving, prefilling there)."""
        ctx = dn.base + len(dn.running) * dn.step_no
        ctx += sum(trace[r].input_len for r in (*dn.waiting, *dn.fetching, *dn.local))
        return dn.assigned, ctx

    def local_choice(i: int, now: float) -> tuple[int | None, bool]:
        """The decode node to prefill request ``i`` on, or None for the prefill pool (admission's rule),
        and whether that choice is predicted to meet both objectives without pushing the chosen
        decode node's streams past TPOT (what admission, when on, refuses by)."""
        from tandem.coordinator.admission import LOCAL_GAIN
        from tandem.coordinator.estimates import MIN_OTHERS_TOKENS

        e, dec = trace[i], cfg.decode

        def tpot_misses(dn: _Decode) -> bool:  # its step over its life there
            return cfg.slo_tpot_s > 0 and e.output_len > 1 and life_tpot(dn, i, now) > cfg.slo_tpot_s

        def meets(ttft: float, tpot_missed: bool) -> bool:  # both objectives
            return (cfg.slo_ttft_s <= 0 or ttft <= cfg.slo_ttft_s) and not tpot_missed

        def harms(dn: _Decode, harm: float, stall_s: float) -> bool:
            """Its prefill there pushes the node's streams past TPOT: protected (with admission),
            any stream pushed past its own objective; else their step with its stall spread over
            their tokens past the objective."""
            if cfg.admission:
                return pushes(dn, i, now, stall_s) > 0
            b, ctx = load(dn)
            return cfg.slo_tpot_s > 0 and b > 0 and dec.step_s(b, ctx) + harm > cfg.slo_tpot_s

        def local_ttft(dn: _Decode) -> tuple[float, float, float]:
            """(its TTFT there, what its prefill adds to each of the node's streams' tokens, the
            whole stall it makes them wait once)"""
            b, ctx = load(dn)
            held = decode_held(decodes.index(dn), i)
            own = e.input_len - held[0]
            run_s = prefill_cost(dec, i, held)
            beside = chunk_steps(sum(dn.local_left.values()) + own, cfg.step_tokens, b) * beside_s(dec, b, ctx)
            return (local_queue_s(dn) + run_s + beside, (run_s + beside) / max(e.output_len, MIN_OTHERS_TOKENS),
                    run_s + beside)

        if not cfg.num_prefill:
            # No prefill pool: a decode node whatever it costs: among those meeting both objectives (or
            # all, with none), the soonest start; those within the coordinator's TIE_REL / TIE_ABS_S of
            # it are alike, and the least loaded of them takes it.
            from tandem.coordinator.admission import tied

            est = [local_ttft(dn) for dn in decodes]
            ok = [meets(t, tpot_misses(dn)) and not harms(dn, harm, stall)
                  for (t, harm, stall), dn in zip(est, decodes)]
            pool = [d for d in range(len(decodes)) if ok[d]] or list(range(len(decodes)))
            low = min(est[d][0] for d in pool)
            alike = [d for d in pool if tied(est[d][0], low)]
            d = min(alike, key=lambda d: (decodes[d].assigned, d))
            return d, ok[d]
        wait = (queued_s + sum(max(0.0, t - now) for t in busy_until)) / cfg.num_prefill
        remote = wait + pool_prefill_s(i)
        remote_tpot_misses = tpot_misses(min(decodes, key=lambda x: x.assigned))
        best: tuple[float, int] | None = None
        remote_ok = meets(remote, remote_tpot_misses) and not pushes_everywhere(i, now)
        for d, dn in enumerate(decodes):
            b, ctx = load(dn)
            ttft, harm, stall = local_ttft(dn)
            if cfg.slo_tpot_s > 0:
                if harms(dn, harm, stall):
                    continue
            elif b and dn.local:
                continue
            if best is None or ttft < best[0]:
                best = (ttft, d)
        if best is None:
            return None, remote_ok
        local, d = best
        local_ok = meets(local, tpot_misses(decodes[d]))
        if local_ok != remote_ok:
            return (d, True) if local_ok else (None, True)
        if not local_ok:
            return None, False
        return (d, True) if wait > 0 and local < remote * (1 - LOCAL_GAIN) else (None, True)

    def next_request(now: float) -> int | None:
        while queue:
            key, i = queue[0]
            # a request that cannot make its deadline now never can again: after the ones that can
            if cfg.order == "slack" and now + queued_cost[i] > key:
                heapq.heappop(queue)
                heapq.heappush(late, i)
                continue
            heapq.heappop(queue)
            return i
        return heapq.heappop(late) if late else None

    def dispatch(now: float) -> None:
        nonlocal queued_s
        while idle and (i := next_request(now)) is not None:
            # the idle node where it costs least (the prefix it holds), the first of those
            node = min(idle, key=lambda n: (prefill_cost(cfg.prefill, i, held_on(prefill_caches[n], prefill_stores[n], i, cfg.prefill)), n))
            idle.remove(node)
            out[i].prefill_node = node
            took = prefill_cost(cfg.prefill, i, held_on(prefill_caches[node], prefill_stores[node], i, cfg.prefill,
                                                          touch=True))
            queued_s -= queued_cost.pop(i)
            busy_until[node] = now + took
            push(now + took, PREFILLED, node, i)

    def step(d: int, now: float) -> None:
        dn = decodes[d]
        while dn.waiting and len(dn.running) < cfg.max_batch:
            i = dn.waiting[0]
            need = trace[i].input_len + trace[i].output_len
            if cfg.kv_capacity_tokens and dn.reserved + need > cfg.kv_capacity_tokens and dn.running:
                break
            dn.waiting.pop(0)
            out[i].decode_wait_s = now - joined_at.pop(i)
            dn.reserved += need
            heapq.heappush(dn.running, (dn.step_no + trace[i].output_len - 1, i))
            dn.base += trace[i].input_len + 1 - dn.step_no
        took = 0.0
        if dn.local:  # a chunk of the local prefill at its head rides in this step
            r = dn.local[0]
            left = dn.local_left[r]
            c = min(chunk_tokens(cfg.step_tokens, len(dn.running)), left)
            total, held, load_s = dn.local_total[r]
            done = total - left
            # (the held prefix's load goes before its first chunk)
            took = cfg.decode.prefill_s(done + c, held) - (cfg.decode.prefill_s(done, held) if done else -load_s)
            dn.chunk = (r, c)
        if not dn.running and dn.chunk is None:
            dn.stepping = False
            return
        dn.stepping = True
        b, ctx = len(dn.running), dn.base + len(dn.running) * dn.step_no
        if dn.chunk is not None:
            took += beside_s(cfg.decode, b, ctx)  # the chunk's own time holds the step's overhead
        else:
            took += cfg.decode.step_s(b, ctx)
        push(now + took, STEPPED, d, -1)

    while events:
        now, _, kind, node, i = heapq.heappop(events)
        if kind == ARRIVE:
            e = trace[i]
            d, ok = local_choice(i, now) if cfg.local else (None, True)
            if cfg.admission and not (ok if cfg.local else admit(i, now)):
                out[i].refused = True
                continue
            if d is not None:
                dn = decodes[d]
                out[i].local, out[i].decode_node = True, d
                dn.assigned += 1
                dn.arrivals.add(e.output_len, now)
                dn.local.append(i)
                held, load_s = decode_held(d, i, touch=True)
                dn.local_left[i] = e.input_len - held
                dn.local_total[i] = (e.input_len - held, held, load_s)
                if not dn.stepping:
                    dn.stepping = True
                    push(now, START, d, -1)
                continue
            heapq.heappush(queue, (e.arrival_s if cfg.order == "fifo" else e.arrival_s + cfg.slo_ttft_s, i))
            queued_cost[i] = pool_prefill_s(i)
            queued_s += queued_cost[i]
            dispatch(now)
        elif kind == PREFILLED:
            idle.append(node)
            idle.sort()
            prefill_caches[node].add(keys(i))
            if (store := prefill_stores[node]) is not None:
                store.save(chunks(i))
            o, e = out[i], trace[i]
            o.ttft_s = now - o.arrival_s
            produced_start[i] = now
            dispatch(now)
            if e.output_len <= 1:
                o.e2e_s, o.completed = o.ttft_s, True
                continue
            if cfg.kv_capacity_tokens and e.input_len + e.output_len > cfg.kv_capacity_tokens:
                o.never_fits = True  # can never fit a decode node: not completed
                continue
            d = min(range(cfg.num_decode), key=lambda k: (decodes[k].assigned, k))
            decodes[d].assigned += 1
            decodes[d].arrivals.add(e.output_len, now)
            decodes[d].fetching.add(i)
            o.decode_node = d
            push(now + cfg.decode.transfer_s(e.input_len * cfg.kv_bytes_per_token), JOIN, d, i)
        elif kind == JOIN:
            decode_caches[node].add(keys(i), decode_room(node))  # its KV, arrived, is in the engine's cache
            decodes[node].fetching.discard(i)
            decodes[node].waiting.append(i)
            joined_at[i] = now
            if not decodes[node].stepping:  # start after every other join of this instant: one batch
                decodes[node].stepping = True
                push(now, START, node, -1)
        elif kind == START:
            step(node, now)
        else:  # STEPPED
            dn = decodes[node]
            dn.step_no += 1
            while dn.running and dn.running[0][0] <= dn.step_no:
                _, r = heapq.heappop(dn.running)
                e, o = trace[r], out[r]
                dn.base -= e.input_len + 1 - (dn.step_no - (e.output_len - 1))
                dn.reserved -= e.input_len + e.output_len
                dn.assigned -= 1
                o.e2e_s = now - o.arrival_s
                o.tpot_s = (now - produced_start.pop(r)) / (e.output_len - 1)
                o.completed = True
            if dn.chunk is not None:  # a local prefill's chunk went with the step
                r, c = dn.chunk
                dn.chunk = None
                dn.local_left[r] -= c
                if not dn.local_left[r]:  # its last: the first token, and it joins the batch next step
                    del dn.local_left[r], dn.local_total[r]
                    dn.local.pop(0)
                    decode_caches[node].add(keys(r), decode_room(node))
                    if (store := decode_stores[node]) is not None:
                        store.save(chunks(r))
                    e, o = trace[r], out[r]
                    o.ttft_s = now - o.arrival_s
                    if e.output_len <= 1:
                        o.e2e_s, o.completed = o.ttft_s, True
                        dn.assigned -= 1
                    else:
                        produced_start[r] = now
                        joined_at[r] = now
                        dn.waiting.insert(0, r)
            step(node, now)
    return out
