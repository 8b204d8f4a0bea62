"""How well can TTFT and TPOT be predicted when a request is admitted? An analysis of a coordinator log.

TPOT. A request's TPOT is the mean step of the decode batch over its life, and that batch holds
the requests that arrive after it was admitted. This reads each finished request from a
coordinator's log (its per-request line: decode start = finish - e2e + TTFT, finish, tokens,
measured and predicted TPOT), rebuilds the decode batch over time, and fits one line
TPOT = a + b·batch in-sample (the fit is the same for every forecast, so the rows differ only in
the batch each assumes). It then scores batch forecasts of growing knowledge:

- ``now``: the streams decoding when the request starts, and the request.
- ``half``: half that and half the last 10 s average (admission's forecast until the
  fourteenth sitting).
- ``forward``: the streams there now for as much of the request's life as each really stays
  (what admission now forecasts from their tokens to come), plus arrivals at the last 20 s
  rate, each staying the recent mean decode time.
- ``oracle``: the batch's true average over the request's life (unknowable at admission).

``admission`` is what the coordinator predicted (and, where the log gives it, the same without
the factor each node learned from finished requests). If ``oracle`` is close and ``forward`` is not,
the error is the arrivals after admission, which no prediction made at admission can know. How
large that part must be: the least error of any prediction made at admission, with the arrivals
drawn as a Poisson process at the node's rate (forecast_bound.py).

How much of the TPOT error is the decode nodes' other work: their own prefills (0:N, conditional
disaggregation) and, with their logs beside the coordinator's, their KV fetches: the share of each
request's life its node spent in each, and the best fits with and without them (forecast_work.py).

TTFT (logs that give its parts): the error of admission's TTFT, of its wait before the prefill
call went out against the wait measured, and of the rest (the prefill call) had the wait been
known: which of the two parts the error is in. Local prefills' TTFT error also apart by whether
admission predicted a wait for room in the decode node's KV cache, and for those over 1 s; by the
batch at admission; by the local prefills admitted to the same node while theirs ran; and, with
the decode nodes' logs beside the coordinator's (decode-*.log, as `tandem bench compare` leaves
them), by whether the prefix admission credited the node with is what its engine had. And the TTFT error
replayed with each node's calibration as none, a factor, and as shipped (``replay_ttft``).

    python -m tandem.bench.forecast bench/results/compare/tandem-1p1d/coordinator.log
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import glob
import os
import re
import statistics
import sys
from dataclasses import dataclass

from tandem.bench.metrics import percentile
from tandem.coordinator.calibration import MAX_RATIO, MIN_SLOPE, Calibration

LINE = re.compile(r"^(\S+ \S+) .*after (\d+) tokens \(ttft ([\d.]+) s, tpot ([\d.]+) ms, e2e ([\d.]+) s, "
                  r".*decode (\S+), migrations (\d+).*predicted ttft [\d.]+ s, tpot ([\d.]+) ms"
                  r"(?:, learned factors x[\d.]+, x([\d.]+))?")
RATE_WINDOW_S = 20.0
MEAN_WINDOW_S = 10.0


@dataclass
class Req:
    start: float  # its first token (it joins the decode batch)
    end: float
    tokens: int
    tpot: float
    predicted: float
    node: str  # its decode node
    factor: float = 0.0  # the learned factor in ``predicted`` (0: the log does not say)
    admitted: float = 0.0  # when it arrived (its prediction was made then)


def read(path: str) -> list[Req]:
    out = []
    for line in open(path, encoding="utf-8", errors="replace"):
        m = LINE.search(line)
        if not m:
            continue
        end = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        tokens, ttft, e2e = int(m.group(2)), float(m.group(3)), float(m.group(5))
        tpot, predicted = float(m.group(4)) / 1000, float(m.group(8)) / 1000
        # A TPOT of one or two gaps says little; a migrated request's prediction was for another node.
        if tokens >= 3 and tpot > 0 and predicted > 0 and e2e > ttft and m.group(7) == "0":
            out.append(Req(end - e2e + ttft, end, tokens, tpot, predicted, m.group(6), float(m.group(9) or 0),
                           end - e2e))
    return sorted(out, key=lambda r: r.start)


class Batch:
    """The number of requests decoding over time, from their (start, end) spans."""

    def __init__(self, reqs: list[Req]) -> None:
        events = sorted([(r.start, 1) for r in reqs] + [(r.end, -1) for r in reqs])
        self.times, self.counts, n = [], [], 0
        for t, d in events:
            n += d
            self.times.append(t)
            self.counts.append(n)

    def mean(self, a: float, b: float) -> float:
        """Its time average over [a, b]."""
        if b <= a:
            return self.at(a)
        i = bisect.bisect_right(self.times, a)
        area, t, n = 0.0, a, self.counts[i - 1] if i else 0
        while i < len(self.times) and self.times[i] < b:
            area += n * (self.times[i] - t)
            t, n = self.times[i], self.counts[i]
            i += 1
        return (area + n * (b - t)) / (b - a)

    def at(self, t: float) -> int:
        i = bisect.bisect_right(self.times, t)
        return self.counts[i - 1] if i else 0


def p50_p90(err: list[float]) -> dict[str, float]:
    return {"p50": percentile(err, 50), "p90": percentile(err, 90)}


def analyse(all_reqs: list[Req]) -> dict[str, dict[str, float]]:
    """Each decode node's batch apart; the forecasts' errors over all requests."""
    reqs: list[Req] = []
    forecasts: dict[str, list[float]] = {"now": [], "half": [], "forward": [], "oracle": []}
    for node in sorted({r.node for r in all_reqs}):
        mine = [r for r in all_reqs if r.node == node]
        for name, xs in _forecasts(mine).items():
            forecasts[name] += xs
        reqs += mine
    n = len(reqs)
    oracle = forecasts["oracle"]
    mx, my = sum(oracle) / n, sum(r.tpot for r in reqs) / n
    var = sum((x - mx) ** 2 for x in oracle)
    slope = sum((x - mx) * (r.tpot - my) for x, r in zip(oracle, reqs)) / var if var else 0.0
    const = my - slope * mx
    out = {}
    for name, xs in forecasts.items():
        err = [abs(const + slope * x - r.tpot) / r.tpot for x, r in zip(xs, reqs)]
        out[name] = p50_p90(err)
    err = [abs(r.predicted - r.tpot) / r.tpot for r in reqs]
    out["admission"] = p50_p90(err)
    if all(r.factor > 0 for r in reqs):  # and without the factor it learned from finished requests
        err = [abs(r.predicted / r.factor - r.tpot) / r.tpot for r in reqs]
        out["admission, no factor"] = p50_p90(err)
    out["fit"] = {"const_s": const, "per_stream_s": slope, "requests": n}
    return out


def _forecasts(reqs: list[Req]) -> dict[str, list[float]]:
    """The batch each forecast expects over each request's life, on one decode node."""
    batch = Batch(reqs)
    starts = [r.start for r in reqs]
    forecasts: dict[str, list[float]] = {"now": [], "half": [], "forward": [],
                                         "oracle": [batch.mean(r.start, r.end) for r in reqs]}
    for r in reqs:
        others = [q for q in reqs if q.start <= r.start < q.end and q is not r]
        life = r.end - r.start
        forecasts["now"].append(len(others) + 1)
        recent = batch.mean(r.start - MEAN_WINDOW_S, r.start)
        forecasts["half"].append((len(others) + recent) / 2 + 1)
        staying = sum(min(q.end - r.start, life) for q in others) / life
        rate = (bisect.bisect_left(starts, r.start) - bisect.bisect_left(starts, r.start - RATE_WINDOW_S)) / RATE_WINDOW_S
        done = [q.end - q.start for q in reqs if r.start - 120 < q.end <= r.start]
        stay = statistics.mean(done) if done else life
        # arrivals at ``rate``, each staying ``stay``: the mean over the life of rate · min(t, stay)
        arriving = rate * (stay - stay * stay / (2 * life) if life > stay else life / 2)
        forecasts["forward"].append(staying + arriving + 1)
    return forecasts


def replay_factor(reqs: list[Req], rate: float, lines: bool = True) -> dict[str, float]:
    """TPOT error had each node's calibration been learned at ``rate`` a request (coordinator/
    calibration.py; ``lines=False``: a factor only, as before the sixteenth sitting): the model's
    own predictions (the logged ones less their learned factor), each put through the calibration
    learned from the requests finished before it arrived."""
    events = sorted([(r.admitted, 0, i) for i, r in enumerate(reqs)] + [(r.end, 1, i) for i, r in enumerate(reqs)])
    cal: dict[str, Calibration] = {}
    predicted: dict[int, float] = {}
    err = []
    for _, finished, i in events:
        r = reqs[i]
        model = r.predicted / r.factor
        c = cal.setdefault(r.node, Calibration(rate=rate, lines=lines, min_slope=MIN_SLOPE["tpot"]))
        if not finished:
            predicted[i] = c(model)
            continue
        c.learn(model, r.tpot)
        err.append(abs(predicted[i] - r.tpot) / r.tpot)
    return p50_p90(err)


TTFT_LINE = re.compile(r"ttft ([\d.]+) s, .*prefill \S+( \(local\))?, .*dispatch ([\d.]+) s, prefill call ([\d.]+) s; "
                       r"predicted ttft ([\d.]+) s, .*of the ttft waiting ([\d.]+) s\)")


def ttft_parts(path: str) -> dict[str, dict[str, float]]:
    """Admission's TTFT error, and where it lies: in the wait before the prefill call went out
    (predicted against measured, relative to the TTFT), or in the rest (the prediction with the
    measured wait put in place of the predicted one). Requests prefilled on a decode node apart,
    and only their whole error: their predicted wait is the decode node's own queue, which
    passes after the call went out (as does a prefill node's, when admission had nothing of its
    own queued there to place the request among)."""
    out: dict[str, dict[str, float]] = {}
    rows: dict[str, list[tuple[float, float, float, float]]] = {"prefill node": [], "decode node (local)": []}
    for line in open(path, encoding="utf-8", errors="replace"):
        m = TTFT_LINE.search(line)
        if m and float(m.group(1)) > 0 and float(m.group(5)) > 0:
            rows["decode node (local)" if m.group(2) else "prefill node"].append(
                (float(m.group(1)), float(m.group(3)), float(m.group(5)), float(m.group(6))))
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


REPLAY_TTFT_LINE = re.compile(r"^(\S+ \S+) .*\(ttft ([\d.]+) s, .*e2e ([\d.]+) s, prefill (\S+)( \(local\))?, .*"
                              r"predicted ttft ([\d.]+) s, .*learned factors x([\d.]+),")


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
    for line in open(path, encoding="utf-8", errors="replace"):
        m = REPLAY_TTFT_LINE.search(line)
        if not m or float(m.group(2)) <= 0 or float(m.group(6)) <= 0:
            continue
        end = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        rows["decode node (local)" if m.group(5) else "prefill node"].append(
            (end - float(m.group(3)), end, float(m.group(2)), m.group(4), float(m.group(6)) / float(m.group(7))))
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
                at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log", help="a coordinator log (its per-request lines)")
    ap.add_argument("--factor-rates", default="0.1,0.05,0.02,0.01,0",
                    help="replay each node's TPOT calibration learned at these weights a request (0: the "
                         "line over all the log so far, the factor left at 1; logs that give the factors only)")
    args = ap.parse_args(argv)
    reqs = read(args.log)
    if len(reqs) < 10:
        print(f"{args.log}: {len(reqs)} finished requests with a prediction; too few", file=sys.stderr)
        return 1
    res = analyse(reqs)
    fit = res.pop("fit")
    print(f"{fit['requests']} requests; TPOT = {fit['const_s'] * 1000:.1f} ms + "
          f"{fit['per_stream_s'] * 1000:.2f} ms a stream (fitted on the true batch over each life)")
    print("TPOT error with the batch forecast from:")
    for name, e in res.items():
        print(f"  {name:21s} p50 {e['p50']:6.1%}  p90 {e['p90']:6.1%}")
    from tandem.bench.forecast_bound import arrivals_bound

    bound = arrivals_bound(reqs, fit["const_s"], fit["per_stream_s"])
    if bound:
        d, m = bound["drawn"], bound["measured"]
        print(f"the least TPOT error of any prediction at admission, the arrivals after it drawn (Poisson at "
              f"each node's rate, {bound['arrivals_per_life']['mean']:.1f} a life on average; the streams' stays "
              f"known; forecast_bound.py): p50 {d['p50']:.1%} p90 {d['p90']:.1%} against the draws; against the "
              f"measured TPOT p50 {m['p50']:.1%} p90 {m['p90']:.1%}")
    if all(r.factor > 0 for r in reqs) and args.factor_rates:
        print("admission's TPOT error with its calibration learned at (weight a request): a line, or a factor")
        for rate in (float(x) for x in args.factor_rates.split(",")):
            e, f = replay_factor(reqs, rate), replay_factor(reqs, rate, lines=False)
            print(f"  {rate:<21g} line p50 {e['p50']:6.1%}  p90 {e['p90']:6.1%}   "
                  f"factor p50 {f['p50']:6.1%}  p90 {f['p90']:6.1%}")
    node_logs = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(args.log)), "decode-*.log")))
    from tandem.bench.forecast_work import tpot_by_node_work

    work = tpot_by_node_work(args.log, node_logs)
    if work:
        what = {"prefill": "in a local prefill", "fetch": "fetching KV"}
        for key in [k for k in work if k.startswith("shares: ")]:
            sh, kind = work.pop(key), key.split(": ")[1]
            print(f"TPOT and the decode nodes' other work: {what[kind]} for {sh['life_mean']:.1%} of a request's decode "
                  f"life on average ({sh['known_mean']:.1%} from work admitted before it)")
        print("TPOT fitted on")
        for name, e in work.items():
            print(f"  {name:62s} p50 {e['p50']:6.1%}  p90 {e['p90']:6.1%}")
    for where, e in ttft_parts(args.log).items():
        split = (f"; of it the wait p50 {e['wait_p50']:.1%} p90 {e['wait_p90']:.1%}; the rest, with the wait "
                 f"known, p50 {e['rest_p50']:.1%} p90 {e['rest_p90']:.1%}" if "wait_p50" in e else "")
        print(f"TTFT, prefilled on a {where} ({e['requests']:.0f} requests, {e['waited_share']:.0%} waited over 20 ms "
              f"before their call): error p50 {e['p50']:.1%} p90 {e['p90']:.1%}{split}")
    for where, e in replay_ttft(args.log).items():
        print(f"TTFT on a {where} replayed ({e['requests']:.0f} requests) with each node's calibration: none "
              f"p50 {e['model_p50']:.1%} p90 {e['model_p90']:.1%}; a factor p50 {e['factor_p50']:.1%} p90 "
              f"{e['factor_p90']:.1%}; a line whenever there is one p50 {e['line_p50']:.1%} p90 "
              f"{e['line_p90']:.1%}; as shipped p50 {e['calibration_p50']:.1%} p90 {e['calibration_p90']:.1%}")
    for name, e in ttft_local_room(args.log).items():
        print(f"TTFT of local prefills, {name} ({e['requests']:.0f} requests): error p50 {e['p50']:.1%} "
              f"p90 {e['p90']:.1%}, median signed {e['signed_p50']:+.1%}")
    for name, e in ttft_local_by_batch(args.log).items():
        print(f"TTFT of local prefills with none queued and no room wait, decode {name} "
              f"({e['requests']:.0f} requests): error p50 {e['p50']:.1%} p90 {e['p90']:.1%}, median excess "
              f"{e['excess_ms_p50']:+.0f} ms against a median step of {e['step_ms_p50']:.0f} ms")
    for name, e in ttft_local_by_credit(args.log, node_logs).items():
        print(f"TTFT of local prefills credited with a prefix {name} ({e['requests']:.0f} requests): error "
              f"p50 {e['p50']:.1%} p90 {e['p90']:.1%}, median signed {e['signed_p50']:+.1%}")
    for name, e in ttft_local_by_later(args.log).items():
        print(f"TTFT of local prefills with none queued, {name} on its node ({e['requests']:.0f} requests): "
              f"error p50 {e['p50']:.1%} p90 {e['p90']:.1%}; actual / predicted p10 {e['ratio_p10']:.2f} "
              f"p50 {e['ratio_p50']:.2f} p90 {e['ratio_p90']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
