"""Admission's TTFT error in a coordinator log, taken apart (``python -m tandem.bench.forecast LOG``
prints these beside the TPOT forecasts of forecast.py): the wait before the prefill call against
the rest, each node's calibration replayed in each form, and local prefills' error by a KV room
wait predicted, by the batch at admission, by the prefix credited against the engine's, and by the
local prefills admitted after them."""

from __future__ import annotations

import bisect
import re

from tandem.bench.forecast import p50_p90
from tandem.bench.forecast_whole import read
from tandem.bench.metrics import percentile
from tandem.coordinator.calibration import MAX_RATIO, Calibration
from tandem.logs import log_time


def ttft_parts(path: str) -> dict[str, dict[str, float]]:
    """Admission's TTFT error, and where it lies: in the wait before the prefill call went out
    (predicted against measured, relative to the TTFT), or in the rest (the prediction with the
    measured wait put in place of the predicted one). Requests prefilled on a decode node apart,
    and only their whole error: their predicted wait is the decode node's own queue, which
    passes after the call went out (as does a prefill node's, when admission had nothing of its
    own queued there to place the request among)."""
    out: dict[str, dict[str, float]] = {}
    rows: dict[str, list[tuple[float, float, float, float]]] = {"prefill node": [], "decode node (local)": []}
    for f in read(path)[0]:
        if f.ttft_s > 0 and f.predicted_ttft_s > 0 and f.dispatch_s is not None and f.predicted_wait_s is not None:
            rows["decode node (local)" if f.local else "prefill node"].append(
                (f.ttft_s, f.dispatch_s, f.predicted_ttft_s, f.predicted_wait_s))
    for where, rs in rows.items():
        if len(rs) < 5:
            continue
        whole = [abs(pred - ttft) / ttft for ttft, _, pred, _ in rs]
        wait = [abs(waiting - dispatch) / ttft for ttft, dispatch, _, waiting in rs]
        rest = [abs(pred - waiting + dispatch - ttft) / ttft for ttft, dispatch, pred, waiting in rs]
        out[where] = {"requests": len(rs), **p50_p90(whole),
                      "waited_share": sum(1 for _, d, _, _ in rs if d > 0.02) / len(rs)}
        if where == "prefill node":
            out[where].update({f"{part}_{k}": v for part, err in (("wait", wait), ("rest", rest))
                               for k, v in p50_p90(err).items()})
    return out


def _always_line(c: Calibration, raw_s: float) -> float:
    """``c``'s prediction had it used its line whenever it had one (before the twenty-seventh
    sitting), whatever the line scored."""
    fit = c._fit() if c.lined else None
    if fit is None:
        return c(raw_s)
    return min(raw_s * MAX_RATIO, max(raw_s / MAX_RATIO, fit[0] + fit[1] * raw_s))


def replay_ttft(path: str) -> dict[str, dict[str, float]]:
    """Admission's TTFT error had each node's TTFT calibration been each form (coordinator/
    calibration.py), per kind (prefilled on a prefill node, on a decode node): the model's own
    prediction (the logged one over its learned factor; batch requests' waits in the batch queue
    are left in) put through the calibration learned from the requests of its node finished
    before it arrived; ``model``: none, ``factor``: a factor only, ``line``: a line whenever there
    is one (as until the twenty-seventh sitting), ``calibration``: as shipped (a line while it
    scores better)."""
    rows: dict[str, list[tuple[float, float, float, str, float]]] = {"prefill node": [], "decode node (local)": []}
    for f in read(path)[0]:
        if f.ttft_s > 0 and f.predicted_ttft_s > 0 and f.ttft_factor:
            rows["decode node (local)" if f.local else "prefill node"].append(
                (f.start, f.start + f.e2e_s, f.ttft_s, f.prefill, f.predicted_ttft_s / f.ttft_factor))
    out: dict[str, dict[str, float]] = {}
    kinds = {"prefill node": "ttft", "decode node (local)": "ttft_local"}
    for where, rs in rows.items():
        if len(rs) < 5:
            continue
        events = sorted([(r[0], 0, i) for i, r in enumerate(rs)] + [(r[1], 1, i) for i, r in enumerate(rs)])
        for form in ("model", "factor", "line", "calibration"):
            cal: dict[str, Calibration] = {}
            predicted: dict[int, float] = {}
            err = []
            for _, finished, i in events:
                _, _, ttft, node, model = rs[i]
                c = cal.setdefault(node, Calibration.of(kinds[where]))
                c.lines = form in ("line", "calibration")
                if not finished:
                    predicted[i] = model if form == "model" else _always_line(c, model) if form == "line" else c(model)
                    continue
                c.learn(model, ttft)
                err.append(abs(predicted[i] - ttft) / ttft)
            out.setdefault(where, {"requests": len(rs)}).update({f"{form}_{k}": v for k, v in p50_p90(err).items()})
    return out


ADMITTED_LOCAL = re.compile(r"request (\S+): admitted, prefills on decode node ([^;]*)")
FINISHED_LOCAL = re.compile(r"request (\S+): \w+ after \d+ tokens \(ttft ([\d.]+) s, .*\(local\), .*"
                            r"predicted ttft ([\d.]+) s")


def ttft_local_room(path: str, slow_s: float = 1.0) -> dict[str, dict[str, float]]:
    """Admission's TTFT error on local prefills, apart by whether it predicted a wait for room in
    the decode node's KV cache (its admission line's "for KV room"), and on those whose TTFT was
    over ``slow_s`` (the ones near an objective): p50, p90 and the median signed error
    (predicted - actual) / actual (below 0: predicted too low)."""
    room: dict[str, bool] = {}
    rows: list[tuple[bool, float, float]] = []
    for line in open(path, encoding="utf-8", errors="replace"):
        if ": admitted, prefills on decode node" in line:
            m = ADMITTED_LOCAL.search(line)
            if m:  # (its TTFT's part: up to the TPOT's, after the ";")
                room[m.group(1)] = "for KV room" in m.group(2)
        elif "(local)" in line and (m := FINISHED_LOCAL.search(line)) and m.group(1) in room:
            ttft, pred = float(m.group(2)), float(m.group(3))
            if ttft > 0 and pred > 0:
                rows.append((room[m.group(1)], ttft, pred))
    out: dict[str, dict[str, float]] = {}
    for name, rs in (("KV room wait predicted", [r for r in rows if r[0]]),
                     ("no KV room wait predicted", [r for r in rows if not r[0]]),
                     (f"TTFT over {slow_s:g} s", [r for r in rows if r[1] > slow_s])):
        if rs:
            out[name] = {"requests": len(rs), **p50_p90([abs(p - t) / t for _, t, p in rs]),
                         "signed_p50": percentile([(p - t) / t for _, t, p in rs], 50)}
    return out


LOCAL_PARTS = re.compile(r"request (\S+): admitted, prefills on decode node [^:]*: \S+ \(prefill here\): queue (\d+) "
                         r"prompts [^;]*? beside a batch of (\d+) [^;]*; .*? step ([\d.]+) ms")
BATCH_BUCKETS = ((0, 0), (1, 4), (5, 8), (9, 12), (13, 16), (17, 10**9))


def ttft_local_by_batch(path: str) -> dict[str, dict[str, float]]:
    """Admission's TTFT error on the plainer local prefills (nothing queued ahead on the decode
    node, no wait for KV room predicted; a prefix held there or not: a multi-turn prompt almost
    always has one), apart by the batch the decode node was running at admission: p50 and p90 of
    the error, and the median of what the TTFT took beyond the prediction (actual - predicted,
    ms) against the median step admission predicted for the request's TPOT there (its life's
    batch with it added, before the learned factor: near the node's step, not its step now). A new request
    enters the engine between two steps, so it waits out the step in progress; an excess growing
    with the batch, near half its step, would be that wait left out. (On the twenty-first
    sitting's 0:2 multi-turn run it was not: the excess stayed at -3 to -5 ms from batch 1 to 12,
    the nodes' local-prefill fits, learned at load, holding that wait already.)"""
    seen: dict[str, tuple[int, float]] = {}
    rows: list[tuple[int, float, float, float]] = []
    for line in open(path, encoding="utf-8", errors="replace"):
        if ": admitted, prefills on decode node" in line:
            m = LOCAL_PARTS.search(line)
            if m and m.group(2) == "0" and "for KV room" not in line.split(";")[0]:
                seen[m.group(1)] = (int(m.group(3)), float(m.group(4)) / 1000)
        elif "(local)" in line and (m := FINISHED_LOCAL.search(line)) and m.group(1) in seen:
            ttft, pred = float(m.group(2)), float(m.group(3))
            if ttft > 0 and pred > 0:
                rows.append((*seen[m.group(1)], ttft, pred))
    out: dict[str, dict[str, float]] = {}
    for lo, hi in BATCH_BUCKETS:
        rs = [r for r in rows if lo <= r[0] <= hi]
        if rs:
            name = f"batch {lo}" if lo == hi else f"batch {lo}+" if hi >= 10**9 else f"batch {lo}-{hi}"
            out[name] = {"requests": len(rs), **p50_p90([abs(p - t) / t for _, _, t, p in rs]),
                         "excess_ms_p50": percentile([(t - p) * 1000 for _, _, t, p in rs], 50),
                         "step_ms_p50": percentile([step * 1000 for _, step, _, _ in rs], 50)}
    return out


ADMITTED_LOCAL_AT = re.compile(r"^(\S+ \S+) .*request (\S+): admitted, prefills on decode node ([^:]+): \S+ "
                               r"\(prefill here\): queue (\d+) prompts")
LATER_BUCKETS = ((0, 0), (1, 1), (2, 10**9))


def ttft_local_by_later(path: str) -> dict[str, dict[str, float]]:
    """Admission's TTFT error on local prefills with none queued ahead at admission, apart by how
    many local prefills were admitted to the same decode node while theirs ran (from its
    admission to its first token): what no prediction made at admission knows. vLLM gives a
    prefill under way its step's token budget first and the newcomer the rest, so a newcomer does
    not take its place but lengthens the steps it shares. p50 and p90 of the error, and the
    actual / predicted TTFT at p10, p50 and p90 (the spread with none admitted after it is what
    the engine and the machine add by themselves). The window is the admission line's time plus
    the TTFT, which counts from arrival: it runs past the first token by the wait before
    admission (a few ms here), and an admission logged in the same millisecond as this one's is
    not counted in it."""
    admitted: dict[str, tuple[float, str, int]] = {}
    finished: dict[str, tuple[float, float]] = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        if ": admitted, prefills on decode node" in line:
            m = ADMITTED_LOCAL_AT.search(line)
            if m:
                at = log_time(m.group(1))
                admitted[m.group(2)] = (at, m.group(3), int(m.group(4)))
        elif "(local)" in line and (m := FINISHED_LOCAL.search(line)):
            finished[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    starts: dict[str, list[float]] = {}
    for at, node, _ in admitted.values():
        starts.setdefault(node, []).append(at)
    for times in starts.values():
        times.sort()
    rows: list[tuple[int, float, float]] = []
    for rid, (ttft, pred) in finished.items():
        if rid not in admitted or ttft <= 0 or pred <= 0:
            continue
        at, node, queued = admitted[rid]
        if queued:
            continue
        times = starts[node]
        later = bisect.bisect_left(times, at + ttft) - bisect.bisect_right(times, at)
        rows.append((later, ttft, pred))
    out: dict[str, dict[str, float]] = {}
    for lo, hi in LATER_BUCKETS:
        rs = [r for r in rows if lo <= r[0] <= hi]
        if rs:
            ratio = [t / p for _, t, p in rs]
            name = f"{lo} admitted after it" if lo == hi else f"{lo} or more admitted after it"
            out[name] = {"requests": len(rs), **p50_p90([abs(p - t) / t for _, t, p in rs]),
                         "ratio_p10": percentile(ratio, 10), "ratio_p50": percentile(ratio, 50),
                         "ratio_p90": percentile(ratio, 90)}
    return out


PREFILLED_HERE = re.compile(r"request (\S+)-d0: prefilled \d+ tokens here \((\d+) cached\)")
HELD_THERE = re.compile(r", (\d+) tokens held there")


def ttft_local_by_credit(path: str, node_logs: list[str]) -> dict[str, dict[str, float]]:
    """Admission's TTFT error on local prefills, apart by whether the prefix it credited the
    decode node with (its admission line's "N tokens held there", from the coordinator's index of
    what each node holds) is what the node's engine then had (the node's "prefilled N tokens here
    (M cached)" line, its first leg's; ``node_logs``: the decode nodes' logs). A wrong index would
    show here: a prefix gone since (credited more), or one the index did not know (credited less)."""
    credited: dict[str, int] = {}
    finished: dict[str, tuple[float, float]] = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        if ": admitted, prefills on decode node" in line and (m := ADMITTED_LOCAL.search(line)):
            held = HELD_THERE.search(m.group(2).split(";")[0])
            credited[m.group(1)] = int(held.group(1)) if held else 0
        elif "(local)" in line and (m := FINISHED_LOCAL.search(line)):
            finished[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    cached: dict[str, int] = {}
    for node_log in node_logs:
        for line in open(node_log, encoding="utf-8", errors="replace"):
            if "tokens here (" in line and (m := PREFILLED_HERE.search(line)):
                cached[m.group(1)] = int(m.group(2))
    groups: dict[str, list[tuple[float, float]]] = {}
    for rid, (ttft, pred) in finished.items():
        if rid in credited and rid in cached and ttft > 0 and pred > 0:
            gap = credited[rid] - cached[rid]
            name = "as the engine had" if gap == 0 else "more than the engine had" if gap > 0 else \
                "less than the engine had"
            groups.setdefault(name, []).append((ttft, pred))
    return {name: {"requests": len(rs), **p50_p90([abs(p - t) / t for t, p in rs]),
                   "signed_p50": percentile([(p - t) / t for t, p in rs], 50)} for name, rs in groups.items()}
