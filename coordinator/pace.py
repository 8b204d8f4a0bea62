"""A decode node's pace as admission reads it (estimates.py builds on it): the step its streams
see, with the node's local prefills beside them (``stepper``, ``shared_step``), the batch a
newcomer is forecast to decode beside over its life (``forward_batch``), and which running
streams a newcomer would push past their TPOT objective (``pushed``). The simulator
(tandem/simpredict.py) decides with the same ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tandem.perfmodel import VLLM_STEP_TOKENS, beside_s, chunk_tokens
from tandem.proto import tandem_pb2 as pb

from .nodeclient import NodeClient

DEFAULT_STEP_TOKENS = 256  # a decode node's per-step budget when its load does not say
MAX_PREFILL_BUSY = 0.8  # the most of a decode node's time its local prefills are taken to hold


def step_tokens(node: NodeClient, load: pb.NodeLoad | None) -> int:
    """A node's per-step token budget (``NodeLoad.step_tokens``), as its load reports it; not
    reported, a decode node's default (``DEFAULT_STEP_TOKENS``) or on a prefill node vLLM's, as
    the node itself takes it (``NodePerf``)."""
    default = VLLM_STEP_TOKENS if node.record.role == "prefill" else DEFAULT_STEP_TOKENS
    return (load.step_tokens if load is not None else 0) or default


def stepper(node: NodeClient, load: pb.NodeLoad | None = None):  # type: ignore[no-untyped-def]
    """The node's decode step time as its streams see it, with local prefills beside them a
    share ``busy`` of the recent time (``NodeLoad.prefill_busy``): the engine runs their chunks in
    its steps, so a stream still gets a token every step, but the steps that carry a chunk take
    longer (the chunk's prefill and what the batch adds to it, ``beside_s``). Over a time T, then,
    (1 - busy) T / pure + busy T / mixed steps, a token each: the mean gap is their weighted
    harmonic mean. (Until the seventeenth sitting the fitted step was stretched by 1 / (1 - busy),
    as if no stream stepped while a prefill ran: at 0:2 multi-turn, busy near 0.7, it predicted
    steps of 220 ms at a batch of 16 that took ~60 ms, and most refusals were TPOT ones.) Without
    a prefill model, that stretch (``busy`` at most ``MAX_PREFILL_BUSY``). ``load``: as ``estimates.decode_load``."""
    if load is None:
        load = node.fresh_load()
    busy = min(1.0, max(0.0, load.prefill_busy)) if load is not None else 0.0
    model = node.model
    if busy > 0.0 and not model.prefill.samples:
        stretch = 1.0 - min(MAX_PREFILL_BUSY, busy)
        return lambda b, ctx: model.step_s(b, ctx) / stretch
    return shared_step(model, busy, step_tokens(node, load))


def shared_step(model: Any, busy: float, budget: int) -> Callable[[float, float], float]:
    """``model``'s decode step as streams see it with local prefills beside them ``busy`` of the
    time, chunks of up to ``budget`` tokens a step (``stepper``'s; the simulator's too)."""
    if busy <= 0.0:
        return model.step_s

    def step(b: float, ctx: float) -> float:
        pure = model.step_s(b, ctx)
        mixed = max(pure, model.prefill_s(chunk_tokens(budget, b)) + beside_s(model, b, ctx))
        return 1.0 / ((1.0 - busy) / pure + busy / mixed) if pure > 0 else mixed * busy
    return step


def forward_batch(lefts: Sequence[int], tokens: int, per_step: float, mean_tokens: float,
                  others: float = 1.0) -> float:
    """The mean batch over the ``tokens`` steps of a newcomer's life (``estimates.life_load``'s, and the
    simulator's): the streams there, ``others`` for each of ``lefts`` (their tokens to come), stay
    as long as those last, and requests arrive at ``per_step`` a step, each staying
    ``mean_tokens`` steps (the mean over [0, tokens] of per_step * min(t, mean_tokens))."""
    staying = sum(min(max(n, 0), tokens) for n in lefts) / tokens * others
    arriving = per_step * (mean_tokens - mean_tokens * mean_tokens / (2 * tokens) if tokens > mean_tokens
                           else tokens / 2)
    return staying + arriving


def pushed(tpot_left: list[tuple[float, int]], step_now: float, step_new: float, stall_s: float = 0.0,
           slower: float | None = None, ahead_s: float = 0.0) -> int:
    """How many of this coordinator's streams on a node (``tpot_left``: ``estimates.DecodeView.tpot_left``,
    what each has left of its TPOT objective) a newcomer would push past their TPOT
    objective: those that meet it at ``step_now`` a token (what the node's step is now) for the
    rest of their tokens, but not at ``step_new`` (the step with the newcomer in the batch), nor
    when they also wait ``stall_s`` once (its prefill, when the node prefills it) on top of
    ``slower`` a token (the step with it and without that stall; default ``step_new``). Streams that
    miss it at the present pace already are not the newcomer's doing and do not count: they
    would block every request from the node while they last. (Until the eighteenth sitting a
    newcomer was checked against its own objective only, and a local prefill's stall against
    the objective spread over the newcomer's tokens: a stream admitted near its objective was
    pushed past it by those that joined its batch after it, most of the TPOT misses on the
    seventeenth sitting's 0:2 multi-turn runs.) ``ahead_s``: what the node's local prefills
    queued already stall each stream, newcomer or not (checked without it, each newcomer in a
    burst found the same slack free: on the twenty-seventh sitting's 0:2 runs a decode node took a
    dozen local prefills in three seconds, and streams predicted 45 ms a token took 105-127).

    The steps are the node's fit's (its ``stepper``), not calibrated: a node's TPOT calibration
    maps a whole request's forecast, with the arrivals to come in it, to what such requests took,
    and its line is flat (slope 0.25-0.45 on the thirty-second sitting's 1:1 chat run, learned as a
    rate drained); through it a newcomer barely moved the step, and a raw 50 ms step read 36-42
    ms, under the 46.6 ms objective. 18-21 of the first 30 requests of each 2.5 req/s run went
    over TPOT. The step fit itself is the node's own measure of its steps (their bias there
    within 1.5 %). Replayed in the simulator with the calibrations carried from rate to rate, the
    raw steps took the mean attainment of that run's six rates from 76 % to 80 %, and the TPOT
    misses at 2.5 req/s from 33 and 14 to none.

    On a decode node those steps have its recent share of local prefills beside them
    (``estimates.DecodeView.step_now``); on a prefill node serving streams whole they are its plain steps
    (``choice.stalled``: there the share is the pool's own prefills, the ones the check lets in).
    The plain step on decode nodes too was tried on the forty-second sitting and not kept: on two
    order-balanced 1:1 chat runs it refused more and let no fewer streams go over TPOT
    (docs/PERFORMANCE.md, push42). A decode node's local prefills keep coming, and the shared
    step is the pace a newcomer decoding there meets too."""
    if not tpot_left or step_new <= 0:
        return 0
    slower = step_new if slower is None else slower
    n = 0
    for secs, tokens in tpot_left:
        secs -= ahead_s
        if secs < step_now * tokens:
            continue  # missing it already at the pace it has now, and the prefills queued ahead
        if max(step_new * tokens, slower * tokens + stall_s) > secs:
            n += 1
    return n
