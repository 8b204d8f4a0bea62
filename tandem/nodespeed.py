"""How fast a node runs against its own fit, moment to moment: measured on the node, drawn in the
simulator.

A node's steps scatter about the fit its coordinator predicts with, and not independently. On
this host's decode step traces (twenty-ninth sitting, 1:1 chat, ~6,000 steps each) the log of a
step's time over one fit through all of them had a standard deviation of 0.15-0.17, of which the
means over 1 s windows kept 0.10-0.12 (independent steps would have kept 0.025), and those means
were correlated 0.56 one second apart, 0.24-0.42 two seconds apart, ~0 ten seconds apart. So a
node's speed has a slow part, which a prediction made from the fit cannot see and a stream's
tokens do not average away, and each step's own jitter, which they do. The simulator, whose
nodes ran exactly at their fits, let its admission pack a decode batch right up to the TPOT
objective and never saw a stream go over it; the real coordinator's streams went over (thirtieth
sitting, 1:1: 82 of 519 served requests over TPOT, the simulator ~0).

- ``Speed``: the slow part as an Ornstein-Uhlenbeck process in the log of the time factor
  (stationary standard deviation ``sd``, time constant ``tau_s``), the jitter of each piece of
  work (``jitter_sd``), independent, and how far the factor's mean sits from 1 (``bias``, its
  log: a fit that keeps predicting a node a few per cent fast, as the one a decode node learns
  beside a busy prefill node at 1:1 appeared to in the thirty-first sitting's replays).
- ``SpeedTracker`` measures it on a node: each timed piece of work's log(seconds / what the fit
  said just before) into 1 s windows; the windows' spread, their spread within, and how alike
  neighbouring windows are give the three, and their mean the bias (``estimate``).
- ``NodeSpeed`` draws it in the simulator (tandem/sim.py), seeded, each factor's mean exp(bias).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

WINDOW_S = 1.0
KEEP_WINDOWS = 600  # the latest windows with work in them
KEEP_S = 600.0  # ... and none older than this: a node idle for long reports no speed, not a stale one
MIN_WINDOWS = 30  # windows, and neighbouring pairs of them, before an estimate
MIN_WITHIN = 10  # samples past each window's first, for the jitter
# The correlation of neighbouring windows is read within these (a time constant of ~0.1 s to ~100 s)
MIN_RHO, MAX_RHO = 0.01, 0.99


@dataclass(frozen=True)
class Speed:
    """A node's time factor against its fit: log factor = an Ornstein-Uhlenbeck process (stationary
    standard deviation ``sd``, time constant ``tau_s``) plus independent jitter (``jitter_sd``),
    shifted so that the factor's mean is exp(``bias``)."""

    sd: float = 0.0
    tau_s: float = 1.0
    jitter_sd: float = 0.0
    bias: float = 0.0

    def __post_init__(self) -> None:
        if self.sd < 0 or self.jitter_sd < 0 or self.tau_s <= 0:
            raise ValueError(f"a node's speed needs sd >= 0, jitter_sd >= 0 and tau_s > 0, got {self}")

    @property
    def varies(self) -> bool:
        return self.sd > 0 or self.jitter_sd > 0 or self.bias != 0

    @classmethod
    def by_kind(cls, fits: Iterable[Any]) -> dict[str, Speed]:
        """A node's speeds as it sends them (``PerfFit`` messages: ``NodeLoad.speeds``,
        ``NodeInfo.speeds``), by kind; a kind not measured yet is absent."""
        return {f.name: cls(*f.coefficients) for f in fits}

    @classmethod
    def mean(cls, speeds: list[Speed]) -> Speed:
        """A pool's: the nodes' variances and time constants averaged (none: no variation)."""
        if not speeds:
            return cls()
        n = len(speeds)
        return cls(math.sqrt(sum(s.sd ** 2 for s in speeds) / n), sum(s.tau_s for s in speeds) / n,
                   math.sqrt(sum(s.jitter_sd ** 2 for s in speeds) / n), sum(s.bias for s in speeds) / n)

    def describe(self) -> str:
        if not self.varies:
            return "exactly its fit"
        return (f"slow part sd {self.sd:.3f} over {self.tau_s:.1f} s, jitter sd {self.jitter_sd:.3f}, "
                f"{math.exp(self.bias) - 1:+.1%} on average")


def window_correlation(x: float) -> float:
    """The correlation of an Ornstein-Uhlenbeck process's means over two neighbouring windows of
    length ``x`` time constants: (1 - e^-x)^2 / (2 (x - 1 + e^-x)), from 1 (x -> 0) down to 0."""
    e = math.exp(-x)
    return (1.0 - e) ** 2 / (2.0 * (x - 1.0 + e))


def window_share(x: float) -> float:
    """What share of such a process's variance its means over windows of ``x`` time constants keep:
    2 (x - 1 + e^-x) / x^2."""
    return 2.0 * (x - 1.0 + math.exp(-x)) / (x * x)


def _windows_per_tau(rho: float) -> float:
    """The x (window / time constant) whose neighbouring windows' means correlate ``rho``."""
    lo, hi = 1e-4, 100.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if window_correlation(mid) > rho:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


class SpeedTracker:
    """A node's timed work against what its fit predicted for it, in ``WINDOW_S`` windows."""

    def __init__(self, window_s: float = WINDOW_S, keep: int = KEEP_WINDOWS, keep_s: float = KEEP_S) -> None:
        self.window_s, self.keep_s = window_s, keep_s
        # (window index, samples, Σ log ratio, Σ its square), oldest first
        self.windows: deque[list[float]] = deque(maxlen=keep)

    @property
    def samples(self) -> int:
        """The pieces of work in the windows kept."""
        return int(sum(w[1] for w in self.windows))

    def add(self, at: float, seconds: float, predicted: float) -> None:
        """Work that the fit predicted at ``predicted`` seconds took ``seconds``, ending at ``at``."""
        if seconds <= 0 or predicted <= 0:
            return
        r = math.log(seconds / predicted)
        k = math.floor(at / self.window_s)
        if self.windows and self.windows[-1][0] == k:
            w = self.windows[-1]
            w[1] += 1
            w[2] += r
            w[3] += r * r
        else:
            self.windows.append([k, 1, r, r * r])

    def forget(self, now: float) -> None:
        """Drop the windows that ended over ``keep_s`` before ``now``."""
        while self.windows and (self.windows[0][0] + 1) * self.window_s < now - self.keep_s:
            self.windows.popleft()

    def estimate(self, now: float | None = None) -> Speed | None:
        """The ``Speed`` these windows say (None: too few yet; with ``now``, of those that ended
        within ``keep_s`` of it), read as an Ornstein-Uhlenbeck
        process's would be: the spread within windows is the jitter plus what the slow part moves
        inside one (``1 - window_share``); the spread of the windows' means is the slow part's
        ``window_share`` plus the jitter over each window's samples; how alike neighbouring
        windows' means are gives the time constant (the jitter is not in that at all). Solved by
        going round those three a few times from no slow part."""
        if now is not None:
            self.forget(now)
        ws = list(self.windows)
        if len(ws) < MIN_WINDOWS:
            return None
        within_n = sum(w[1] - 1 for w in ws)
        within = sum(w[3] - w[2] * w[2] / w[1] for w in ws) / max(1, within_n)
        means = [w[2] / w[1] for w in ws]
        m = sum(means) / len(means)
        var_means = sum((v - m) ** 2 for v in means) / len(means)
        per_window = sum(1.0 / w[1] for w in ws) / len(ws)  # the mean of 1/samples a window
        pairs = [(a, b) for (wa, a), (wb, b) in zip(zip(ws, means), zip(ws[1:], means[1:])) if wb[0] == wa[0] + 1]
        cov = sum((a - m) * (b - m) for a, b in pairs) / len(pairs) if pairs else 0.0
        # The bias from the windows' mean, a time average: more pieces of work fit in a fast second
        # than in a slow one, so a mean over the pieces would read low.
        mean_log = m
        if within_n < MIN_WITHIN:
            # Too few windows with more than one piece of work (a prefill node's, say) to tell the
            # jitter from the slow part: all of the windows' spread is taken as jitter.
            jitter = var_means / per_window
            return Speed(0.0, 1.0, math.sqrt(jitter), mean_log + jitter / 2.0)
        var, x, jitter = 0.0, 1.0, within
        for _ in range(20):
            jitter = max(0.0, within - var * (1.0 - window_share(x)))
            slow = var_means - jitter * per_window
            if len(pairs) < MIN_WINDOWS or slow <= 0 or cov <= 0:  # no slow part seen: jitter only
                return Speed(0.0, 1.0, math.sqrt(max(0.0, within)), mean_log + max(0.0, within) / 2.0)
            x = _windows_per_tau(min(MAX_RHO, max(MIN_RHO, cov / slow)))
            var = slow / window_share(x)
        # the bias: log of the factor's mean, exp(mean log + variance / 2) for a lognormal
        return Speed(math.sqrt(var), self.window_s / x, math.sqrt(jitter), mean_log + (var + jitter) / 2.0)


class NodeSpeed:
    """One simulated node's time factor: ``factor(now)`` for a piece of work starting at ``now``."""

    def __init__(self, speed: Speed, rng: random.Random) -> None:
        self.speed, self.rng = speed, rng
        self.x = rng.gauss(0.0, speed.sd) if speed.sd else 0.0  # the slow part's log, stationary from the start
        self.at = 0.0
        # E[exp(N(0, s))] = exp(s^2 / 2): each factor's mean exp(bias)
        self.mean_log = speed.bias - (speed.sd ** 2 + speed.jitter_sd ** 2) / 2.0

    def factor(self, now: float) -> float:
        s = self.speed
        x = self.x
        if s.sd:
            keep = math.exp(-max(0.0, now - self.at) / s.tau_s)
            x = self.x = x * keep + s.sd * math.sqrt(1.0 - keep * keep) * self.rng.gauss(0.0, 1.0)
            self.at = now
        if s.jitter_sd:
            x += self.rng.gauss(0.0, s.jitter_sd)
        return math.exp(x + self.mean_log)


PACE_TAU_S = 1.0  # "now": recent work, forgotten over this much time
PACE_LONG_S = 60.0  # ... read against the node's lean over this much (the coordinator's calibration learns that)


class Pace:
    """How fast the node runs against its fit now, for admission: the log of each timed piece of
    work's seconds over what the fit said just before, averaged with weights that fade over
    ``tau_s`` of time, less the same average over ``long_s`` (the node's lasting lean, which the
    coordinator's calibration learns from finished requests). The slow part of a node's speed
    (``Speed``) lasts about a second or two: a prediction made now for work that starts now can
    read it where the fit alone cannot."""

    def __init__(self, tau_s: float = PACE_TAU_S, long_s: float = PACE_LONG_S) -> None:
        self.tau_s, self.long_s = tau_s, long_s
        self.at: float | None = None  # the latest piece of work's end
        self.fast = [0.0, 0.0]  # Σ weight · log ratio, Σ weight, as of ``at``
        self.slow = [0.0, 0.0]

    def add(self, at: float, seconds: float, predicted: float) -> None:
        """Work that the fit predicted at ``predicted`` seconds took ``seconds``, ending at ``at``."""
        if seconds <= 0 or predicted <= 0:
            return
        r = math.log(seconds / predicted)
        dt = max(0.0, at - self.at) if self.at is not None else 0.0
        for acc, tau in ((self.fast, self.tau_s), (self.slow, self.long_s)):
            keep = math.exp(-dt / tau)
            acc[0] = acc[0] * keep + r
            acc[1] = acc[1] * keep + 1.0
        self.at = at if self.at is None else max(self.at, at)

    def read(self, now: float) -> tuple[float, float, float] | None:
        """(how far the recent work's log ratio sits from the long-run one, the recent pieces'
        weight as of ``now``, seconds since the latest ended); None before any work."""
        if self.at is None:
            return None
        fast = self.fast[0] / self.fast[1]
        slow = self.slow[0] / self.slow[1]
        age = max(0.0, now - self.at)
        return fast - slow, self.fast[1] * math.exp(-age / self.tau_s), age
