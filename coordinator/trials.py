"""Admission trials: a close miss served on idle nodes, so that a model reading a node slow learns otherwise.

A node's model learns only from the requests it serves, so one that predicts a node slower than it is
would refuse for good: every request refused, no node serves one, no fit or calibration moves. A
request predicted to miss only its own objectives, each by at most ``TRIAL_MARGIN``, on nodes with
nothing running, is admitted as a *trial*, at most one each ``--admission-trial-s``: it was a miss
either way (refused), on idle nodes it takes nothing from another request, and its outcome is a
sample of the nodes as they are now. (Who asks: admission.py, once the chosen nodes miss.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from .estimates import Estimate
from .nodeclient import NodeClient

# The thirty-eighth sitting's first bench run: the decode node's startup profile, taken while the VM
# ran ~30 % slower (the profile took 22.9 s, 16.1 s when taken again 14 minutes later), predicted
# 13-14 ms steps against a 9 ms objective, and admission refused all 236 requests of its four probes
# (10 minutes) with the nodes idle.
TRIAL_MARGIN = 1.5
DEFAULT_TRIAL_S = 10.0


def idle(node: NodeClient) -> bool:
    """Nothing of this coordinator's on it, and nothing queued or running in its last load report."""
    if node.outstanding:
        return False
    load = node.fresh_load()
    return load is None or not (load.prefill_queue or load.decode_batch or load.decode_waiting)


class Trials:
    """At most one trial each ``interval_s`` seconds; 0: none, a close miss is refused like any other."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not (interval_s >= 0 and math.isfinite(interval_s)):
            raise ValueError(f"--admission-trial-s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self.clock = clock
        self._last = -math.inf

    def take(self, nodes: Sequence[NodeClient | None], misses: list[tuple[str, Estimate, float]]) -> bool:
        """Whether a request every node is predicted to miss goes ahead as a trial on ``nodes`` (the
        prefill and decode node it would start on): each miss its own TTFT or TPOT by at most
        ``TRIAL_MARGIN``, those nodes idle, the last trial at least ``interval_s`` ago."""
        if self.interval_s <= 0 or self.clock() - self._last < self.interval_s:
            return False
        for what, e, limit in misses:
            if what not in ("TTFT", "TPOT") or e.seconds is None or e.seconds > limit * TRIAL_MARGIN:
                return False
        chosen = [n for n in nodes if n is not None]
        if not chosen or not all(idle(n) for n in chosen):
            return False
        self._last = self.clock()
        return True
