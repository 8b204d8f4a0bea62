"""`tandem bench shift`: a workload that shifts halfway, served with and without live role switching.

Four simulated nodes (`--simulate`, times from PROFILE: the real daemons, coordinator
and protocol; no engines) start 3:1, the best split for the first phase. Phase A
sends `code` requests (prompts ~800 tokens, outputs ~30: prefill-bound), phase B
`chat` requests (prompts ~300, outputs ~250: decode-bound), both at ``--rate``; by
the simulator, phase B wants 1:3. The same seeded trace runs twice, each on a fresh
cluster: *static* keeps 3:1 throughout; *live* runs `tandem plan --live --apply
--admission on` beside it (its own process, watching the coordinator's /metrics;
the coordinator runs its default admission, which the planner models), which
switches nodes with `tandem role` when the measured mix moves.

Per run and phase: SLO attainment (refused requests count as missed), goodput as
the requests per second that met both objectives, TTFT and TPOT p90, and for the
live run the switches (when asked, when done) and the planner's prediction checks.
Results: results.json, report.md and shift.png under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Prefill: 10 ms + 0.4 ms per prompt token. Decode step: 10 ms + 2 ms per running request + 2 us
# per context token. KV transfer 2 ms. On 4 nodes the simulator puts `code` best at 3:1 and
# `chat` at 1:3.
PROFILE = {"prefill": [0.01, 4e-4, 0.0], "decode": [0.01, 2e-3, 2e-6], "transfer": [0.002, 0.0]}
START = (3, 1)
MAX_MODEL_LEN = 1024


def trace(rate: float, phase_a_s: float, phase_b_s: float, seed: int, vocab: int) -> list[Any]:
    from .workloads import generate

    a = generate("code", rate=rate, duration_s=phase_a_s, seed=seed, max_model_len=MAX_MODEL_LEN, vocab_size=vocab)
    b = generate("chat", rate=rate, duration_s=phase_b_s, seed=seed, max_model_len=MAX_MODEL_LEN, vocab_size=vocab)
    for e in b:
        e.arrival_s += phase_a_s
    return a + b


def phase_stats(reqs: list[Any], t0: float, t1: float, slo: tuple[float, float]) -> dict[str, Any]:
    from .metrics import percentile

    mine = [r for r in reqs if t0 <= r.sent < t1]
    met = [r for r in mine if r.ok and r.meets(*slo)]
    ttft = [r.ttft for r in mine if r.ok and r.ttft is not None]
    tpot = [r.tpot for r in mine if r.ok and r.tpot is not None]
    return {"requests": len(mine), "met": len(met), "refused": sum(1 for r in mine if r.rejected),
            "failed": sum(1 for r in mine if not r.ok and not r.rejected),
            "attainment": len(met) / len(mine) if mine else 0.0, "goodput_rps": len(met) / (t1 - t0) if t1 > t0 else 0.0,
            "ttft_p90_s": percentile(ttft, 90) if ttft else None, "tpot_p90_s": percentile(tpot, 90) if tpot else None}


def run_once(mode: str, entries: list[Any], args: argparse.Namespace, out: Path, model: str) -> dict[str, Any]:
    import uvloop

    from tandem.local.cluster import ClusterSpec, LocalCluster

    from .loadgen import run_trace

    d = out / mode
    d.mkdir(parents=True, exist_ok=True)
    spec = ClusterSpec(model=model, num_prefill=START[0], num_decode=START[1], max_model_len=MAX_MODEL_LEN, ttl_s=3,
                       log_dir=str(d / "logs"), extra_node_args=["--simulate", str(out / "profile.json")],
                       extra_coordinator_args=["--conditional-disagg", "off"])
    slo = (args.slo_ttft, args.slo_tpot)
    planner = None
    with LocalCluster(spec) as cluster:
        print(f"[bench shift] {mode}: 3:1 up; {len(entries)} requests over {args.phase_a_s + args.phase_b_s:.0f} s",
              flush=True)
        if mode == "live":
            planner = subprocess.Popen(
                [sys.executable, "-m", "tandem.cli", "plan", "--live", "--apply", "--profile", str(out / "profile.json"),
                 "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot), "--target", cluster.grpc_address,
                 "--metrics-url", cluster.http_url + "/metrics", "--etcd", cluster.etcd_url,
                 "--cluster", spec.cluster, "--window-s", str(args.window_s), "--every-s", str(args.every_s),
                 "--min-requests", "20", "--max-model-len", str(MAX_MODEL_LEN), "--admission", "on",
                 "--out", str(d)],
                stdout=open(d / "planner.log", "w"), stderr=subprocess.STDOUT)
        wall0 = time.time()
        res = uvloop.run(run_trace("tandem-grpc://" + cluster.grpc_address, entries, slo=slo, timeout_s=300))
        if planner is not None:
            planner.terminate()
            planner.wait(120)
    a, b = args.phase_a_s, args.phase_a_s + args.phase_b_s
    decisions = []
    if mode == "live" and (d / "live.jsonl").exists():
        decisions = [json.loads(x) for x in (d / "live.jsonl").read_text().splitlines() if x.strip()]
    switches = [{"at_s": round(r["at"] - wall0 - r["switched"]["took_s"], 1), "took_s": r["switched"]["took_s"],
                 "node": r["switched"]["node"], "role": r["switched"]["role"], "ok": r["switched"]["ok"]}
                for r in decisions if r.get("switched")]
    checks = [r["check"] for r in decisions if "check" in r]
    return {"mode": mode, "phase_a": phase_stats(res.timings, 0, a, slo), "phase_b": phase_stats(res.timings, a, b, slo),
            "whole": phase_stats(res.timings, 0, b, slo), "switches": switches, "prediction_checks": checks,
            "timeline": timeline(res.timings, b, slo)}


def timeline(reqs: list[Any], end_s: float, slo: tuple[float, float], bin_s: float = 10.0) -> list[list[float]]:
    """[bin start, attainment] of the requests sent in each bin."""
    rows = []
    t = 0.0
    while t < end_s:
        mine = [r for r in reqs if t <= r.sent < t + bin_s]
        if mine:
            rows.append([t, sum(1 for r in mine if r.ok and r.meets(*slo)) / len(mine)])
        t += bin_s
    return rows


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rate", type=float, default=2.0, help="arrivals per second in both phases")
    ap.add_argument("--phase-a-s", type=float, default=60.0, help="seconds of `code` arrivals (prefill-bound)")
    ap.add_argument("--phase-b-s", type=float, default=150.0, help="seconds of `chat` arrivals (decode-bound)")
    ap.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.06, help="seconds")
    ap.add_argument("--window-s", type=float, default=30.0, help="the live planner's window")
    ap.add_argument("--every-s", type=float, default=10.0, help="the live planner's decision period")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="static,live")
    ap.add_argument("--out", default="bench/results/shift")


def cmd_shift(args: argparse.Namespace) -> int:
    from tandem.coordinator.textcodec import TextCodec
    from tandem.local.model import ensure_default_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(PROFILE))
    model = str(ensure_default_model())
    entries = trace(args.rate, args.phase_a_s, args.phase_b_s, args.seed, TextCodec(model).vocab_size)
    runs = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("static", "live"):
            print(f"tandem bench shift: unknown mode {mode!r} (static, live)", file=sys.stderr)
            return 2
        r = run_once(mode, entries, args, out, model)
        runs.append(r)
        print(f"[bench shift] {mode}: phase A met {r['phase_a']['attainment']:.0%} "
              f"({r['phase_a']['goodput_rps']:.2f} good req/s), phase B met {r['phase_b']['attainment']:.0%} "
              f"({r['phase_b']['goodput_rps']:.2f} good req/s); switches {len(r['switches'])}", flush=True)
    doc = {"profile": PROFILE, "start": f"{START[0]}:{START[1]}", "rate": args.rate, "phase_a": "code",
           "phase_b": "chat", "phase_a_s": args.phase_a_s, "phase_b_s": args.phase_b_s,
           "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot}, "seed": args.seed,
           "planner": {"window_s": args.window_s, "every_s": args.every_s}, "runs": runs}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_report(out, doc)
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0


def write_report(out: Path, doc: dict[str, Any]) -> None:
    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v * 1000:.0f} ms"

    lines = [f"# Shifting workload: {doc['phase_a']} for {doc['phase_a_s']:.0f} s, then {doc['phase_b']} for "
             f"{doc['phase_b_s']:.0f} s, at {doc['rate']:g} req/s", "",
             f"Four simulated nodes (profile in results.json), starting {doc['start']}. SLOs: TTFT ≤ "
             f"{doc['slo']['ttft_s'] * 1000:.0f} ms, TPOT ≤ {doc['slo']['tpot_s'] * 1000:.0f} ms. Goodput here: "
             "requests per second that met both (refused ones count as missed). *live* runs `tandem plan --live "
             f"--apply` (window {doc['planner']['window_s']:.0f} s, a decision every {doc['planner']['every_s']:.0f} s).",
             "", "| run | phase | requests | met | refused | attainment | goodput req/s | TTFT p90 | TPOT p90 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        for ph in ("phase_a", "phase_b", "whole"):
            s = r[ph]
            lines.append(f"| {r['mode']} | {ph.replace('_', ' ')} | {s['requests']} | {s['met']} | {s['refused']} | "
                         f"{s['attainment']:.0%} | {s['goodput_rps']:.2f} | {ms(s['ttft_p90_s'])} | {ms(s['tpot_p90_s'])} |")
    for r in doc["runs"]:
        if r["switches"]:
            lines += ["", f"Switches in the {r['mode']} run (seconds from the start):", ""]
            lines += [f"- at {s['at_s']:.0f} s: {s['node']} to {s['role']} ({'done' if s['ok'] else 'FAILED'} "
                      f"in {s['took_s']:.0f} s)" for s in r["switches"]]
        if r["prediction_checks"]:
            errs = [abs(c["error"]) for c in r["prediction_checks"]]
            lines += ["", f"The live planner's predictions, checked against the next window's measured attainment: "
                          f"{len(errs)} checks, mean |error| {sum(errs) / len(errs) * 100:.0f} points, "
                          f"largest {max(errs) * 100:.0f}."]
    if _plot(out / "shift.png", doc):
        lines += ["", "![attainment over time](shift.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _plot(path: Path, doc: dict[str, Any]) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    for r in doc["runs"]:
        pts = r["timeline"]
        ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], marker="o", markersize=3, label=r["mode"])
        for s in r["switches"]:
            ax.axvline(s["at_s"], color="tab:orange", linestyle=":", linewidth=1)
    ax.axvline(doc["phase_a_s"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("request sent at, s (dashed: the workload shifts; dotted: a live switch asked)")
    ax.set_ylabel("met both SLOs, % (10 s bins)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
