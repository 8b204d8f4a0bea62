"""`tandem bench kvstore`: TTFT of the same requests when their long prefix is recomputed, found in
the engine's own prefix cache, loaded from the KV store's RAM tier, and loaded from its disk tier.

One 1:1 Tandem cluster on this machine's cores, the KV store on (RAM and disk), admission and
conditional disaggregation off (this measures the prefill node's tiers, not policy). The same
prompts, one at a time, in phases:

  recompute   first sight: the prefill node computes every token (and saves the whole chunks)
  engine      again at once: the engine's own prefix cache has them (the reference)
  ram         the engine's cache emptied (NodeMonitor.ResetCache): the store's RAM tier
  disk        the RAM tier emptied too and the files' pages dropped from the page cache: the disk

Each phase's TTFT (client-side, to the first token through the coordinator) is compared with the
recompute phase of the same run. Goals (issue 9): RAM <= 0.3x and disk <= 0.5x recompute for a
shared prefix of >= 1K tokens.

Before the cluster starts: the RAM tier's hit rate under each eviction policy, the multi-turn and
prefix-heavy workloads replayed through the store's index at caps below their working sets
(bench/eviction_replay.py; no engine). Writes results.json, report.md and ttft_by_tier.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

PHASES = ("recompute", "engine", "ram", "disk")
GOALS = {"ram": 0.3, "disk": 0.5}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="", help="local HF model dir (default: the seeded bench model, made once)")
    ap.add_argument("--prefix-tokens", type=int, default=1024, help="tokens of each prompt's stored prefix")
    ap.add_argument("--suffix-tokens", type=int, default=24, help="tokens after it (computed every time)")
    ap.add_argument("--prompts", type=int, default=8, help="distinct prompts, each run once per phase")
    ap.add_argument("--rounds", type=int, default=2, help="repeat the four phases (new prompts each round)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--ram-gib", type=float, default=1.0, help="the KV store's RAM tier")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay-requests", type=int, default=1200,
                    help="requests per workload in the eviction policies' replay")
    ap.add_argument("--eviction-only", action="store_true", help="only the eviction policies' replay (no cluster)")
    ap.add_argument("--out", default="bench/results/kvstore", help="where results.json, report.md and plots go")


def _ttft(stub: Any, ids: list[int]) -> tuple[float, list[int], str]:
    from tandem.proto import tandem_pb2 as pb

    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                             sampling=pb.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    first = None
    tokens: list[int] = []
    node = ""
    for m in stub.Generate(req, timeout=300):
        if first is None and m.token_ids:
            first = time.perf_counter() - t0
        tokens += list(m.token_ids)
        if m.HasField("finish"):
            if m.finish.reason not in ("length", "stop"):
                raise RuntimeError(f"a request ended {m.finish.reason}: {m.finish.message}")
            node = m.finish.timings.prefill_node
    if first is None:
        raise RuntimeError("no token came back")
    return first, tokens, node


def eviction_rows(args: argparse.Namespace, chunk_tokens: int = 256) -> list[dict[str, Any]]:
    from .eviction_replay import policy_table
    from .workloads import generate

    n = args.replay_requests
    workloads = {}
    for name, working_set in (("multi-turn", 64), ("prefix-heavy", 16)):
        entries = generate(name, rate=10.0, duration_s=n / 10.0 * 1.5, seed=args.seed,
                           max_model_len=args.max_model_len, prefixes_n=working_set)[:n]
        workloads[f"{name} ({working_set} {'conversations' if name == 'multi-turn' else 'prefixes'})"] = [
            e.input_ids or [] for e in entries]
    return policy_table(workloads, chunk_tokens)


def _save_cost(metrics: str) -> dict[str, float]:
    """What saving cost the prefill node: its steps' planning time (on the forward path) and the
    copies (on the worker's copier thread, beside the forward pass), per saved request."""
    from .systems import metric_sum, scrape

    got = scrape(metrics)
    saves = metric_sum(got, "tandem_kvstore_saves_total")
    step_s = metric_sum(got, "tandem_kvstore_save_step_seconds_total")
    copy_s = metric_sum(got, "tandem_kvstore_copy_seconds_sum", direction="save")
    copies = metric_sum(got, "tandem_kvstore_copy_seconds_count", direction="save")
    return {"saves": saves, "step_s_per_save": step_s / saves if saves else 0.0,
            "copy_s_per_save": copy_s / copies if copies else 0.0}


def cmd_kvstore(args: argparse.Namespace) -> int:
    import grpc

    from tandem.local.cluster import ClusterSpec, LocalCluster, core_plan
    from tandem.local.model import param_count
    from tandem.proto import tandem_pb2 as pb
    from tandem.proto import tandem_pb2_grpc as pb_grpc

    from .compare import bench_model
    from .compare_report import save_plot

    from .eviction_replay import table_lines

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"replaying {args.replay_requests} requests per workload through each eviction policy ...", flush=True)
    eviction = eviction_rows(args)
    eviction_md = ["## The RAM tier's hit rate per eviction policy", "",
                   f"Chunk hit rate (whole 256-token chunks found in the RAM tier / looked up) with "
                   f"{args.replay_requests} requests of each workload replayed in arrival order through the "
                   "node store's own lookups and saves (`bench/eviction_replay.py`: the store's index, no "
                   "engine, no engine prefix cache in front, no disk tier under it), at RAM caps below "
                   "the working set. Best per row in bold.", "", *table_lines(eviction), ""]
    print("\n".join(eviction_md[4:]), flush=True)
    if args.eviction_only:
        (out / "results.json").write_text(json.dumps({"eviction": eviction}, indent=1) + "\n")
        (out / "report.md").write_text("\n".join(["# tandem bench kvstore (eviction replay only)", "",
                                                   *eviction_md]))
        print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
        return 0
    model = bench_model(args.model, out)
    if args.prefix_tokens + args.suffix_tokens + 8 > args.max_model_len:
        raise SystemExit("--prefix-tokens + --suffix-tokens must fit in --max-model-len")
    store_dir = out / "kvstore-disk"
    # Cold: a disk tier an earlier run left (the same seeded prompts) would make "recompute" a disk hit.
    shutil.rmtree(store_dir, ignore_errors=True)
    spec = ClusterSpec(model=model, num_prefill=1, num_decode=1, max_model_len=args.max_model_len,
                       cores=core_plan(1, 1), log_dir=str(out / "logs"), kvstore_ram_gib=args.ram_gib,
                       kvstore_root=str(store_dir),
                       # Every prefill on the prefill node, whose caches the phases empty: a prefill the
                       # coordinator moves to the decode node (conditional disaggregation) measures nothing here.
                       extra_coordinator_args=["--admission", "off", "--conditional-disagg", "off"])
    print(f"starting a 1:1 cluster with the KV store on (logs in {out / 'logs'}) ...", flush=True)
    rng = random.Random(f"kvstore-bench:{args.seed}")
    rows: list[dict[str, Any]] = []
    mismatches = 0
    with LocalCluster(spec) as cluster:
        prefill = next(d for d in cluster.nodes if d.role == "prefill")
        ch = grpc.insecure_channel(cluster.grpc_address)
        mon_ch = grpc.insecure_channel(prefill.info["grpc"])
        stub, monitor = pb_grpc.CoordinatorStub(ch), pb_grpc.NodeMonitorStub(mon_ch)
        # One warm-up request: the first through a fresh engine pays one-time costs.
        _ttft(stub, [rng.randrange(5, 500) for _ in range(64)])
        for rnd in range(args.rounds):
            prompts = [[rng.randrange(5, 500) for _ in range(args.prefix_tokens + args.suffix_tokens)]
                       for _ in range(args.prompts)]
            first_out: list[list[int]] = []
            for phase in PHASES:
                if phase in ("ram", "disk"):
                    time.sleep(0.5)  # the last saves written through to disk
                    r = monitor.ResetCache(pb.ResetCacheRequest(store_ram=phase == "disk"), timeout=60)
                    if not r.reset:
                        raise RuntimeError(f"the prefill node could not reset its cache: {r.detail}")
                for i, ids in enumerate(prompts):
                    ttft, tokens, node = _ttft(stub, ids)
                    if phase == "recompute":
                        first_out.append(tokens)
                    elif tokens != first_out[i]:
                        mismatches += 1
                    rows.append({"round": rnd, "phase": phase, "prompt": i, "ttft_s": ttft, "prefill_node": node,
                                 "prompt_tokens": len(ids)})
                    print(f"  round {rnd} {phase:9} prompt {i}: TTFT {ttft * 1000:7.1f} ms ({node})", flush=True)
        ch.close()
        mon_ch.close()
        save_cost = _save_cost(prefill.info["metrics"])

    by_phase = {p: [r["ttft_s"] for r in rows if r["phase"] == p] for p in PHASES}
    med = {p: statistics.median(v) for p, v in by_phase.items()}
    summary = {p: {"median_s": med[p], "p90_s": sorted(v)[math.ceil(0.9 * len(v)) - 1],  # nearest rank
                   "vs_recompute": med[p] / med["recompute"]} for p, v in by_phase.items()}
    doc = {"machine": f"{platform.platform()}", "model": model, "model_params_m": param_count(model) / 1e6,
           "prefix_tokens": args.prefix_tokens, "suffix_tokens": args.suffix_tokens, "prompts": args.prompts,
           "rounds": args.rounds, "ram_gib": args.ram_gib, "summary": summary, "rows": rows,
           "token_mismatches": mismatches, "goals": GOALS, "eviction": eviction, "save_cost": save_cost}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.bar(PHASES, [med[p] * 1000 for p in PHASES],
           yerr=[[0] * len(PHASES), [(summary[p]["p90_s"] - med[p]) * 1000 for p in PHASES]], capsize=4)
    for p, goal in GOALS.items():
        ax.hlines(goal * med["recompute"] * 1000, PHASES.index(p) - 0.4, PHASES.index(p) + 0.4, colors="red",
                  linestyles="--")
    ax.set_ylabel("TTFT, median (bar) to p90 (ms)")
    ax.set_title(f"{args.prefix_tokens}-token prefix + {args.suffix_tokens} new tokens; red: goal")
    ax.grid(True, axis="y", alpha=0.3)
    save_plot(fig, out / "ttft_by_tier.png")
    lines = ["# tandem bench kvstore", "",
             f"Machine: {doc['machine']}. Model `{model}` ({doc['model_params_m']:.1f} M parameters, float32). "
             f"{args.prompts} prompts x {args.rounds} rounds, each a {args.prefix_tokens}-token prefix and "
             f"{args.suffix_tokens} more tokens; one request at a time through the coordinator (admission "
             "and conditional disaggregation off), "
             f"a 1:1 cluster, KV store RAM tier {args.ram_gib} GiB over a disk tier.", "",
             "| where the prefix came from | TTFT median | p90 | vs recompute | goal |", "|---|---:|---:|---:|---:|"]
    for p in PHASES:
        goal = f"<= {GOALS[p]:.1f}x" if p in GOALS else ""
        lines.append(f"| {p} | {med[p] * 1000:.1f} ms | {summary[p]['p90_s'] * 1000:.1f} ms | "
                     f"{summary[p]['vs_recompute']:.2f}x | {goal} |")
    lines += ["", f"Outputs that differed from the recompute phase's: {mismatches} (must be 0).", "",
              f"Saving ({save_cost['saves']:.0f} requests saved): "
              f"{save_cost['step_s_per_save'] * 1e6:.0f} us per request on the engine's step (planning and "
              "committing the save), "
              f"{save_cost['copy_s_per_save'] * 1000:.2f} ms per request copying out on the worker's copier thread "
              "beside the forward pass; against a recompute TTFT of "
              f"{med['recompute'] * 1000:.0f} ms.", "",
              "![TTFT by tier](ttft_by_tier.png)", "", *eviction_md]
    (out / "report.md").write_text("\n".join(lines))
    for p in PHASES:
        print(f"{p:9} TTFT median {med[p] * 1000:7.1f} ms ({summary[p]['vs_recompute']:.2f}x recompute)")
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 1 if mismatches else 0
