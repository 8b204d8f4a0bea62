"""`tandem chaos` the command: the supervised cluster the scenarios run on, and running them
(the harness and its scenarios: chaos.py; the report: chaos_report.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tandem.netutil import free_port

from .chaos import KV_LEASE_S, SCENARIOS, Harness
from .chaos_load import ScenarioResult
from .chaos_report import RELIABILITY_HEAD, report
from .cluster import ClusterSpec, LocalCluster
from .proxy import TcpProxy


def chaos_cluster_spec(model: str, log_dir: str, kv_port: int, kv_proxy: str, tls: bool = False,
                       kvstore_ram_gib: float = 0.0) -> ClusterSpec:
    """2 coordinators, 2 prefill and 2 decode nodes, supervised. prefill-0 binds its KV on
    ``kv_port`` and advertises ``kv_proxy`` (the proxy in front of it), over TCP only, so that
    the cut-kv scenario can cut its KV path; the rest move KV over UCX. ``tls``: every port
    (and etcd, and the KV control connections) mutual TLS. ``kvstore_ram_gib``: each node's KV
    store RAM tier (0: none)."""
    return ClusterSpec(model=model, num_prefill=2, num_decode=2, num_coordinators=2, ttl_s=3, lease_s=KV_LEASE_S,
                       log_dir=log_dir, supervise=True, tls=tls, kvstore_ram_gib=kvstore_ram_gib,
                       extra_coordinator_args=["--stall-s", "2", "--pool-wait-s", "20"],
                       node_args={"prefill-0": ["--kv-port", str(kv_port), "--kv-advertise", kv_proxy,
                                                "--kv-transport", "tcp"]})


@contextmanager
def chaos_cluster(model: str, log_dir: str, tls: bool = False,
                  kvstore_ram_gib: float = 0.0) -> Iterator[tuple[LocalCluster, TcpProxy]]:
    kv_port = free_port()
    with TcpProxy(f"127.0.0.1:{kv_port}") as proxy, \
            LocalCluster(chaos_cluster_spec(model, log_dir, kv_port, proxy.address, tls, kvstore_ram_gib)) as cluster:
        yield cluster, proxy


def run_scenarios(cluster: LocalCluster, scenarios: list[str], requests: int, rate: float, seed: int,
                  out_dir: Path | None = None, proxy: TcpProxy | None = None) -> list[ScenarioResult]:
    harness = Harness(cluster, requests, rate, seed, proxy)
    results = []
    for name in scenarios:
        print(f"[tandem chaos] {name}: {requests} requests at {rate} req/s ...", flush=True)
        res = asyncio.run(harness.run(name))
        results.append(res)
        print(f"[tandem chaos] {name}: completed {res.completed}, ended with a status {res.ended_with_status}, "
              f"migrated {res.migrated}, hung {res.hung}, lost {res.lost}, token mismatches "
              f"{res.token_mismatches}, KV blocks held after {res.kv_blocks_held_after:.0f}, recovered in "
              f"{'-' if res.recovery_s is None else f'{res.recovery_s:.1f} s'}", flush=True)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{name}.json").write_text(json.dumps(asdict(res), indent=2))
    return results


def add_chaos_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("--requests", type=int, default=200, help="requests per scenario")
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="", help="local HF model dir (default: the seeded tiny model)")
    ap.add_argument("--out", default="bench/results/chaos", help="where each scenario's JSON goes")
    ap.add_argument("--report", default="", help="also write the Markdown table here (e.g. docs/RELIABILITY.md)")
    ap.add_argument("--tls", action="store_true",
                    help="run the cluster with mutual TLS everywhere (gRPC, HTTP, etcd, the KV control connections)")


def cmd_chaos(args: argparse.Namespace) -> int:
    from tandem.logs import setup_logging
    from .model import ensure_default_model

    setup_logging("chaos")
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        print(f"tandem chaos: unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    model = args.model or str(ensure_default_model())
    out = Path(args.out)
    log_dir = out / "logs"
    print(f"[tandem chaos] starting a supervised cluster (2 coordinators, 2 prefill, 2 decode"
          f"{'; mutual TLS' if args.tls else ''}); logs in {log_dir}", flush=True)
    with chaos_cluster(model, str(log_dir), tls=args.tls) as (cluster, proxy):
        results = run_scenarios(cluster, names, args.requests, args.rate, args.seed, out, proxy)
    which = "" if names == list(SCENARIOS) else f"--scenarios {','.join(names)} "
    command = (f"tandem chaos {which}--requests {args.requests} --rate {args.rate} --seed {args.seed}"
               f"{' --tls' if args.tls else ''}")
    context = (f"Run {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, model {Path(model).name}, "
               f"{args.requests} requests per scenario at {args.rate} req/s (seed {args.seed}).")
    table = report(results, command, context)
    print(table)
    if args.report:
        Path(args.report).write_text(RELIABILITY_HEAD + table)
    bad = [r.scenario for r in results if r.hung or r.lost or r.token_mismatches or r.kv_blocks_held_after
           or r.recovery_s is None]
    if bad:
        print(f"[tandem chaos] promises broken in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
