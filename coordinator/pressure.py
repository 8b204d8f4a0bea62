"""Overload margin: under sustained overload, admit against a TPOT objective a little tighter.

Admission fills a decode node up to the step its streams' TPOT objective allows. At light load
that is free: the batch swings, and most streams have slack. Under overload every newcomer joins a
batch held at that edge, and each of its streams rides the predicted step within a few percent of
its objective, so the prediction's scatter (p90 ~20 % here) and any slow spell of the host push
many of them over together. The thirty-ninth sitting's chat runs at 2 x colocated vLLM's goodput
(1:1, objectives 557 ms / 19 ms, 4 req/s): of the ~134 requests a probe served, 3-49 went over
TPOT; in one run admitting against 90 % of the objective (``--admission-headroom 0.1``) left 0-2,
and served 2.15-2.33 in-SLO req/s against 1.58-2.03 (the same code served 2.26-2.50 in another).
But a fixed headroom refuses requests at moderate load that would have met their objective (the
sixth sitting, with a far rougher TPOT prediction: 82 -> 78 % attainment at 2 req/s, 71 -> 66 % at 3).

So the margin follows the pressure: it is ``margin`` times the share of the recent decisions that
were refusals waiting could help (load, not an objective no idle node meets). When demand far
exceeds what admission lets in, a refused request's place is taken by the next arrival, and the
margin buys the served ones their objective; when nearly everything is admitted, there is next to
no margin. The share is refusals over decisions, each counted with a weight that decays with a
time constant of ``decay_s`` (about the last 10 s of decisions), over one more decision than were
made: so a quiet spell, whose weights have decayed away, is no overload either. Only refusals that
the margin did not cause count (one refused only by it would feed it), and none that no idle node
would avoid (they say nothing of the load).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# Off by default: measured side by side at 2 and 4 req/s (thirty-ninth sitting, ``margin39``; an
# earlier form, a 20-decision moving average that also decayed between decisions), 0.25 held the
# margin at 5-12 % under overload and its TPOT p50 half a millisecond lower, but served as many
# in-SLO (2.13 and 2.42 req/s against 2.50 and 2.26) and one or two points less at 2 req/s (98 and
# 96 % against 99 and 99 %): the served streams' TPOT misses came in bursts of a slow spell (18 of
# one probe's with the margin, 23 of one without) that a margin of a tenth does not cover. The
# flag, and ``bench compare``'s tandem-margin, are there to measure it again.
DEFAULT_MARGIN = 0.0
DECAY_S = 10.0


class Pressure:
    """The recent share of load refusals, and the TPOT margin it asks for."""

    def __init__(self, margin: float, decay_s: float = DECAY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (0.0 <= margin < 1.0):
            raise ValueError(f"--admission-overload-margin must be in [0, 1), got {margin}")
        self.scale = margin
        self.decay_s = decay_s
        self.clock = clock
        self._refused = 0.0  # decayed counts, as of ``_at``
        self._decided = 0.0
        self._at = clock()

    def _decay(self) -> None:
        now = self.clock()
        f = math.exp(-max(0.0, now - self._at) / self.decay_s)
        self._refused *= f
        self._decided *= f
        self._at = now

    def share(self) -> float:
        """The recent share of decisions that were load refusals (over one decision more than made)."""
        self._decay()
        return self._refused / (self._decided + 1.0)

    def note(self, refused: bool) -> None:
        """One admission decision: a refusal for load (True), or an admission."""
        self._decay()
        self._refused += 1.0 if refused else 0.0
        self._decided += 1.0

    def margin(self) -> float:
        """The share of the TPOT objective to keep free now."""
        return self.scale * self.share()
