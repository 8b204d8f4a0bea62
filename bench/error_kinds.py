"""Admission's prediction error by where a request's prompt was computed, pooled over coordinator
logs and compared between systems (variants) in a table and a PNG.

A request's finish line in a coordinator log gives its TTFT and TPOT, what admission predicted,
and where it ran (forecast_whole.read): a prefill call (prefill node, then a decode node), a
prompt a prefill node served whole (--colocate: admitted so, and prefilled and decoded there), or
a decode node's local prefill. The bench report's per-node errors mix the first two on a prefill node; this
tells them apart. Of the prefill calls, those admission predicted no wait for ("nothing queued":
no prompt ahead of them, no batch queue) are also shown alone: their error is the prefill's own,
the floor under the rest. Error: |predicted - actual| / actual, the coordinator's own TTFT
(received to first token) and TPOT.

``--floor`` asks how much of those calls' error a recalibration fitted in hindsight removes: for
the calls with nothing queued (their predictions as logged), the one scale factor that, chosen on
those very calls, gives them the lowest p90, and that p90; and the same for a line (a + b ×
predicted, the calibration's form). Both are scored on what they were chosen on, so they are
optimistic. What stays is each prefill's scatter around the model, which a constant
factor or line cannot remove; a reading of the node's speed changing over time (the pace) could
remove a part of it.

``--pace-gain G --pace-hold-s S`` replays each TTFT prediction on a prefill node (a prefill call,
or a prompt served whole) as if admission had taken the node's pace (coordinator/nodeclient.py)
with that gain and fading, from the reading its finish line logs, whether or not the run took it
(``--pace off`` logs it too); ``--pace-grid`` prints the p90s over a grid of both, to choose them.
A decode node's local prefills are never paced (``PACE_ROLES``) and replay as logged. A batch
request's wait in the batch queue is scaled with the rest (the log does not tell it apart).

    python -m tandem.bench.error_kinds --png docs/perf/steps46-error.png \\
        own=bench/results/steps46/tandem-1p1d/coordinator.log,bench/results/burst46/tandem-1p1d/coordinator.log \\
        shared=bench/results/steps46/tandem-1p1d-sharedsteps/coordinator.log,...
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tandem.bench.forecast_whole import read
from tandem.bench.metrics import percentile

KINDS = [("ttft", "call", "TTFT, prefill calls"), ("ttft", "lone", "TTFT, prefill calls\nnothing queued"),
         ("ttft", "whole", "TTFT, served whole\n(prefill node)"),
         ("ttft", "local", "TTFT, local prefills\n(decode node)"), ("tpot", "decode", "TPOT, decode nodes"),
         ("tpot", "whole", "TPOT, served whole\n(prefill node)")]


def repaced(predicted_s: float, pace: tuple[float, bool, float, float] | None,
             gain: float | None, hold_s: float) -> float:
    """A TTFT prediction as admission would have made it taking the logged pace with ``gain`` and
    ``hold_s`` (nodeclient.py's PACE_GAIN and PACE_HOLD_S; 0: none): ``predicted_s`` as logged
    with ``gain`` None, or without a reading."""
    if gain is None or pace is None:
        return predicted_s
    factor, applied, deviation, age = pace
    unpaced = predicted_s / factor if applied else predicted_s
    return unpaced * math.exp(gain * deviation * math.exp(-age / hold_s)) if math.isfinite(age) else unpaced


def errors(paths: list[str], gain: float | None = None, hold_s: float = 4.0) -> dict[tuple[str, str], list[float]]:
    """(metric, kind) -> the relative errors of the finished requests in ``paths`` (their TTFT
    predictions replayed with the pace at ``gain``: ``repaced``)."""
    out: dict[tuple[str, str], list[float]] = {(m, k): [] for m, k, _ in KINDS}
    for path in paths:
        finished, whole = read(path)
        for f in finished:
            kind = "call" if not f.local else "whole" if f.rid in whole else "local"
            if f.ttft_s > 0:
                predicted = repaced(f.predicted_ttft_s, f.pace, gain if kind != "local" else None, hold_s)
                out[("ttft", kind)].append(abs(predicted - f.ttft_s) / f.ttft_s)
                if _nothing_queued(f):
                    out[("ttft", "lone")].append(out[("ttft", kind)][-1])
            if f.tpot_s > 0:
                out[("tpot", "whole" if kind == "whole" else "decode")].append(
                    abs(f.predicted_tpot_s - f.tpot_s) / f.tpot_s)
    return out


def _nothing_queued(f) -> bool:  # type: ignore[no-untyped-def]
    """A prefill call admission predicted no wait for (the "nothing queued" kind)."""
    return not f.local and f.predicted_wait_s == 0 and f.ttft_s > 0


def lone_calls(paths: list[str]) -> list[tuple[float, float]]:
    """(predicted as logged, actual) TTFT of the prefill calls admission predicted no wait for."""
    out = []
    for path in paths:
        finished, _ = read(path)
        out += [(f.predicted_ttft_s, f.ttft_s) for f in finished if _nothing_queued(f)]
    return out


def best_scale(pairs: list[tuple[float, float]], lo: float = 0.5, hi: float = 2.0,
               steps: int = 601) -> tuple[float, float]:
    """The factor k (``lo`` to ``hi`` on a log grid) whose scaled predictions k * predicted have the
    lowest p90 of |k * predicted - actual| / actual over ``pairs``, and that p90."""
    best = (math.inf, 1.0)
    for i in range(steps):
        k = lo * (hi / lo) ** (i / (steps - 1))
        best = min(best, (percentile([abs(k * p - a) / a for p, a in pairs], 90), k))
    return best[1], best[0]


def best_line(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """The line (a, b) whose a + b * predicted has the lowest p90 of |a + b * predicted - actual| /
    actual over ``pairs`` (the calibration's form), searched on a grid and then a finer one around
    the best; returns (a, b, that p90)."""
    import numpy as np

    p, y = np.array(pairs, dtype=float).T
    scale = float(np.median(y))
    a_lo, a_hi, b_lo, b_hi = -0.5 * scale, 0.5 * scale, math.log(0.5), math.log(2.0)
    best = (math.inf, 0.0, 1.0)
    for _ in range(2):
        a = np.linspace(a_lo, a_hi, 81)[:, None, None]
        b = np.exp(np.linspace(b_lo, b_hi, 81))[None, :, None]
        p90 = np.percentile(np.abs(a + b * p - y) / y, 90, axis=2)
        i, j = np.unravel_index(int(np.argmin(p90)), p90.shape)
        if p90[i, j] < best[0]:
            best = (float(p90[i, j]), float(a[i, 0, 0]), float(b[0, j, 0]))
        da, db = (a_hi - a_lo) / 40, (b_hi - b_lo) / 40  # then +-2 steps around it, 40 times finer
        a_lo, a_hi = best[1] - 2 * da, best[1] + 2 * da
        b_lo, b_hi = math.log(best[2]) - 2 * db, math.log(best[2]) + 2 * db
    return best[1], best[2], best[0]


def engine_errors(paths: list[str]) -> tuple[list[float], list[float]]:
    """The prefill calls' own engine time (first step to first token) in the prefill nodes' logs
    beside each coordinator log (prefill-*.log, those with uncached tokens), each node's under a
    quadratic in uncached tokens fitted in hindsight on that node's calls, and the same with the
    pace carried (bench/prefill_scatter.py's ``hindsight_errors``): pooled errors of each."""
    from tandem.bench.prefill_scatter import hindsight_errors, node_prefills

    quad: list[float] = []
    paced: list[float] = []
    for path in paths:
        for node_log in sorted(Path(path).parent.glob("prefill-*.log")):
            samples = sorted((s for s in node_prefills(node_log).values() if s[0] > 0), key=lambda s: s[2])
            if len(samples) >= 8:
                q, p = hindsight_errors(samples)
                quad += q
                paced += p
    return quad, paced


def floor(logs: dict[str, list[str]]) -> str:
    """Each system's calls with nothing queued: their p90 as predicted (as logged), at the best scale
    factor chosen in hindsight (``best_scale``), and at the best line in hindsight
    (``best_line``); and every prefill call's own engine time against a quadratic in its tokens
    fitted in hindsight, alone and with the pace carried (``engine_errors``)."""
    rows = ["| system | calls with nothing queued | TTFT error p90 as predicted | best factor in hindsight | "
            "its p90 | best line in hindsight, its p90 | prefill calls' engine time: quadratic in hindsight, "
            "p90 | with the pace carried |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, paths in logs.items():
        quad, paced = engine_errors(paths)
        engine = (f"{percentile(quad, 90) * 100:.1f} % (n {len(quad)}) | {percentile(paced, 90) * 100:.1f} %"
                  if quad else "– | –")
        pairs = lone_calls(paths)
        if len(pairs) < 3:
            rows.append(f"| {name} | {len(pairs)} | – | – | – | – | {engine} |")
            continue
        k, p90 = best_scale(pairs)
        as_is = percentile([abs(p - a) / a for p, a in pairs], 90)
        rows.append(f"| {name} | {len(pairs)} | {as_is * 100:.1f} % | x{k:.3f} | {p90 * 100:.1f} % | "
                    f"{best_line(pairs)[2] * 100:.1f} % | {engine} |")
    return "\n".join(rows)


def grid(logs: dict[str, list[str]], gains: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
         holds: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)) -> str:
    """Each system's TTFT error p90 by kind, its predictions replayed at each pace gain and hold."""
    ttft = [(m, k, label) for m, k, label in KINDS if m == "ttft"]
    rows = ["| system | gain | hold s | " + " | ".join(label.replace(chr(10), " ") for _, _, label in ttft) + " |",
            "|---|---:|---:|" + "---:|" * len(ttft)]
    for name, paths in logs.items():
        for gain in gains:
            for hold in holds if gain else holds[:1]:
                errs = errors(paths, gain, hold)
                cells = [f"{percentile(errs[(m, k)], 90) * 100:.1f} %" if errs[(m, k)] else "–" for m, k, _ in ttft]
                rows.append(f"| {name} | {gain:.1f} | {hold:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def table(systems: dict[str, dict[tuple[str, str], list[float]]]) -> str:
    rows = ["| kind | " + " | ".join(f"{name}: n, p50 / p90" for name in systems) + " |",
            "|---|" + "---:|" * len(systems)]
    for m, k, label in KINDS:
        cells = []
        for errs in systems.values():
            e = errs[(m, k)]
            cells.append(f"{len(e)}, {percentile(e, 50) * 100:.0f} / {percentile(e, 90) * 100:.0f} %" if e else "–")
        rows.append(f"| {label.replace(chr(10), ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(systems: dict[str, dict[tuple[str, str], list[float]]], path: str, title: str, goal: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    w = 0.8 / len(systems)
    for j, (name, errs) in enumerate(systems.items()):
        vals = [percentile(errs[(m, k)], 90) * 100 if errs[(m, k)] else 0.0 for m, k, _ in KINDS]
        xs = [i + (j - (len(systems) - 1) / 2) * w for i in range(len(KINDS))]
        for x, v, (m, k, _) in zip(xs, vals, KINDS):
            ax.text(x, v + 0.5, f"{v:.0f}%\n(n={len(errs[(m, k)])})", ha="center", fontsize=7)
        ax.bar(xs, vals, w, label=name)
    ax.axhline(goal, color="grey", ls="--", lw=1, label=f"goal: {goal:.0f} %")
    ax.set_xticks(range(len(KINDS)))
    ax.set_xticklabels([label for _, _, label in KINDS], fontsize=8)
    ax.set_ylabel("prediction error p90 (%)")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.set_ylim(0, max(ax.get_ylim()[1] * 1.3, 2 * goal))
    ax.legend(fontsize=8, loc="upper center", ncol=len(systems) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.error_kinds", description=__doc__.split("\n\n")[0])
    ap.add_argument("systems", nargs="+", metavar="NAME=LOG[,LOG...]",
                    help="a system's name and its coordinator logs, pooled")
    ap.add_argument("--png", default="", help="draw the p90s here")
    ap.add_argument("--title", default="Admission's prediction error p90 by where the prompt ran")
    ap.add_argument("--goal", type=float, default=20.0, help="the goal line, percent (issue 8: 20)")
    ap.add_argument("--pace-gain", type=float, default=None,
                    help="replay the TTFT predictions taking the logged pace with this gain (0: none)")
    ap.add_argument("--pace-hold-s", type=float, default=4.0, help="... fading over this many seconds")
    ap.add_argument("--pace-grid", action="store_true", help="print the TTFT p90s over gains and hold times")
    ap.add_argument("--floor", action="store_true",
                    help="print, for the prefill calls with nothing queued, the p90 at the best scale factor "
                         "and with a line fitted in hindsight: the error no constant recalibration removes; and "
                         "(from the prefill nodes' logs beside each coordinator log) every prefill call's engine "
                         "time against a quadratic in its tokens fitted in hindsight, and with the pace carried")
    args = ap.parse_args(argv)
    if args.pace_hold_s <= 0:
        ap.error("--pace-hold-s must be positive")
    logs: dict[str, list[str]] = {}
    for spec in args.systems:
        name, sep, paths = spec.partition("=")
        if not sep or not paths:
            ap.error(f"expected NAME=LOG[,LOG...], got {spec!r}")
        logs[name] = paths.split(",")
    systems = {name: errors(paths, args.pace_gain, args.pace_hold_s) for name, paths in logs.items()}
    print(table(systems))
    if args.pace_grid:
        print(grid(logs))
    if args.floor:
        print(floor(logs))
    if args.png:
        plot(systems, args.png, args.title, args.goal)
        print(f"wrote {args.png}", file=sys.stderr)


if __name__ == "__main__":
    main()
