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
  rate (counted by admission's rule, ``Arrivals``: over the time since they began where that is
  shorter; here at each request's first token, where admission counts at its arrival), each
  staying the recent mean decode time.
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
replayed with each node's calibration as none, a factor, and as shipped (``replay_ttft``); these in forecast_ttft.py.

    python -m tandem.bench.forecast bench/results/compare/tandem-1p1d/coordinator.log
"""

from __future__ import annotations

import argparse
import bisect
import glob
import os
import re
import statistics
import sys
from dataclasses import dataclass

from tandem.bench.metrics import percentile
from tandem.coordinator.calibration import MIN_SLOPE, Calibration
from tandem.logs import log_time

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
        end = log_time(m.group(1))
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
    from tandem.coordinator.nodeclient import Arrivals  # (grpc and the protos only when analysing)

    batch = Batch(reqs)
    arrivals = Arrivals(RATE_WINDOW_S)
    forecasts: dict[str, list[float]] = {"now": [], "half": [], "forward": [],
                                         "oracle": [batch.mean(r.start, r.end) for r in reqs]}
    for r in reqs:
        others = [q for q in reqs if q.start <= r.start < q.end and q is not r]
        life = r.end - r.start
        forecasts["now"].append(len(others) + 1)
        recent = batch.mean(r.start - MEAN_WINDOW_S, r.start)
        forecasts["half"].append((len(others) + recent) / 2 + 1)
        staying = sum(min(q.end - r.start, life) for q in others) / life
        rate = arrivals.rate(r.start)[0]
        arrivals.add(r.tokens, r.start)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log", help="a coordinator log (its per-request lines)")
    ap.add_argument("--factor-rates", default="0.1,0.05,0.02,0.01,0",
                    help="replay each node's TPOT calibration learned at these weights a request (0: the "
                         "line over all the log so far, the factor left at 1; logs that give the factors only)")
    ap.add_argument("--slo-tpot-ms", type=float, default=0.0,
                    help="the run's TPOT objective: with it, the streams prefill nodes served whole (--colocate) "
                         "over and within it, and the prefill calls beside them (forecast_whole.py)")
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
    from tandem.bench.forecast_ttft import (replay_ttft, ttft_local_by_batch, ttft_local_by_credit,
                                            ttft_local_by_later, ttft_local_room, ttft_parts)
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
    if args.slo_tpot_ms > 0:
        from tandem.bench.forecast_whole import whole_streams

        for name, e in whole_streams(args.log, args.slo_tpot_ms / 1000).items():
            print(f"streams served whole on a prefill node, {name} the TPOT objective ({e['streams']:.0f}): TPOT "
                  f"p50 {e['tpot_ms_p50']:.1f} ms (predicted {e['predicted_tpot_ms_p50']:.1f}); prefill calls "
                  f"on that node during their decode, median {e['stall_known_s_p50']:.2f} s admitted before them "
                  f"and {e['stall_later_s_p50']:.2f} s after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
