"""What a request would see on one node: the predictions admission (admission.py) chooses by.

Each estimate is made from the node's fitted model (tandem/perfmodel.py, the coefficients the
node reports), its reported load, and what this coordinator has sent there:

- ``prefill_estimate``: TTFT on a prefill node, its queue (as the prefill order would place the
  request, prefillq.py) plus this prompt's uncached prefill;
- ``decode_estimate``: TPOT on a decode node, the KV fetch and the steps of the batch it is
  forecast to join over its life (``life_load``);
- ``local_estimate``: TTFT and TPOT when the decode node prefills the request itself (in chunks
  beside its batch), and what that costs the streams it is decoding.

Each prediction carries the node's learned calibration factor and, for the log and a refusal,
what it stood on. The decode node's pace they read (its step, the batch forecast, the streams a
newcomer would push) is pace.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tandem.perfmodel import ModelView, beside_s, chunk_steps, kv_bytes_per_token
from tandem.proto import tandem_pb2 as pb

from .nodeclient import NodeClient
from .pace import forward_batch, pushed, step_tokens, stepper
from .prefillq import PrefillOrder
from .prefix import Held, load_s, prefill_after_load

MIN_OTHERS_TOKENS = 16  # the fewest tokens a running stream is assumed to have left


@dataclass
class Estimate:
    node: NodeClient
    seconds: float | None  # None: the node has no model yet
    idle_seconds: float | None = None  # the same on an idle node
    describe: Callable[[], str] = lambda: ""  # what it stood on, made only when logged or refused
    queue_s: float = 0.0  # of ``seconds``, the wait for work already queued there
    # queued requests it would push past their TTFT objective (prefill order); on a decode node,
    # running streams it would push past their TPOT objective (``pushed``)
    pushes: int = 0
    factor: float = 1.0  # the node's learned calibration, in ``seconds`` (not in ``idle_seconds``)
    cached_tokens: Held = Held()  # what it holds of the prompt (engine prefix cache, KV store)

    @property
    def detail(self) -> str:
        return self.describe()


def prefill_estimate(node: NodeClient, tokens: int, order: PrefillOrder | None = None,
                     arrival: float = 0.0, ttft_s: float | None = None, cached: Held = Held()
                     ) -> Estimate:
    """With ``order``: the wait is where the prefill order (prefillq.py) would put a request
    that arrived at ``arrival`` with TTFT objective ``ttft_s`` among this coordinator's own
    requests for the node; otherwise (or with nothing of this coordinator's there) the whole
    queue the node reports, in arrival order. ``cached``: what the node holds of the prompt from
    its start (in its engine's prefix cache, or loaded from its KV store): not computed."""
    model = node.model
    cached = cached.capped(tokens - 1)  # the last prompt token is always computed
    if not model.prefill.samples:
        return Estimate(node, None, cached_tokens=cached)
    held = cached.tokens
    idle_s = prefill_after_load(model, tokens, held) + load_s(cached.loaded, cached.disk, model)
    batch_s = beside_whole_s(node, tokens - held)  # (not in ``idle_s``: on an idle node there is no batch)
    where = order.predict(node, tokens - held, arrival, ttft_s, held, batch_s) if order is not None else None
    if where is not None:
        # The prompts of the requests it serves whole (--colocate) go to its engine at once, not
        # through the prefill order: they run before this one (counted whole, however far along).
        whole = [t for t in node.prefilling.values() if t > 0]
        raw_wait_s = where.wait_s + queued_prefill_s(model, whole, own_steps=node.record.own_steps) \
            + beside_whole_s(node, *whole)
        f = node.factor("ttft", raw_wait_s + idle_s + batch_s)  # (all parts scaled alike: the calibration's share)
        wait_s, run_s = raw_wait_s * f, (idle_s + batch_s) * f
        return Estimate(node, wait_s + run_s, idle_s, queue_s=wait_s, pushes=where.pushes, factor=f,
                        cached_tokens=cached, describe=lambda:
                        f"{node.node_id}: {wait_s * 1000:.0f} ms before its turn ({order.order} order) + "  # type: ignore[union-attr]
                        f"prefill {run_s * 1000:.0f} ms{_beside_whole(batch_s * f)}{_calibrated(f)}{_held(cached)}")
    queue = _prefill_queue(node, {**node.prefills, **node.prefilling} if node.prefilling else node.prefills)
    raw_queue_s = sum(model.prefill_s(t) for t in queue) + beside_whole_s(node, *queue)
    f = node.factor("ttft", raw_queue_s + idle_s + batch_s)
    queue_s, run_s = raw_queue_s * f, (idle_s + batch_s) * f
    return Estimate(node, queue_s + run_s, idle_s, queue_s=queue_s, factor=f, cached_tokens=cached, describe=lambda:
                    f"{node.node_id}: queue {len(queue)} prompts {queue_s * 1000:.0f} ms + prefill "
                    f"{run_s * 1000:.0f} ms{_beside_whole(batch_s * f)}{_calibrated(f)}{_held(cached)}")


def beside_whole_s(node: NodeClient, *prompts: int) -> float:
    """On a prefill node serving streams whole (--colocate): what their decode batch adds to the
    engine steps that carry prefills of ``prompts`` tokens each (``beside_s`` a step, as for a
    local prefill on a decode node; the node's budget, vLLM's 2048 tokens by default there, holds
    most prompts in one step). The batch is ``decode_load``'s: the streams producing tokens there
    and those whose prompts are still in its engine, which run first and decode beside this one.
    The node fits its prefills net of what a batch adds (``NodePerf._own_share``), so without this
    a prefill call beside such streams was predicted as if alone (the forty-second sitting:
    docs/PERFORMANCE.md). The prompts queued ahead of a call run beside them too: their wait
    counts it as well (the prefill order's entries with it, ``PrefillOrder.entry``, as the batch
    was when each was made). 0 elsewhere, or with no stream there."""
    if node.record.role != "prefill" or not prompts:
        return 0.0
    load = node.fresh_load()
    batch, context = decode_load(node, load)
    if not batch:
        return 0.0
    budget = step_tokens(node, load)
    return sum(chunk_steps(t, budget, batch) for t in prompts if t > 0) * beside_s(node.model, batch, context)


def _beside_whole(seconds: float) -> str:
    return f" ({seconds * 1000:.0f} ms of it beside the streams it serves whole)" if seconds else ""


def block_tokens(node: NodeClient) -> int:
    return int(node.record.layout.get("block_size", 1) or 1)


def blocks(node: NodeClient, tokens: int) -> int:
    """The KV blocks ``tokens`` take on ``node``."""
    return -(-tokens // block_tokens(node))


def _held(cached: Held) -> str:
    """An estimate's words for the prefix credited to its node, and where it is (the rest: its KV store's RAM)."""
    if not cached.tokens:
        return ""
    return f", {cached.tokens} tokens held there ({cached.engine} in its engine's cache, {cached.disk} on disk)"


def _room(room_s: float, short: int) -> str:
    return f" + {room_s * 1000:.0f} ms for KV room ({short} tokens short)" if short else ""


def _calibrated(f: float) -> str:
    return f" (x{f:.2f}, learned)" if abs(f - 1.0) >= 0.005 else ""


def _prefill_queue(node: NodeClient, own: Mapping[int, int], oldest_left: Callable[[int], int] | None = None) -> list[int]:
    """Tokens to prefill of the prefills waiting or running there: this coordinator's own
    (``own``: each one's prompt less what admission credited the node with holding, the oldest
    as ``oldest_left`` says is left of it), and, when the node reports more prefills than that,
    the rest of its report (another coordinator's, or one that just ended), whole prompts. The
    report carries whole prompts: with prefixes held there, taking it whenever its sum was
    larger (as until the seventeenth sitting) counted cached tokens as work; on that sitting's
    0:2 multi-turn run a request predicted to wait 0.9 s behind two such prefills was answered
    in 0.17 s."""
    load = node.fresh_load()
    reported = list(load.prefill_queue) if load is not None else []
    mine = [t for t in own.values() if t > 0]  # (a request tracked with no prompt there yet: none)
    if oldest_left is not None and mine:
        mine[0] = min(mine[0], oldest_left(mine[0]))
    return mine + reported[len(mine):]


def _local_queue(node: NodeClient, budget: int, batch: int, context: int) -> tuple[list[int], float]:
    """The local prefills on a decode node: their prompt tokens still to prefill each
    (``_prefill_queue``), and what they add to the TTFT of a prompt behind them (model only,
    ``queued_prefill_s``). Of this coordinator's own, the oldest (the engine runs them in turn) has
    been running since it was sent, or since the one before it ended, and is that far through (a
    share of what its prefill and the steps beside it take). Counted whole, it was most of the TTFT
    refusals of the sixteenth sitting's 0:1 run: each one's queue was one prefill, counted from its
    start whatever share of it had run. Each of this coordinator's own takes what admission
    predicted for it (``NodeClient.prefilling_run_s``: the attention over its held prefix and its
    store load in it); reckoned from its tokens, a prompt of 100 new tokens after 1,024 held came
    to 54 ms where the model says 84."""
    model = node.model
    if node.sent:
        # A prefill node (--colocate): its engine runs the prefill calls sent to it (past their
        # turn in the prefill order) as well, begun before these; what its report lists beyond
        # both, whole prompts.
        sent = [t for t in node.sent.values() if t > 0]
        queue = _prefill_queue(node, {**node.sent, **node.prefilling})
        runs = [0.0] * len(sent) + [node.prefilling_run_s.get(k, 0.0) for k, t in node.prefilling.items() if t > 0]
        return queue, queued_prefill_s(model, queue, runs[:len(queue)], node.record.own_steps)
    own = [k for k, t in node.prefilling.items() if t > 0]
    share = [1.0]  # of the oldest, the share still to run

    def left(first: int) -> int:
        began = max(node.prefilling_since.get(own[0], 0.0), node.prefilled_at)
        run = node.prefilling_run_s.get(own[0]) or model.prefill_s(first)
        takes = node.calibrated("ttft_local", run + chunk_steps(first, budget, batch) * beside_s(model, batch, context))
        if takes > 0:
            share[0] = 1.0 - min(1.0, max(0.0, time.perf_counter() - began) / takes)
        return round(first * share[0])

    queue = _prefill_queue(node, node.prefilling, left)
    runs = [node.prefilling_run_s.get(k, 0.0) for k in own[:len(queue)]]
    if runs and runs[0]:  # the oldest: the share of it still to run
        base = model.prefill_s(0)
        runs[0] = base + share[0] * (runs[0] - base)
    return queue, queued_prefill_s(model, queue, runs, node.record.own_steps)


def backlog_s(node: NodeClient) -> float:
    """On a prefill node serving streams whole (--colocate): what every prompt this coordinator
    has for it stalls those streams, model only (``queued_prefill_s``): its prefill calls, in its
    engine or still waiting their turn in the prefill order (``NodeClient.prefills``; they all
    run within a stream's few seconds), and the prompts it serves whole; what its report lists
    beyond those, whole prompts."""
    return queued_prefill_s(node.model, _prefill_queue(node, {**node.prefills, **node.prefilling}),
                            own_steps=node.record.own_steps)


def queued_prefill_s(model: ModelView, queue: list[int], runs: Sequence[float] = (), own_steps: bool = False
                     ) -> float:
    """What the local prefills queued on a decode node (tokens still to prefill each) add to the
    TTFT of a prompt behind them: their tokens' share of the prefill fit, without its constant.
    The engine runs prompts in chunks of its per-step budget back to back, the next prompt's first
    chunk filling the step the one before it ends in, so the prompts share the steps' fixed cost
    (the constant, about one step: 18 ms of 18 + 0.27 / token on the twentieth sitting's decode
    nodes). Counted once per queued prompt, as until then, it put the TTFTs of prompts that
    found a local prefill ahead 8 % over the actual in the median on that sitting's 0:2 multi-turn
    run at 4.5 req/s (p50 / p90 error 23 / 74 %; without it, on the same log, -2 %, 17 / 60 %).
    ``runs``: the first prompts' own times where known (0: not known), in place of their tokens'.
    ``own_steps``: the node's engine starts each prompt in a step of its own (``--prompt-steps
    own``, ``NodeRecord.own_steps``): no step is shared, and each queued prompt costs its whole
    prefill, the constant with it."""
    base = 0.0 if own_steps else model.prefill_s(0)
    return sum((runs[i] if i < len(runs) and runs[i] else model.prefill_s(t)) - base
               for i, t in enumerate(queue) if t > 0)


def decode_load(node: NodeClient, load: pb.NodeLoad | None = None) -> tuple[int, int]:
    """(streams, their context tokens) on a decode node: as it reports them (``load``: its fresh
    report, when the caller has it), or as many as this coordinator has sent there, whichever is more."""
    if load is None:
        load = node.fresh_load()
    batch, context = len(node.inflight), node.inflight.total
    if load is not None and load.decode_batch + load.decode_waiting >= batch:
        batch = load.decode_batch + load.decode_waiting
        context = max(context, load.decode_context)
    return batch, context


@dataclass(frozen=True)
class DecodeView:
    """A decode node's state as one admission decision reads it (``decode_view``): built once per
    node per request, so its TPOT estimate, its local-prefill estimate and the check on its running
    streams all read the same numbers, each worked out once. (Until the twenty-first sitting each
    estimate rebuilt them, the queue walk more than once and the streams' budgets three times a node a request.)"""

    node: NodeClient
    load: pb.NodeLoad | None  # its fresh load report (None: none)
    batch: int  # ``decode_load``
    context: int
    step: Callable[[float, float], float]  # ``stepper``
    step_now: float  # its step with the batch it has: ``step(batch, context)``
    step_tokens: int  # its per-step token budget (``step_tokens``)
    queue: list[int]  # its local prefills' tokens still to prefill (``_local_queue``)
    queue_s: float  # what they add to the TTFT of a prompt behind them (model only)
    # this coordinator's streams there with a TPOT objective: (seconds left within it, tokens to
    # come); asked only for a decision that protects running streams (else empty)
    tpot_left: list[tuple[float, int]]
    # on a prefill node (--colocate): what every prompt this coordinator has for it stalls the
    # streams it serves whole (``backlog_s``); elsewhere 0
    backlog_s: float = 0.0


def decode_view(node: NodeClient, tpot_left: bool = True) -> DecodeView:
    """``tpot_left``: ask each stream what it has left of its objective (admission's ``protect``)."""
    load = node.fresh_load()
    batch, context = decode_load(node, load)
    budget = step_tokens(node, load)
    step = stepper(node, load)
    now = time.perf_counter()
    left = [got for b in node.budgets.values() if (got := b(now)) is not None] if tpot_left else []
    return DecodeView(node, load, batch, context, step, step(batch, context), budget,
                      *_local_queue(node, budget, batch, context), left,
                      backlog_s(node) if node.record.role == "prefill" else 0.0)


def kv_wait(node: NodeClient, tokens: int, step_s: float, batch: int) -> tuple[float, int]:
    """(seconds, tokens short): how long work needing ``tokens`` more of a decode node's KV cache
    (a prompt's blocks, and what its local prefills queued ahead still need) waits for room there,
    and how far short the cache is now. vLLM admits a waiting request only when its blocks fit in
    the free ones (those only the prefix cache holds count as free), so it waits until running
    streams end and free theirs, while those still running grow a token a step each.

    The free room is the node's report (``NodeLoad.kv_free_tokens``; none: no wait). A stream of
    this coordinator's there ends after the tokens it has to come (``NodeClient.left``) at
    ``step_s`` a step and frees its prompt's tokens (``NodeClient.inflight``; what it made is
    freed too, unknown and left out); streams the node reports beyond those grow and never end
    here. If even all of those are not enough, the wait
    is until the last of them ends. (The eighteenth sitting's 0:2 multi-turn run: local prefills
    on decode nodes with a batch of 14-16 in a 9,824-token cache took 1.7-2 s where 0.3-0.4 s
    was predicted, and most TTFTs over 1 s were predicted at half or less: the prompt waited for
    room.) The streams this coordinator reserved there whose prompts a prefill node is computing
    (``NodeClient.awaiting``) take blocks too, and the node's report does not count them yet: a
    fetch arriving after them waits behind them, and a local prefill, whose chunks take their
    blocks step by step, meets them as they arrive. Left out: requests in the engine's queue that
    hold no blocks yet (``NodeLoad.engine_waiting``; of this coordinator's, a local prefill's queue
    is in ``tokens``), and other coordinators' reservations."""
    load = node.fresh_load()
    if load is None or load.kv_tokens <= 0:
        return 0.0, 0
    awaiting = node.awaiting.total + len(node.awaiting) * block_tokens(node)  # (a block over each, at most)
    short = tokens + awaiting - load.kv_free_tokens
    if short <= 0:
        return 0.0, 0
    ends = sorted((max(0, left()), node.inflight.get(key, 0)) for key, left in node.left.items())
    if not ends:
        return 0.0, short
    others = max(0, batch - len(ends))  # streams it does not know the ends of: they grow all along
    freed = steps = 0  # the prompt tokens those ended so far free (with all they grew meanwhile)
    for i, (steps, ctx) in enumerate(ends):
        freed += ctx
        if freed - (len(ends) - i - 1 + others) * steps >= short:  # less what those running grew
            break
    return steps * step_s, short


def life_load(node: NodeClient, tokens: int, view: DecodeView | None = None) -> tuple[float, float]:
    """(streams, context tokens) a new request of ``tokens`` output tokens on this decode node
    decodes beside, on average over its steps (its TPOT is their mean step).

    Looking ahead: each stream this coordinator has there stays for as many of those steps as it
    has tokens to come (a node's streams step together), and requests keep arriving at the
    node's recent rate, each staying for the recent mean of output tokens asked for. Streams the
    node reports beyond this coordinator's (another coordinator's) count like its own. Without
    streams of its own there, as before: half the batch now, half the node's recent average.
    Measured on a coordinator log (bench/forecast.py, the thirteenth sitting's run): TPOT
    error p50 15 % and p90 33 % with this view, 22 % and 40 % with the half-and-half one, 5 % and
    12 % knowing the batch to come; the rest is when the later requests arrive, which no forecast
    made now knows. O(streams) a node: each one's tokens to come are asked. ``view``: the node's
    ``decode_view``, when the caller has it."""
    view = view or decode_view(node, tpot_left=False)
    batch, context, load = view.batch, view.context, view.load
    lefts = [f() for f in node.left.values()]
    if not lefts or tokens < 1:
        if load is None or load.decode_batch_mean <= 0:
            return float(batch), float(context)
        return (batch + load.decode_batch_mean) / 2, (context + load.decode_context_mean) / 2
    others = max(1.0, batch / len(lefts))  # the node's streams per one of this coordinator's
    rate, mean_tokens = node.arrivals.rate()
    life = forward_batch(lefts, tokens, rate * others * view.step(batch + 1, context), mean_tokens, others)
    if batch:
        each = context / batch
    else:  # the recent streams' mean context stands in for the arrivals'
        each = load.decode_context_mean / load.decode_batch_mean if load and load.decode_batch_mean > 0 else 0.0
    return life, life * each


def decode_estimate(node: NodeClient, prompt_tokens: int, max_tokens: int,
                    life: tuple[float, float] | None = None, protect: bool = True, kv_room: bool = True,
                    view: DecodeView | None = None) -> Estimate:
    """Mean time per output token after the first, for a request of ``max_tokens`` (>= 2).
    ``life``: ``life_load(node, max_tokens)`` and ``view``: ``decode_view(node)``, when the caller
    has them already. Its ``pushes`` (with ``protect``): the running streams it would push past
    their objective (``pushed``)."""
    model = node.model
    if not model.decode.samples:
        return Estimate(node, None)
    view = view or decode_view(node, protect)
    step, batch, context = view.step, view.batch, view.context
    life_batch, life_context = life or life_load(node, max_tokens, view)
    mine = prompt_tokens + max_tokens // 2  # its mean context over the steps
    kv = blocks(node, prompt_tokens) * block_tokens(node) * kv_bytes_per_token(node.record.layout)
    # The fetch plus its first step; with no transfer samples yet, one step stands in for it. Its
    # blocks wait for room in the node's KV cache first (``kv_wait``; with ``kv_room``), behind what
    # the node's local prefills still need (vLLM holds those blocks back from an arriving load).
    # (The raw step: the node's TPOT calibration scales this whole prediction.)
    room_s, short = 0.0, 0
    if kv_room:
        room_s, short = kv_wait(node, sum(view.queue) + (blocks(node, prompt_tokens) + 1) * block_tokens(node),
                                view.step_now, batch)
    first = room_s + (model.transfer_s(kv) if model.transfer.samples else model.step_s(batch + 1, context + mine))
    each = step(life_batch + 1, life_context + mine)
    raw = (first + (max_tokens - 2) * each) / (max_tokens - 1)
    f = node.factor("tpot", raw)
    busy = raw * f
    idle = (first + (max_tokens - 2) * model.step_s(1, mine)) / (max_tokens - 1)
    # (The steps at their fit, not calibrated: see ``pushed``.)
    pushes = pushed(view.tpot_left, view.step_now, step(batch + 1, context + prompt_tokens),
                    ahead_s=node.calibrated("ttft_local", view.queue_s)) if batch and protect else 0
    return Estimate(node, busy, idle, factor=f, pushes=pushes,
                    describe=lambda: f"{node.node_id}: batch {batch} now, {life_batch:.1f} + 1 over its life, step "
                                     f"{each * 1000:.1f} ms, KV {kv >> 10} KiB in {first * 1000:.0f} ms"
                                     f"{_room(room_s, short)}"
                                     f"{_calibrated(f)}")


@dataclass
class LocalEstimate:
    """Prefill on decode node ``node`` itself: the request's TTFT and TPOT there, and how much
    each stream it is decoding would slow down (seconds per token) meanwhile."""

    ttft: Estimate
    tpot: Estimate | None
    harm_s: float
    stall_s: float = 0.0  # its prefill's time there: what each running stream waits for it, once
    ahead_s: float = 0.0  # the local prefills queued there before it: what each stream waits for them


def local_estimate(node: NodeClient, prompt_tokens: int, max_tokens: int, cached: Held = Held(),
                   life: tuple[float, float] | None = None, kv_room: bool = True,
                   view: DecodeView | None = None) -> LocalEstimate | None:
    """None when the node has no prefill or no decode model yet.

    TTFT = the prefills queued there (``_local_queue``: this coordinator's local prefills still
    running there, each at what admission predicted for it, then what the node reports beyond
    them) + this prompt's prefill, both from the node's prefill model (profiled on its own
    engine, chunks included), + one decode step of its running batch per chunk (``step_tokens`` a
    step, less a token per stream) beside them, + the wait for room in its KV cache for those
    prompts' blocks (``kv_wait``; with ``kv_room``); ``cached``: what the node holds of the prompt
    (its engine's prefix cache, its KV store), not computed. TPOT = a step of the batch with this
    request added (its KV is already there). Harm: every running stream
    waits for the prefill's chunks once, spread over its tokens (this request's ``max_tokens``
    stands in for theirs, which the coordinator does not know). ``life``, ``view``: as
    ``decode_estimate``'s."""
    model = node.model
    if not (model.prefill.samples and model.decode.samples):
        return None
    view = view or decode_view(node, tpot_left=False)
    step, batch, context, budget, queue = view.step, view.batch, view.context, view.step_tokens, view.queue
    raw_queue_s = view.queue_s
    cached = cached.capped(prompt_tokens - 1)  # the last prompt token is always computed
    idle_s = prefill_after_load(model, prompt_tokens, cached.tokens) + load_s(cached.loaded, cached.disk, model)
    chunks = chunk_steps(sum(queue) + prompt_tokens - cached.tokens, budget, batch)
    # Its chunks' steps carry the batch too: what the batch adds to each.
    raw_batch_s = chunks * beside_s(model, batch, context)
    # Every block of the prompt comes out of the free ones (a prefix-cached block the engine holds
    # for no running stream counts as free until this request takes it), and one for its first token.
    # (At the raw step: the node's local-prefill calibration scales this whole prediction.)
    raw_room_s, short = (kv_wait(node, sum(queue) + (blocks(node, prompt_tokens) + 1) * block_tokens(node),
                                 view.step_now, batch) if kv_room else (0.0, 0))
    f = node.factor("ttft_local", raw_queue_s + idle_s + raw_batch_s + raw_room_s)
    queue_s, run_s, batch_s, room_s = raw_queue_s * f, idle_s * f, raw_batch_s * f, raw_room_s * f
    ttft = Estimate(node, queue_s + run_s + batch_s + room_s, idle_s, queue_s=queue_s + room_s, factor=f,
                    cached_tokens=cached,
                    describe=lambda: f"{node.node_id} (prefill here): queue {len(queue)} prompts {queue_s * 1000:.0f} ms + "
                    f"prefill {run_s * 1000:.0f} ms + {chunks} steps beside a batch of {batch} "
                    f"{batch_s * 1000:.0f} ms{_room(room_s, short)}{_calibrated(f)}{_held(cached)}")
    tpot = None
    if max_tokens > 1:
        mine = prompt_tokens + max_tokens // 2
        life_batch, life_context = life or life_load(node, max_tokens, view)
        each = step(life_batch + 1, life_context + mine)
        ft = node.factor("tpot", each)
        tpot = Estimate(node, each * ft, model.step_s(1, mine), factor=ft,
                        describe=lambda: f"{node.node_id} (prefill here): batch {batch} now, {life_batch:.1f} + 1 over its life, "
                        f"step {each * 1000:.1f} ms{_calibrated(ft)}")
    harm = (run_s + batch_s) / max(max_tokens, MIN_OTHERS_TOKENS) if batch else 0.0
    return LocalEstimate(ttft, tpot, harm, run_s + batch_s, queue_s)


