"""What a simulated run gave (``tandem.sim.simulate``): each request's ``Outcome``, and the
attainment and percentiles ``tandem plan`` reports from them, computed as the bench computes
its measurements' so the two compare."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Outcome:
    arrival_s: float
    ttft_s: float = math.nan
    tpot_s: float = 0.0  # 0 for a one-token output
    e2e_s: float = math.nan
    prefill_node: int = -1
    decode_node: int = -1
    completed: bool = False
    never_fits: bool = False  # larger than a decode node's whole KV cache
    refused: bool = False  # admission predicted it would miss an objective
    decode_wait_s: float = 0.0  # its KV arrived at the decode node -> it joined the running batch
    local: bool = False  # prefilled on the node that decodes it (conditional disaggregation, colocation)
    colocated: bool = False  # served whole on prefill node ``prefill_node`` (colocation)


def attainment(outcomes: Sequence[Outcome], slo_ttft_s: float, slo_tpot_s: float) -> float:
    """The share of requests that completed within both objectives."""
    if not outcomes:
        return 0.0
    ok = sum(1 for o in outcomes if o.completed and o.ttft_s <= slo_ttft_s and o.tpot_s <= slo_tpot_s)
    return ok / len(outcomes)


def summary(outcomes: Sequence[Outcome], slo_ttft_s: float, slo_tpot_s: float) -> dict[str, Any]:
    done = [o for o in outcomes if o.completed]

    from tandem.bench.metrics import percentile  # the measurements' own, so the two compare

    def pct(vals: list[float], q: float) -> float:
        return percentile(vals, q * 100) if vals else math.nan

    ttft = [o.ttft_s for o in done]
    tpot = [o.tpot_s for o in done if o.tpot_s > 0]
    return {"requests": len(outcomes), "completed": len(done), "refused": sum(1 for o in outcomes if o.refused),
            "local_prefill_share": (sum(1 for o in done if o.local and not o.colocated) / len(done) if done
                                    else math.nan),
            "colocated_share": sum(1 for o in done if o.colocated) / len(done) if done else math.nan,
            "attainment": attainment(outcomes, slo_ttft_s, slo_tpot_s),
            # the requests that missed, by why, as bench/metrics.py counts a run's ("failed": could never
            # fit a decode node's KV cache)
            "missed": {"refused": sum(1 for o in outcomes if o.refused),
                       "failed": sum(1 for o in outcomes if not o.refused and not o.completed),
                       "ttft": sum(1 for o in done if o.ttft_s > slo_ttft_s),
                       "tpot": sum(1 for o in done if o.ttft_s <= slo_ttft_s and o.tpot_s > slo_tpot_s)},
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p90_s": pct(ttft, 0.9),
            "tpot_p50_s": pct(tpot, 0.5), "tpot_p90_s": pct(tpot, 0.9)}


def mean_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several draws' ``summary`` of one trace (node speeds drawn anew) as one: each figure's mean,
    the misses' counts too (one draw: its own)."""
    if len(summaries) == 1:
        return summaries[0]

    def mean(vals: list[Any]) -> Any:
        if isinstance(vals[0], dict):
            return {k: mean([v[k] for v in vals]) for k in vals[0]}
        return sum(vals) / len(vals)

    return {k: mean([s[k] for s in summaries]) for k in summaries[0]}
