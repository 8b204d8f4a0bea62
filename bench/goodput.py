"""DistServe goodput: the highest arrival rate at which at least 90% of requests meet both SLOs.

Bisection over the rate: first double the rate until attainment falls below
the target (or the ceiling is reached), then halve the bracket until it is
narrower than the tolerance, the probe budget runs out, or the time budget
does. Each probe runs several seeds and takes the median attainment. The
answer is the bracket's lower end: the highest rate *seen* to meet the target.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

GOODPUT_KIND = "DistServe goodput: highest request rate with >= {:.0%} of requests meeting both SLOs"


@dataclass
class Probe:
    rate: float
    attainments: list[float]

    @property
    def attainment(self) -> float:
        return statistics.median(self.attainments)


@dataclass
class GoodputResult:
    goodput_rps: float
    target: float
    bracket: tuple[float, float]
    probes: list[Probe] = field(default_factory=list)
    stopped_by: str = ""

    @property
    def kind(self) -> str:
        return GOODPUT_KIND.format(self.target)


def find_goodput(measure: Callable[[float, int], float], *, start_rate: float = 1.0, seeds: int = 3,
                 target: float = 0.9, rel_tol: float = 0.1, max_rate: float = 1e4, budget_s: float = 600.0,
                 max_probes: int = 30, progress: Callable[[str], None] = lambda _m: None,
                 min_rate: float = 0.0) -> GoodputResult:
    """``measure(rate, seed)`` runs one seeded probe and returns its SLO attainment (0..1). With
    ``min_rate``, a search that finds nothing meeting the target down to that rate stops there
    (goodput 0) instead of bisecting towards zero."""
    if not 0 < target <= 1 or start_rate <= 0 or seeds < 1:
        raise ValueError("target must be in (0, 1], start_rate positive, seeds at least 1")
    t0 = time.monotonic()
    probes: list[Probe] = []

    def probe(rate: float) -> bool:
        p = Probe(rate, [measure(rate, s) for s in range(seeds)])
        probes.append(p)
        ok = p.attainment >= target
        progress(f"rate {rate:.3g} req/s: attainment {p.attainment:.1%} over {seeds} seed(s) -> "
                 f"{'meets' if ok else 'misses'} {target:.0%}")
        return ok

    def out_of_budget() -> str:
        if time.monotonic() - t0 > budget_s:
            return "time budget"
        if len(probes) >= max_probes:
            return "probe budget"
        return ""

    lo, hi = 0.0, start_rate
    # Grow until a rate misses the target.
    while probe(hi):
        lo = hi
        if hi >= max_rate:
            return GoodputResult(lo, target, (lo, hi), probes, "rate ceiling")
        hi = min(hi * 2, max_rate)
        if (why := out_of_budget()):
            return GoodputResult(lo, target, (lo, hi), probes, why)
    # Bisect [lo, hi): lo meets (or is 0), hi misses.
    while hi - lo > rel_tol * hi:
        if lo == 0 and hi <= min_rate:
            return GoodputResult(0.0, target, (lo, hi), probes, "below the lowest rate")
        if (why := out_of_budget()):
            return GoodputResult(lo, target, (lo, hi), probes, why)
        mid = (lo + hi) / 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return GoodputResult(lo, target, (lo, hi), probes, "converged")
