"""Serving metrics from per-request timings: TTFT, TPOT, ITL, E2E, SLO attainment, goodput.

Definitions (BENCHMARKS.md):
  TTFT  request sent -> first token received
  TPOT  (last token time - first token time) / (output tokens - 1)
  ITL   gaps between consecutive token arrivals
  SLO attainment  share of requests meeting both the TTFT and the TPOT SLO
  goodput at a rate (vLLM's --goodput): requests per second that met every SLO
Failed requests count as missing every SLO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    """One request as the client saw it; times in seconds from the run's start."""

    sent: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of every token, first included
    output_tokens: int = 0
    prompt_tokens: int = 0
    ok: bool = True
    error: str = ""
    rejected: bool = False  # refused by admission (HTTP 429 / RESOURCE_EXHAUSTED): a miss, not a failure
    hopeless: bool = False  # refused without Retry-After: not even an idle node meets its SLO
    predicted_ttft: float | None = None  # Tandem's admission prediction, when the server says
    predicted_tpot: float | None = None
    local_prefill: bool | None = None  # Tandem: prefilled on its decode node
    colocated: bool | None = None  # Tandem: served whole on a prefill node (--colocate)
    prefill_node: str = ""  # Tandem: the nodes the predictions were for
    decode_node: str = ""
    server: dict[str, float] = field(default_factory=dict)  # Tandem over gRPC: the coordinator's own timings
    slo_ttft: float | None = None  # its own TTFT objective, where it had one apart from the run's

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def e2e(self) -> float | None:
        return None if not self.token_times else self.token_times[-1] - self.sent

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or not self.token_times or self.first_token is None:
            return None
        return (self.token_times[-1] - self.first_token) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    def meets(self, slo_ttft: float | None, slo_tpot: float | None) -> bool:
        """Both objectives met (the TTFT objective: its own, where it had one)."""
        return not self.missed(slo_ttft, slo_tpot)

    def missed(self, slo_ttft: float | None, slo_tpot: float | None) -> str:
        """Why it missed, the first reason that applies: "refused" (by admission), "failed", "ttft",
        "tpot"; "" when it met both objectives (the TTFT objective: its own, where it had one)."""
        if self.rejected:
            return "refused"
        if not self.ok or self.ttft is None:
            return "failed"
        slo_ttft = self.slo_ttft if self.slo_ttft is not None else slo_ttft
        if slo_ttft is not None and self.ttft > slo_ttft:
            return "ttft"
        tpot = self.tpot
        return "tpot" if slo_tpot is not None and tpot is not None and tpot > slo_tpot else ""


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _by_slo(reqs: list[RequestTiming]) -> dict[float, list[RequestTiming]]:
    out: dict[float, list[RequestTiming]] = {}
    for r in reqs:
        if r.slo_ttft is not None:
            out.setdefault(r.slo_ttft, []).append(r)
    return dict(sorted(out.items()))


def _dist(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values) if values else math.nan,
            "p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99)}


def _error(pairs: list[tuple[float | None, float | None]]) -> dict[str, float]:
    """|actual - predicted| / actual over the requests that have both; ``bias``: the median of
    (predicted - actual) / actual (below 0: predictions too low)."""
    signed = [(p - a) / a for a, p in pairs if a is not None and p is not None and a > 0]
    errs = [abs(x) for x in signed]
    return {"n": len(errs), "p50": percentile(errs, 50), "p90": percentile(errs, 90),
            "bias": percentile(signed, 50)}


def error_by_node(reqs: list[RequestTiming]) -> dict[str, dict[str, dict[str, float]]]:
    """Prediction error per node: TTFT by the node that prefilled, TPOT by the decode node."""
    out: dict[str, dict[str, dict[str, float]]] = {"ttft": {}, "tpot": {}}
    for metric, node_of, pair in (("ttft", lambda r: r.prefill_node, lambda r: (r.ttft, r.predicted_ttft)),
                                  ("tpot", lambda r: r.decode_node, lambda r: (r.tpot, r.predicted_tpot))):
        by: dict[str, list[tuple[float | None, float | None]]] = {}
        for r in reqs:
            if r.ok and node_of(r):
                by.setdefault(node_of(r), []).append(pair(r))
        out[metric] = {node: e for node, pairs in sorted(by.items()) if (e := _error(pairs))["n"]}
    return out


def ttft_breakdown(reqs: list[RequestTiming]) -> dict[str, dict[str, float]]:
    """Where each TTFT went (Tandem over gRPC), per part: the coordinator before its prefill call
    (quota, admission, a batch request's wait, routing), the call's own overhead (gRPC, the node's
    servicer, engine queueing beyond the prefill itself), the prefill as the node timed it (a
    local prefill: as the coordinator did, so no overhead part), the relay from the call's answer
    to the token leaving the coordinator, and the client side (network, the client's own loop,
    and the coordinator's validation and tokenizing, which come before its clock starts)."""
    parts: dict[str, list[float]] = {k: [] for k in ("dispatch", "call_overhead", "prefill", "relay", "client")}
    for r in reqs:
        sv = r.server
        if not r.ok or r.ttft is None or "ttft_s" not in sv:
            continue
        parts["dispatch"].append(sv["dispatch_s"])
        parts["call_overhead"].append(max(0.0, sv["prefill_call_s"] - sv["prefill_s"]))
        parts["prefill"].append(sv["prefill_s"])
        parts["relay"].append(max(0.0, sv["ttft_s"] - sv["dispatch_s"] - sv["prefill_call_s"]))
        parts["client"].append(max(0.0, r.ttft - sv["ttft_s"]))
    return {k: _dist(v) for k, v in parts.items() if v}


def arriving(reqs: list[RequestTiming]) -> list[RequestTiming]:
    """The requests that finished before the last of ``reqs`` (the served ones) was sent: requests
    kept arriving over their whole decode, as in a cluster's steady state. A probe's arrivals stop
    at its end, which no forecast of the arrival rate made at admission sees: the batches of the requests still
    decoding then shrink, and their TPOT comes in under what was predicted for them (on the
    thirty-fifth sitting's 2 req/s chat probes, a probe's last admissions were predicted 23-32 %
    over what they took, median)."""
    last = max((r.sent for r in reqs), default=0.0)
    return [r for r in reqs if r.token_times and r.token_times[-1] <= last]


def summarize(reqs: list[RequestTiming], duration_s: float, slo_ttft: float | None,
              slo_tpot: float | None) -> dict[str, object]:
    """The run's summary; ``duration_s`` is from the first send to the last completion. A request
    refused by admission counts as missing its SLO (and as rejected, not failed)."""
    ok = [r for r in reqs if r.ok]
    met = [r for r in reqs if r.meets(slo_ttft, slo_tpot)]
    out_tokens = sum(r.output_tokens for r in ok)
    local = [r.local_prefill for r in ok if r.local_prefill is not None]
    colocated = [r.colocated for r in ok if r.colocated is not None]
    return {
        "requests": len(reqs),
        "completed": len(ok),
        "rejected": sum(r.rejected for r in reqs),
        "rejected_hopeless": sum(r.hopeless for r in reqs),
        "failed": len(reqs) - len(ok) - sum(r.rejected for r in reqs),
        "local_prefill_share": sum(local) / len(local) if local else math.nan,
        "colocated_share": sum(colocated) / len(colocated) if colocated else math.nan,
        "prediction_error": {"ttft": _error([(r.ttft, r.predicted_ttft) for r in ok]),
                             "tpot": _error([(r.tpot, r.predicted_tpot) for r in ok]),
                             "tpot_arriving": _error([(r.tpot, r.predicted_tpot) for r in arriving(ok)])},
        "prediction_error_by_node": error_by_node(reqs),
        "ttft_breakdown": ttft_breakdown(reqs),
        "duration_s": duration_s,
        "throughput_rps": len(ok) / duration_s if duration_s > 0 else math.nan,
        "output_tokens_per_s": out_tokens / duration_s if duration_s > 0 else math.nan,
        "ttft_s": _dist([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _dist([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": _dist([x for r in ok for x in r.itls]),
        "e2e_s": _dist([r.e2e for r in ok if r.e2e is not None]),
        "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot},
        "slo_attainment": len(met) / len(reqs) if reqs else math.nan,
        # the requests that missed, by why (RequestTiming.missed): refused, failed, late first token, slow
        "missed": {why: sum(r.missed(slo_ttft, slo_tpot) == why for r in reqs)
                   for why in ("refused", "failed", "ttft", "tpot")},
        # With SLO tiers: attainment per TTFT objective (ms).
        "attainment_by_ttft_slo": {f"{t * 1000:.0f}": sum(r.meets(slo_ttft, slo_tpot) for r in rs) / len(rs)
                                   for t, rs in _by_slo(reqs).items()},
        # vLLM's --goodput: requests per second that met every SLO, at this run's rate
        "goodput_at_rate_rps": len(met) / duration_s if duration_s > 0 else math.nan,
    }
