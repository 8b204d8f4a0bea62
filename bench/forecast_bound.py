"""The least TPOT error a prediction made at admission could have, with the arrivals after it drawn.

A request's TPOT is its decode node's mean step over its life, and the step grows with the batch
(``TPOT = a + b·batch``, the line bench/forecast.py fits on the true batch over each life). The
batch over the life holds the requests that arrive while it decodes, and which of those come is
not known when it is admitted. This asks how small the TPOT error could be for any prediction
made then, given more than admission knows:

- the streams decoding when the request starts, and how long each will really stay;
- its node's rate of arrivals (decode starts) over the 20 s either side of it, the future half
  included;
- the decode lives of the requests that started there in that window, the request's own
  excluded, which later arrivals' lives are drawn from.

The arrivals over the request's life are drawn ``draws`` times (Poisson at that rate, uniform
times, each staying a drawn life or to the request's end), giving a TPOT a draw. The prediction
that minimises the mean relative error over them is their median weighted by 1 / TPOT. Its
error against the draws is what no prediction made at admission beats under these assumptions,
step line and arrival rate known. Against the measured TPOT it also carries the step line's own
scatter (the ``oracle`` row of forecast.py).

The per-node arrivals are taken as Poisson. The load generator's are Poisson at the coordinator.
At one decode node, admission thins them, refusing more when busy; at several, it also spreads
them to the least loaded. Both make a node's arrivals more regular than Poisson. So on a log with
many refusals, or several decode nodes, this bound is loose: it can be above what a
prediction could reach.
"""

from __future__ import annotations

import bisect

import numpy as np

from tandem.bench.forecast import Req, p50_p90

WINDOW_S = 20.0


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value v minimising sum(w · |v - x|): the smallest x whose weights up to it reach half."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    return float(v[int(np.searchsorted(cum, cum[-1] / 2))])


def draw_tpots(life: float, known_s: float, rate: float, lives: np.ndarray, const: float, per_stream: float,
               draws: int, rng: np.random.Generator) -> np.ndarray:
    """A request's TPOT under ``draws`` draws of the arrivals over its ``life``: ``known_s`` is
    the stream-seconds of the batch known at its start (it and the streams there, each for as long
    as it stays within the life); the arrivals come at ``rate`` a second, each staying a life drawn
    from ``lives`` (or to the end of this one)."""
    counts = rng.poisson(rate * life, draws)
    total = int(counts.sum())
    at = rng.uniform(0.0, life, total)
    stay = np.minimum(rng.choice(lives, total), life - at)
    per_draw = np.zeros(draws)
    np.add.at(per_draw, np.repeat(np.arange(draws), counts), stay)
    return const + per_stream * (known_s + per_draw) / life


def arrivals_bound(reqs: list[Req], const: float, per_stream: float, draws: int = 200,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """p50 / p90 of the best prediction's error (see the module's doc) against the draws
    (``drawn``) and against the measured TPOT (``measured``), over the requests of every decode
    node; with the mean arrivals a life (``arrivals_per_life``)."""
    rng = np.random.default_rng(seed)
    drawn: list[np.ndarray] = []
    measured: list[float] = []
    arrivals = []
    for node in sorted({r.node for r in reqs}):
        mine = sorted((r for r in reqs if r.node == node), key=lambda r: r.start)
        starts = [r.start for r in mine]
        first, last = starts[0], starts[-1]
        for i, r in enumerate(mine):
            life = r.end - r.start
            if life <= 0:
                continue
            a, b = max(first, r.start - WINDOW_S), min(last, r.start + WINDOW_S)
            lo, hi = bisect.bisect_left(starts, a), bisect.bisect_right(starts, b)
            around = [q for q in mine[lo:hi] if q is not r]
            if b - a < 1.0 or len(around) < 5:
                continue
            rate = len(around) / (b - a)
            lives = np.array([q.end - q.start for q in around])
            known = life + sum(min(q.end, r.end) - r.start for q in mine[:i] if q.end > r.start)
            tpots = draw_tpots(life, known, rate, lives, const, per_stream, draws, rng)
            best = weighted_median(tpots, 1.0 / tpots)
            drawn.append(np.abs(best - tpots) / tpots)
            measured.append(abs(best - r.tpot) / r.tpot)
            arrivals.append(rate * life)
    if not measured:
        return {}
    pooled = np.concatenate(drawn)
    return {"drawn": {"p50": float(np.percentile(pooled, 50)), "p90": float(np.percentile(pooled, 90))},
            "measured": p50_p90(measured),
            "arrivals_per_life": {"mean": float(np.mean(arrivals)), "requests": float(len(measured))}}
