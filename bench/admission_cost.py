"""`tandem bench admission`: the CPU one admission decision costs the coordinator, by pool size.

Admission (coordinator/admission.py) predicts a new request's TTFT and TPOT on up to
``--admission-candidates`` nodes of each pool, and each prediction walks what the node is
running: its queue, the budgets of its streams, their tokens to come. This times
``Admission.plan`` alone, in this process, on a synthetic cluster state with every node busy
(no network, no nodes): prefill nodes with prompts queued, decode nodes with a batch of
``--streams`` of this coordinator's streams each (each with tokens to come and a TPOT budget),
a local prefill running, a KV cache short of room, and load reports saying so. Prefix routing
with a prompt no node holds; conditional disaggregation on (a decode node's local-prefill
estimate is made too), as a coordinator runs by default.

For each pool size (``--pools``: nodes of each kind) and candidate cap (``--candidates``), the
mean CPU microseconds a decision takes over ``--iterations`` (the fastest of ``--repeats``).
The whole coordinator's CPU per request, with gRPC and the relay, is `tandem bench
coordinator`'s; this is the part of it that grows with the cluster.

    tandem bench admission --pools 2,4,8,16,32 --candidates 8,0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

LAYOUT = {"num_layers": 4, "block_size": 16, "num_kv_heads": 4, "head_size": 64, "dtype": "float32"}
# Fits of the shape the twentieth sitting's CPU nodes learned (seconds): prefill a + b·tokens,
# decode step c + d·batch + e·context (a line: no hinge past a batch of 4), transfer f + g·bytes.
PREFILL = (0.018, 0.00027, 0.0)
DECODE = (0.02, 0.001, 2e-6)
TRANSFER = (0.002, 1e-9)


def _fits() -> list[Any]:
    from tandem.proto import tandem_pb2 as pb

    return [pb.PerfFit(name="prefill", terms=["const", "tokens", "tokens2"], coefficients=list(PREFILL), samples=50),
            pb.PerfFit(name="decode", terms=["const", "batch", "context"], coefficients=list(DECODE), samples=200),
            pb.PerfFit(name="transfer", terms=["const", "bytes"], coefficients=list(TRANSFER), samples=20)]


def busy_cluster(pool: int, streams: int) -> Any:
    """A Router of ``pool`` prefill and ``pool`` decode nodes, all busy (see the module's doc).
    Call it inside a running event loop (a node's client opens a channel, unused here)."""
    from tandem.coordinator.router import Router
    from tandem.membership import NodeRecord
    from tandem.proto import tandem_pb2 as pb

    r = Router("bench", watch_loads=False)
    now = time.perf_counter()
    for i in range(2 * pool):
        role = "prefill" if i < pool else "decode"
        node_id = f"{role[0]}{i % pool}"
        r.on_membership(node_id, NodeRecord(node_id, role, f"127.0.0.1:{20000 + i}", "x:1", "bench", 4096,
                                            layout=LAYOUT))
        n = r._nodes[node_id]
        if role == "prefill":
            n.saw_load(pb.NodeLoad(prefill_queue=[300 + 50 * (i % 3), 500], fits=_fits()))
            continue
        n.saw_load(pb.NodeLoad(decode_batch=streams, decode_context=streams * 600, kv_tokens=20_000,
                               kv_free_tokens=1_000, prefill_busy=0.3, step_tokens=256, prefill_queue=[200],
                               decode_batch_mean=streams, decode_context_mean=streams * 600, fits=_fits()))
        for k in range(streams):
            key = i * 1000 + k
            n.inflight[key] = 600
            n.left[key] = (lambda k=k: 10 + 5 * k)
            n.budgets[key] = (lambda t, k=k: (3.0, 10 + 5 * k))
        n.prefilling[i * 1000 + 999] = 300
        n.prefilling_since[i * 1000 + 999] = now + 1e6  # (its progress held still: none done, every decision)
        for _ in range(20):
            n.arrivals.add(64)
    return r


def time_plans(pool: int, streams: int, cap: int, iterations: int, repeats: int = 3) -> float:
    """Mean CPU seconds of one ``Admission.plan`` on ``busy_cluster(pool, streams)`` with ``cap``
    candidates: the least of ``repeats`` means over ``iterations`` (this VM's speed wanders; the
    thread's CPU time, not the wall's, leaves out the time other processes held the core)."""
    from tandem.coordinator.admission import Admission, Slo

    async def go() -> float:
        admission = Admission(busy_cluster(pool, streams), "off", candidates=cap)
        ids = list(range(1_000_000, 1_000_512))  # a prompt no node holds
        slo = Slo(ttft_s=1.5, tpot_s=0.1)
        for _ in range(max(10, iterations // 10)):  # warm-up
            admission.plan("bench", 512, 64, slo, count=False, prompt_ids=ids)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.thread_time()
            for _ in range(iterations):
                admission.plan("bench", 512, 64, slo, count=False, prompt_ids=ids)
            best = min(best, (time.thread_time() - t0) / iterations)
        return best

    return asyncio.run(go())


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pools", default="2,4,8,16,32", help="nodes of each kind, comma-separated")
    ap.add_argument("--candidates", default="8,0", help="--admission-candidates values to time (0: every node)")
    ap.add_argument("--streams", type=int, default=12, help="this coordinator's streams on each decode node")
    ap.add_argument("--iterations", type=int, default=500, help="decisions timed per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per point; the fastest counts")
    ap.add_argument("--out", default="bench/results/admission")


def cmd_admission(args: argparse.Namespace) -> int:
    pools = [int(p) for p in args.pools.split(",") if p.strip()]
    caps = [int(c) for c in args.candidates.split(",") if c.strip()]
    if not pools or min(pools) < 1 or not caps or min(caps) < 0:
        raise SystemExit("--pools: positive node counts; --candidates: counts >= 0 (0: every node)")
    if args.streams < 0 or args.iterations < 1 or args.repeats < 1:
        raise SystemExit("--streams must be >= 0, --iterations and --repeats >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cap in caps:
        for pool in pools:
            us = time_plans(pool, args.streams, cap, args.iterations, args.repeats) * 1e6
            rows.append({"pool": pool, "candidates": cap, "us_per_plan": us})
            print(f"  {pool} + {pool} nodes, --admission-candidates {cap}: {us:,.0f} us a decision", flush=True)
    doc = {"streams_per_decode_node": args.streams, "iterations": args.iterations, "repeats": args.repeats,
           "rows": rows,
           "fits": {"prefill": PREFILL, "decode": DECODE, "transfer": TRANSFER}}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_report(out, doc)
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0


def write_report(out: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    caps = sorted({r["candidates"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for cap in caps:
        mine = [r for r in rows if r["candidates"] == cap]
        ax.plot([r["pool"] for r in mine], [r["us_per_plan"] for r in mine], marker="o",
                label=f"--admission-candidates {cap}" + (" (every node)" if cap == 0 else ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("nodes of each kind")
    ax.set_ylabel("CPU per admission decision, us")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "admission-cost.png", dpi=110)
    plt.close(fig)
    lines = ["# What one admission decision costs", "",
             f"`Admission.plan` alone on a synthetic busy cluster ({doc['streams_per_decode_node']} streams on each "
             f"decode node, conditional disaggregation on): the thread's CPU time, the mean of "
             f"{doc['iterations']} decisions, the fastest of "
             f"{doc['repeats']} such runs.", "",
             "| nodes of each kind | " + " | ".join(f"candidates {c}" for c in caps) + " |",
             "|---:|" + "---:|" * len(caps)]
    for pool in sorted({r["pool"] for r in rows}):
        cells = [next((f"{r['us_per_plan']:,.0f} us" for r in rows if r["pool"] == pool and r["candidates"] == c), "-")
                 for c in caps]
        lines.append(f"| {pool} | " + " | ".join(cells) + " |")
    lines += ["", "![CPU per admission decision](admission-cost.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
