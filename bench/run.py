"""`tandem bench run`: one open-loop run of a seeded workload (or a replayed trace) against a target."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tandem.tls import TlsConfig, add_tls_args

from .loadgen import Dial, run_trace
from .metrics import summarize
from .report import write_run_report
from .workloads import WORKLOADS, generate, load_trace, materialize, save_trace


def add_run_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--target", required=True, help="http://HOST:PORT (OpenAI API) or tandem-grpc://HOST:PORT")
    ap.add_argument("--model", default="", help="model name for OpenAI targets (default: the server's first)")
    ap.add_argument("--workload", default="chat", choices=WORKLOADS)
    ap.add_argument("--prefixes", type=int, default=None,
                    help="prefix-heavy: shared prefixes; multi-turn: conversations at once (the working set)")
    ap.add_argument("--trace", default="", help="replay this JSONL trace (ours or Mooncake-style) instead")
    ap.add_argument("--rate", type=float, default=1.0, help="mean arrival rate, requests/s")
    ap.add_argument("--burstiness", type=float, default=None, help="gamma shape of the gaps; 1 = Poisson")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=1024, help="lengths are scaled to fit this context")
    ap.add_argument("--vocab-size", type=int, default=600, help="token ids are drawn below this")
    ap.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO in seconds")
    ap.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO in seconds")
    ap.add_argument("--cores", default="", help="pin the load generator to these cores (e.g. 3), apart from "
                    "the servers'; default: wherever the OS puts it")
    ap.add_argument("--out", default="bench/results/run", help="directory for results.json and trace.jsonl")
    # a secured target: https:// or a TLS coordinator (a CA alone verifies one that asks for no
    # certificate); its API key comes from TANDEM_API_KEY
    add_tls_args(ap)


def dial_of(args: argparse.Namespace, cmd: str) -> Dial | None:
    """The target's TLS and API key; None (said) when the TLS files do not load."""
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_ca, server_name=args.tls_server_name)
    try:
        tls.check("client")
    except ValueError as exc:
        print(f"tandem bench {cmd}: {exc}", file=sys.stderr)
        return None
    if tls.dials_tls and args.target.startswith("http://"):
        print(f"tandem bench {cmd}: --tls-* given but the target is http://; use https://", file=sys.stderr)
        return None
    return Dial(tls)


def first_model(target: str, dial: Dial | None = None) -> str:
    import urllib.request

    dial = dial or Dial()
    req = urllib.request.Request(target.rstrip("/") + "/v1/models", headers=dial.headers)
    with urllib.request.urlopen(req, timeout=10, context=dial.ssl_context(target)) as r:  # type: ignore[arg-type]
        return str(json.loads(r.read())["data"][0]["id"])


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    dial = dial_of(args, "run")
    if dial is None:
        return 2
    if args.trace:
        entries = load_trace(args.trace)
        source = {"trace": args.trace}
    else:
        entries = generate(args.workload, rate=args.rate, duration_s=args.duration, seed=args.seed,
                           max_model_len=args.max_model_len, vocab_size=args.vocab_size,
                           burstiness=args.burstiness, prefixes_n=args.prefixes)
        source = {"workload": args.workload, "rate": args.rate, "duration_s": args.duration, "seed": args.seed,
                  "burstiness": args.burstiness, "prefixes": args.prefixes}
    materialize(entries, args.seed, args.vocab_size)
    if not entries:
        print("tandem bench run: the workload has no requests; raise --rate or --duration", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_trace(out / "trace.jsonl", entries)
    model = args.model or ("(the coordinator's)" if args.target.startswith("tandem-grpc://") else "")
    if not model:
        try:
            model = first_model(args.target, dial)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            print(f"tandem bench run: cannot list the models of {args.target}: {exc}", file=sys.stderr)
            return 2
    if args.cores:
        from tandem.node.config import parse_cores

        try:
            os.sched_setaffinity(0, parse_cores(args.cores))
        except (ValueError, OSError) as exc:
            print(f"tandem bench run: --cores {args.cores}: {exc}", file=sys.stderr)
            return 2
    total = len(entries)
    done = [0]
    step = max(1, total // 10)

    def progress() -> None:
        done[0] += 1
        if done[0] % step == 0 or done[0] == total:
            print(f"  {done[0]}/{total} requests done", flush=True)

    print(f"tandem bench run: {total} requests over {entries[-1].arrival_s:.1f} s against {args.target}", flush=True)
    t_wall = time.time()
    res = uvloop.run(run_trace(args.target, entries, model=model, on_done=progress,
                               slo=(args.slo_ttft, args.slo_tpot), dial=dial))
    summary = summarize(res.timings, res.duration_s, args.slo_ttft, args.slo_tpot)
    summary["client_cpu_s"] = res.client_cpu_s
    summary["client_cpu_share"] = res.client_cpu_s / res.duration_s if res.duration_s else math.nan
    result = {"target": args.target, "model": model, "started_unix": t_wall, **source, "summary": summary,
              "client_cores": sorted(os.sched_getaffinity(0)),
              "goodput_kind": "goodput at a fixed rate (vLLM --goodput): SLO-meeting requests per second",
              "requests": [asdict(t) for t in res.timings]}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    report = write_run_report(out, result)
    s = summary
    print(f"completed {s['completed']}/{s['requests']} in {s['duration_s']:.1f} s; "
          f"{s['throughput_rps']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s; "
          f"client CPU {s['client_cpu_share']:.0%}")
    for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        d = s[k]
        print(f"  {k[:-2].upper():5} p50 {d['p50'] * 1000:8.1f} ms  p90 {d['p90'] * 1000:8.1f} ms  "
              f"p99 {d['p99'] * 1000:8.1f} ms")
    print(f"  SLO attainment {s['slo_attainment']:.1%} (TTFT {args.slo_ttft} s, TPOT {args.slo_tpot} s); "
          f"goodput at this rate {s['goodput_at_rate_rps']:.2f} req/s; {s['rejected']} refused by admission")
    for k, d in s["ttft_breakdown"].items():
        print(f"  TTFT part {k:14} p50 {d['p50'] * 1000:8.1f} ms  mean {d['mean'] * 1000:8.1f} ms")
    print(f"wrote {out / 'results.json'}, {report} and {out / 'trace.jsonl'}")
    return 0 if s["failed"] == 0 else 1


def add_goodput_args(ap: argparse.ArgumentParser) -> None:
    add_run_args(ap)
    ap.set_defaults(out="bench/results/goodput", duration=30.0)
    ap.add_argument("--seeds", type=int, default=3, help="seeded runs per probed rate (median attainment)")
    ap.add_argument("--start-rate", type=float, default=0.5)
    ap.add_argument("--attainment", dest="attain", type=float, default=0.9, help="share of requests that must meet both SLOs")
    ap.add_argument("--tol", type=float, default=0.1, help="stop when the bracket is this narrow (relative)")
    ap.add_argument("--budget", type=float, default=900.0, help="stop after this many seconds")


def measure_attainment(target: str, model: str, workload: str, rate: float, duration_s: float, seed: int,
                       max_model_len: int, vocab_size: int, slo_ttft: float | None, slo_tpot: float | None,
                       burstiness: float | None = None, dial: Dial | None = None) -> float:
    """One seeded open-loop probe; its SLO attainment."""
    import uvloop

    entries = generate(workload, rate=rate, duration_s=duration_s, seed=seed, max_model_len=max_model_len,
                       vocab_size=vocab_size, burstiness=burstiness)
    if not entries:
        return 1.0
    res = uvloop.run(run_trace(target, entries, model=model, slo=(slo_ttft, slo_tpot), dial=dial))
    return float(summarize(res.timings, res.duration_s, slo_ttft, slo_tpot)["slo_attainment"])


def cmd_goodput(args: argparse.Namespace) -> int:
    from .goodput import find_goodput

    if args.slo_ttft is None and args.slo_tpot is None:
        print("tandem bench goodput: give --slo-ttft and/or --slo-tpot", file=sys.stderr)
        return 2
    dial = dial_of(args, "goodput")
    if dial is None:
        return 2
    model = args.model or (first_model(args.target, dial) if args.target.startswith("http") else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def measure(rate: float, seed: int) -> float:
        return measure_attainment(args.target, model, args.workload, rate, args.duration, args.seed + seed,
                                  args.max_model_len, args.vocab_size, args.slo_ttft, args.slo_tpot,
                                  args.burstiness, dial)

    res = find_goodput(measure, start_rate=args.start_rate, seeds=args.seeds, target=args.attain,
                       rel_tol=args.tol, budget_s=args.budget, progress=lambda m: print("  " + m, flush=True))
    doc = {"target": args.target, "model": model, "workload": args.workload, "duration_s_per_probe": args.duration,
           "seeds": args.seeds, "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
           "goodput_rps": res.goodput_rps, "goodput_kind": res.kind, "bracket": res.bracket,
           "stopped_by": res.stopped_by,
           "probes": [{"rate": p.rate, "attainment": p.attainment, "per_seed": p.attainments} for p in res.probes]}
    (out / "goodput.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"goodput {res.goodput_rps:.3g} req/s ({res.kind}); bracket {res.bracket[0]:.3g}..{res.bracket[1]:.3g}, "
          f"stopped by {res.stopped_by}; wrote {out / 'goodput.json'}")
    return 0
