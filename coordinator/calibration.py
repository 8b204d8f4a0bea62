"""How a node's predictions of one kind turn out: learned online from its finished requests.

Admission predicts from the node's fitted model (tandem/perfmodel.py) and its load now; what the
request then sees also depends on what arrives after it, which no prediction made now knows. So
the raw predictions scatter far wider than what happens: on the fifteenth sitting's logs, 0:1
requests predicted a TPOT of 81-94 ms took 50 ms on average (p90 60 ms), the same as those
predicted 31-45 ms, and admission refused them against an 87 ms objective that colocated vLLM met
at that rate. The correlation of raw TPOT prediction and outcome was 0.17 there (0.40 at 1:1).

A ``Calibration`` maps a raw prediction to what requests given that raw prediction took: a
least-squares line ``actual = a + b * raw`` over the recent finished requests (exponentially
weighted, ``RATE`` a request), with its slope kept within [``MIN_SLOPE``, ``MAX_SLOPE``]: the raw
prediction does carry the node's state, and the floor keeps admission answering a sudden load
before the finished requests show it. Until ``MIN_SAMPLES`` requests have finished, or while the
raw predictions hardly vary (a line through one point is no line), it is a factor: the moving
average of log(actual / raw), as before. Once a line, it stays one until their spread falls to
half of what made it one (``MIN_SPREAD``): a spread hovering at the bound does not flip each
prediction between the two. Either way each outcome is clipped to within
``MAX_RATIO`` of its raw prediction, and so is each calibrated prediction.

A line is used only while it has been predicting the finished requests better than the factor:
each finish scores both on it (their relative error, averaged at the same ``rate``) before it is
learned. On the twenty-sixth sitting's 0:2 multi-turn logs the line made local prefills' TTFT
worse than no calibration at all (p90 46-62 % against 35-40 %): a positive intercept, learned from
the few requests that waited long for KV room or behind a queue, tripled the short prefills'
predictions (to ``MAX_RATIO``). The factor gave 31-40 %; the choice by score 32-42 % on the same
logs, and on TPOT no worse than the better of the two on each log (p90 56-57 % against the line's
56-62 % and the factor's 57-64 %).

Replayed on those logs (bench/forecast.py's method, each request predicted from those finished
before it arrived): TPOT error p90 79 -> 41 % at 0:1, 46 -> 31 % at 1:1, 51 -> 41 % multi-turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Weight of each finished request (a moving average over ~1/w requests). 0.1 made the factor noise:
# each request's error is mostly the arrivals after it was admitted (fourteenth sitting).
RATE = 0.02
# Each outcome counts as at most this many times its raw prediction (and at least its inverse), and
# so does each calibrated prediction: one stalled request moves the line as little as it moved the
# factor, and a line cannot make a prediction more than 3x or less than a third of the model's own.
MAX_RATIO = 3.0
MIN_SAMPLES = 30  # finished requests before the line is used
MIN_SPREAD = 0.1  # the raw predictions' standard deviation, as a share of their mean, for a line
# The slope's floor per kind: TPOT's raw predictions were found nearly uninformative (0.25 keeps a
# sudden load counting); a TTFT is mostly a queue, which its raw prediction does see (slopes of
# 0.61-1.14 on the fifteenth and sixteenth sittings' logs).
MIN_SLOPE = {"tpot": 0.25}
MIN_SLOPE_OTHER = 0.5
MAX_SLOPE = 1.5


@dataclass
class Calibration:
    rate: float = RATE
    lines: bool = True  # False: a factor only (for comparison: bench/forecast.py)
    min_slope: float = MIN_SLOPE_OTHER
    samples: int = 0
    log_bias: float = 0.0
    # Exponentially weighted sums: of the weights, raw, actual, raw², raw·actual.
    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0
    lined: bool = False  # a line now (hysteresis between factor and line: see the module's doc)
    # Relative error of each form's prediction of the finished requests, averaged at ``rate``
    # (the line's counted once one can be fitted, whether in use or not).
    line_err: float = 0.0
    factor_err: float = 0.0

    def learn(self, raw_s: float, actual_s: float) -> None:
        """One finished request: what the model alone predicted for it (no calibration: one read
        when it was admitted, many finishes ago on a busy node, would make this a lagging
        feedback loop that swings) against what it took."""
        if not (raw_s > 0 and actual_s > 0 and math.isfinite(raw_s) and math.isfinite(actual_s)):
            return
        actual_s = min(raw_s * MAX_RATIO, max(raw_s / MAX_RATIO, actual_s))
        by_factor = raw_s * math.exp(self.log_bias)
        fit = self._fit()
        by_line = min(raw_s * MAX_RATIO, max(raw_s / MAX_RATIO, fit[0] + fit[1] * raw_s)) if fit else by_factor
        self.factor_err += self.rate * (abs(by_factor - actual_s) / actual_s - self.factor_err)
        self.line_err += self.rate * (abs(by_line - actual_s) / actual_s - self.line_err)
        self.samples += 1
        self.log_bias += self.rate * (math.log(actual_s / raw_s) - self.log_bias)
        keep = 1.0 - self.rate
        self.w = self.w * keep + 1.0
        self.x = self.x * keep + raw_s
        self.y = self.y * keep + actual_s
        self.xx = self.xx * keep + raw_s * raw_s
        self.xy = self.xy * keep + raw_s * actual_s
        if self.lines and self.samples >= MIN_SAMPLES:
            mx = self.x / self.w
            spread = (MIN_SPREAD / 2 if self.lined else MIN_SPREAD) * mx
            self.lined = mx > 0 and self.xx / self.w - mx * mx > spread * spread

    def line(self) -> tuple[float, float] | None:
        """(a, b) of actual = a + b * raw, or None while it is a factor."""
        if not (self.lined and self.line_err < self.factor_err):
            return None
        return self._fit()

    def _fit(self) -> tuple[float, float] | None:
        """The line through the finished requests, used or not (None: too few, or no spread)."""
        if not self.lines or self.samples < MIN_SAMPLES:
            return None
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var <= 0:
            return None
        b = min(MAX_SLOPE, max(self.min_slope, (self.xy / self.w - mx * my) / var))
        return my - b * mx, b

    def __call__(self, raw_s: float) -> float:
        """The prediction for a raw one: within a third and 3x of it."""
        fit = self.line()
        if fit is None:
            return raw_s * math.exp(self.log_bias)
        a, b = fit
        return min(raw_s * MAX_RATIO, max(raw_s / MAX_RATIO, a + b * raw_s))

    @classmethod
    def of(cls, kind: str) -> Calibration:
        return cls(min_slope=MIN_SLOPE.get(kind, MIN_SLOPE_OTHER))
