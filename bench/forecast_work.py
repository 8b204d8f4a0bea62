"""The TPOT error and the decode nodes' other work (``python -m tandem.bench.forecast`` prints it):
their own prefills (P:D 0:N, conditional disaggregation) and their KV fetches, as shares of each
request's decode life, and how far the best fits of TPOT get with and without them."""

from __future__ import annotations

import os
import re
import statistics

from tandem.bench.forecast import Req, _forecasts, p50_p90, read
from tandem.logs import log_time

LOCAL_SPAN = re.compile(r"^(\S+ \S+) .*after \d+ tokens \(ttft [\d.]+ s, tpot [\d.]+ ms, e2e ([\d.]+) s, "
                        r"prefill (\S+) \(local\), .*dispatch ([\d.]+) s, prefill call ([\d.]+) s")
RECENT_S = 5.0


def _lstsq_errors(cols: list[list[float]], y: list[float]) -> dict[str, float]:
    """p50 and p90 of |fit - y| / y for y fitted in-sample as a line in ``cols`` (and a constant)."""
    import numpy as np

    x = np.column_stack([np.ones(len(y)), *[np.asarray(c, dtype=float) for c in cols]])
    yy = np.asarray(y, dtype=float)
    coef = np.linalg.lstsq(x, yy, rcond=None)[0]
    return p50_p90(list(np.abs(x @ coef - yy) / yy))


FETCHED = re.compile(r"^(\S+ \S+) .*request \S+: fetched \d+ blocks \((\d+) bytes\) in ([\d.]+) s")


def overlap_s(spans: list[tuple[float, float, float]], a: float, b: float,
              admitted_before: float | None = None) -> float:
    """Seconds of [a, b] that ``spans`` ((admitted, start, end) each) cover, counting only those
    admitted before ``admitted_before`` when given (overlapping spans count each)."""
    return sum(max(0.0, min(b, hi) - max(a, lo)) for adm, lo, hi in spans
               if admitted_before is None or adm < admitted_before)


def _spans(path: str, node_logs: list[str]) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """What else each decode node did beside decoding, as (admitted, start, end) spans: its local
    prefill calls (from the coordinator's finished lines: arrival + dispatch, for the call's time;
    admitted: the request's arrival) and its KV fetches (from its own log, decode-N.log: each
    fetch's line ends it; admitted: its start)."""
    out: dict[str, dict[str, list[tuple[float, float, float]]]] = {"prefill": {}, "fetch": {}}
    for line in open(path, encoding="utf-8", errors="replace"):
        if "(local)" in line and (m := LOCAL_SPAN.search(line)):
            end = log_time(m.group(1))
            arrived = end - float(m.group(2))
            start = arrived + float(m.group(4))
            out["prefill"].setdefault(m.group(3), []).append((arrived, start, start + float(m.group(5))))
    for log in node_logs:
        node = os.path.basename(log).rsplit(".", 1)[0]
        for line in open(log, encoding="utf-8", errors="replace"):
            if ": fetched " in line and (m := FETCHED.search(line)):
                end = log_time(m.group(1))
                out["fetch"].setdefault(node, []).append((end - float(m.group(3)), end - float(m.group(3)), end))
    return out


def tpot_by_node_work(path: str, node_logs: list[str] | None = None) -> dict[str, dict[str, float]]:
    """How much of the TPOT error is the decode node's other work: its own prefills (P:D 0:N,
    conditional disaggregation), whose chunks ride in its streams' steps, and its KV fetches
    (disaggregated requests' KV coming in on the node's core). For each request, the share of its
    decode life during which its node was in a local prefill call, and the share it was fetching
    KV (given the decode nodes' logs), all of it and the part admission could know (prefills
    admitted, fetches started, before the request was). Fitted in-sample as TPOT = a + b·batch
    (+ c·share ...), the batch the oracle's (its life's true mean) or admission's ``forward``
    forecast, and scored as ``analyse`` does: how far the best prediction from each set of inputs
    gets."""
    spans = _spans(path, node_logs or [])
    reqs = read(path)
    kinds = [k for k in ("prefill", "fetch") if spans[k]]
    if not kinds or len(reqs) < 10:
        return {}

    def share(kind: str, node: str, a: float, b: float, admitted_before: float | None = None) -> float:
        return overlap_s(spans[kind].get(node, []), a, b, admitted_before) / (b - a) if b > a else 0.0

    rows: list[tuple[Req, float, float]] = []
    for node in sorted({r.node for r in reqs}):
        mine = [r for r in reqs if r.node == node]
        f = _forecasts(mine)
        rows += list(zip(mine, f["oracle"], f["forward"]))
    y = [r.tpot for r, _, _ in rows]
    oracle, forward = [o for _, o, _ in rows], [w for _, _, w in rows]
    words = {"prefill": "local prefills'", "fetch": "KV fetches'"}
    life = {k: [share(k, r.node, r.start, r.end) for r, _, _ in rows] for k in kinds}
    known = {k: [share(k, r.node, r.start, r.end, admitted_before=r.admitted) for r, _, _ in rows] for k in kinds}
    recent = {k: [share(k, r.node, r.admitted - RECENT_S, r.admitted) for r, _, _ in rows] for k in kinds}
    every = " and ".join(words[k] for k in kinds)
    out: dict[str, dict[str, float]] = {"batch (oracle)": _lstsq_errors([oracle], y)}
    if len(kinds) > 1:
        for k in kinds:
            out[f"batch and {words[k]} share of its life (oracle)"] = _lstsq_errors([oracle, life[k]], y)
    out.update({
        f"batch and {every} share of its life (oracle)": _lstsq_errors([oracle, *life.values()], y),
        "batch (forward)": _lstsq_errors([forward], y),
        f"batch (forward) and the share in the {RECENT_S:g} s before admission":
            _lstsq_errors([forward, *recent.values()], y),
        "batch (forward) and the share known at admission": _lstsq_errors([forward, *known.values()], y),
    })
    for k in kinds:
        out[f"shares: {k}"] = {"life_mean": statistics.mean(life[k]), "known_mean": statistics.mean(known[k]),
                               "requests": len(rows)}
    return out
