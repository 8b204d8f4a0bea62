"""The `tandem` command: run daemons, a local cluster, completions, status, the tiny model."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from .cli_client import cmd_generate, cmd_probe, cmd_status
from .cli_help import annotate_help

DEFAULT_COORDINATOR = "127.0.0.1:50051"


def _run(coro: object) -> int:
    import uvloop

    return uvloop.run(coro) or 0  # type: ignore[arg-type]


def cmd_node(role: str, args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .node.config import config_from_args
    from .node.runtime import RESTART_EXIT, run_node

    from .membership import use_etcd_tls

    asked = role
    try:
        cfg = config_from_args(role, args)
        use_etcd_tls(cfg.etcd_cert, cfg.etcd_key, cfg.etcd_ca)  # for this process and the engine's
        role = _assigned_role(cfg.etcd, cfg.cluster, cfg.node_id) or role
        if role != asked:
            cfg = config_from_args(role, args)
    except ValueError as exc:
        print(f"tandem {asked}: {exc}", file=sys.stderr)
        return 2
    setup_logging(role)
    if role != asked:
        import logging

        logging.getLogger("tandem.node").warning(
            "node %s runs as a %s node: `tandem role` gave it that role (etcd %s), over the command line's "
            "%s", cfg.node_id, role, f"/tandem/{cfg.cluster}/roles/{cfg.node_id}", asked)
    if cfg.cores:
        # The whole node on its cores, before the engine process exists (it inherits them):
        # left floating, the daemon and vLLM's engine-core process (which spins while it
        # waits for its worker) preempt the other pool's pinned worker. Seen on 2 cores: prefill
        # steps of ~10 ms took up to 1.8 s under load until the nodes were pinned whole.
        from .node.config import pin_process

        pin_process(cfg.cores)
    if role == "prefill":
        from tandem.decode_node.server import DecodeServicer
        from tandem.prefill_node.server import SERVICE_NAME
        from tandem.prefill_node.server import add_servicer as add_prefill

        def add_servicer(server, engine, perf):  # type: ignore[no-untyped-def]
            # and the Decode calls of the requests it serves whole (--colocate), those only
            return add_prefill(server, engine, perf, DecodeServicer(engine, perf, handles=False))
    else:
        from tandem.decode_node.server import SERVICE_NAME, add_servicer
    code = _run(run_node(cfg, SERVICE_NAME, add_servicer))
    if code == RESTART_EXIT:
        _restart_in_place(cfg.node_id)
    return code


def _assigned_role(etcd_url: str, cluster: str, node_id: str, wait_s: float = 15.0) -> str | None:
    """The role `tandem role` gave this node in etcd, or None. ValueError when etcd cannot be
    read within ``wait_s`` (the node could not join anyway) or the entry is malformed."""
    from .membership import assigned_role

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return asyncio.run(assigned_role(etcd_url, cluster, node_id))
        except ValueError:
            raise
        except Exception as exc:
            if time.monotonic() > deadline:
                raise ValueError(f"cannot read this node's role from etcd at {etcd_url}: {exc}") from None
            time.sleep(1.0)


def _restart_in_place(node_id: str) -> None:
    """Start this command again in this process (a role switch): same command line and node id
    (an id made up at start would otherwise change), the role from etcd. Returns only if the exec
    failed: the caller then exits with RESTART_EXIT, for a supervisor to restart it."""
    import logging

    os.environ["TANDEM_NODE_ID"] = node_id
    argv = [sys.executable, *sys.orig_argv[1:]]
    logging.getLogger("tandem.node").info("node %s: starting again (%s)", node_id, " ".join(argv[:4]))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        print(f"tandem: could not start node {node_id} again ({exc}); exiting for a supervisor to restart it",
              file=sys.stderr)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from tandem.coordinator.main import config_from_args, run_coordinator
    from tandem.coordinator.workers import run_workers, worker_index

    from .logs import setup_logging

    index = worker_index()
    setup_logging("coordinator" if index is None else f"coordinator-w{index}")
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"tandem coordinator: {exc}", file=sys.stderr)
        return 2
    if cfg.cores and index is None:  # (the workers it starts inherit them)
        from .node.config import pin_process

        pin_process(cfg.cores)
    if cfg.workers > 1 and index is None:  # this process supervises; the workers serve
        return run_workers(cfg.workers, args.given_argv, cfg.host, cfg.grpc_port, cfg.http_port)
    _run(run_coordinator(cfg))
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from .tls import cmd_certs

    return cmd_certs(args)


def _etcd_tls(args: argparse.Namespace, cmd: str) -> bool:
    """Apply --etcd-ca/--etcd-cert/--etcd-key; False (said) when they do not fit the URL."""
    from .membership import check_etcd_tls, use_etcd_tls

    try:
        check_etcd_tls(args.etcd, args.etcd_cert, args.etcd_key, args.etcd_ca)
    except ValueError as exc:
        print(f"tandem {cmd}: {exc}", file=sys.stderr)
        return False
    use_etcd_tls(args.etcd_cert, args.etcd_key, args.etcd_ca)
    return True


def cmd_drain(args: argparse.Namespace) -> int:
    from .drain import drain_node

    if not _etcd_tls(args, "drain"):
        return 2
    return asyncio.run(drain_node(args.node_id, args.etcd, args.cluster, args.grace_s, wait=not args.no_wait))


def cmd_role(args: argparse.Namespace) -> int:
    from .drain import clear_role, switch_role

    if args.clear == bool(args.role):
        print("tandem role: give a role (prefill or decode) or --clear", file=sys.stderr)
        return 2
    if not _etcd_tls(args, "role"):
        return 2
    if args.clear:
        return asyncio.run(clear_role(args.node_id, args.etcd, args.cluster))
    return asyncio.run(switch_role(args.node_id, args.role, args.etcd, args.cluster, args.grace_s,
                                   wait=not args.no_wait, timeout_s=args.timeout_s))


def _disk_tier(path: str):  # type: ignore[no-untyped-def]
    from pathlib import Path

    from tandem.kvstore.tiers import DiskTier

    if not Path(path).is_dir():
        raise SystemExit(f"--dir {path}: no such directory")
    return DiskTier(path, cap_bytes=sys.maxsize, durable=False)


def cmd_kvstore_stats(args: argparse.Namespace) -> int:
    disk = _disk_tier(args.dir)
    chunks, held = len(disk), disk.held
    print(f"{args.dir}: {chunks} chunks, {held / 2**20:.1f} MiB")
    if args.verify:
        bad = sum(disk.get(k) is None for k in disk.keys())
        print(f"verified {chunks} chunks: {bad} failed their check and were removed")
    return 0


def cmd_kvstore_clear(args: argparse.Namespace) -> int:
    disk = _disk_tier(args.dir)
    chunks, held = len(disk), disk.held
    disk.clear()
    print(f"{args.dir}: removed {chunks} chunks, {held / 2**20:.1f} MiB")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .local.model import PRESETS, make_tiny_model, param_count, tree_digest

    path = make_tiny_model(args.path, seed=args.seed, spec=PRESETS[args.preset])
    print(f"wrote {path} ({param_count(path) / 1e6:.1f} M parameters, sha256 {tree_digest(path)[:16]})")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .local.up import run_up

    return run_up(args)


def build_parser() -> argparse.ArgumentParser:
    from tandem.coordinator.main import add_coordinator_args

    from .membership import add_etcd_tls_args
    from .node.config import add_node_args
    from .tls import add_tls_args

    ap = argparse.ArgumentParser(prog="tandem", description="Disaggregated prefill/decode LLM serving")
    sub = ap.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start a one-machine cluster and stream a demo completion")
    up.add_argument("--model", default="", help="local HF model dir (default: the seeded tiny model)")
    up.add_argument("--etcd", default="", help="use this etcd instead of starting one")
    up.add_argument("--prefill", type=int, default=1,
                    help="prefill nodes; 0: none, the decode nodes prefill what they decode")
    up.add_argument("--decode", type=int, default=1, help="decode nodes")
    up.add_argument("--kv-transport", default="auto", choices=["auto", "ucx", "tcp"])
    up.add_argument("--kv-cache-gib", type=float, default=1.0,
                    help="each engine's own KV cache, GiB (fractions too); each prefill engine's when "
                         "--decode-kv-cache-gib is given")
    up.add_argument("--decode-kv-cache-gib", type=float, default=0.0,
                    help="each decode engine's own KV cache, GiB: the running batch lives there, so it "
                         "may want more than a prefill engine; 0: --kv-cache-gib")
    up.add_argument("--kvstore-ram-gib", type=float, default=0.25,
                    help="each node's KV store RAM tier (prompts' KV kept for reuse); 0: off")
    up.add_argument("--kvstore-dir", default="",
                    help="the KV store's disk tier, one folder per node under this one; empty: RAM only")
    up.add_argument("--grpc-port", type=int, default=50051)
    up.add_argument("--http-port", type=int, default=8000)
    up.add_argument("--prompt", default="the prefill node sends the key value cache to the decode node")
    up.add_argument("--max-tokens", type=int, default=48)
    up.add_argument("--exit-after-demo", action="store_true", help="stop everything after the demo completion")
    up.add_argument("--log-dir", default="", help="where the daemons' logs go (default: a temp dir)")
    up.set_defaults(fn=cmd_up)

    co = sub.add_parser("coordinator", help="run the coordinator daemon")
    add_coordinator_args(co)
    co.set_defaults(fn=cmd_coordinator)
    for role in ("prefill", "decode"):
        # allow_abbrev off: a vLLM flag that starts like one of Tandem's goes to vLLM, whole
        p = sub.add_parser(role, help=f"run a {role} node daemon (vLLM's engine flags are taken too)",
                           allow_abbrev=False,
                           epilog="vLLM's engine arguments (`vllm serve --help`) are passed to the node's engine; "
                                  "Tandem's flags win where names overlap.")
        add_node_args(p)
        p.set_defaults(fn=lambda a, r=role: cmd_node(r, a))

    from tandem.profile_cmd import add_args as add_profile_args
    from tandem.profile_cmd import cmd_profile

    pr = sub.add_parser("profile", help="measure this host's engine once (prefill, decode steps, KV transfer) and "
                                        "cache the profile where nodes and `tandem plan` find it")
    add_profile_args(pr)
    pr.set_defaults(fn=cmd_profile)

    from tandem.profile_table import add_args as add_fit_args
    from tandem.profile_table import cmd_fit

    ft = sub.add_parser("fit-profile", help="a node profile fitted from a published table of GPU timings "
                                            "(Splitwise's perf_model.csv format), for `tandem plan --profile`")
    add_fit_args(ft)
    ft.set_defaults(fn=cmd_fit)

    g = sub.add_parser("generate", help="stream a completion through the coordinator")
    g.add_argument("prompt")
    g.add_argument("--target", default=DEFAULT_COORDINATOR, help="coordinator gRPC address")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--retries", type=int, default=3, help="tries again this often while the coordinator is "
                                                           "unavailable before the first token (API key: TANDEM_API_KEY)")
    add_tls_args(g)
    g.set_defaults(fn=cmd_generate)

    ce = sub.add_parser("certs", help="a development CA and certificates for TLS between the daemons and their "
                                      "clients")
    ce_sub = ce.add_subparsers(dest="certs_cmd", required=True)
    mk = ce_sub.add_parser("make", help="write ca.pem and client-ca.pem (the daemons' and the clients' CAs), "
                                        "server.pem (the daemons') and client.pem, with their keys; again in the "
                                        "same DIR: new certificates from the same CAs (the daemons reload them)")
    mk.add_argument("dir")
    mk.add_argument("--hosts", default="", help="the daemons' host names and addresses, comma separated (localhost "
                                                "and 127.0.0.1 are always in; a rotation names them all again)")
    mk.add_argument("--days", type=int, default=365)
    mk.set_defaults(fn=_cmd_certs)

    st = sub.add_parser("status", help="show the cluster's nodes and their load")
    st.add_argument("--target", default=DEFAULT_COORDINATOR)
    st.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                    help="redraw every SECONDS, with each node's requests per second, until Ctrl-C (0: once)")
    add_tls_args(st)
    st.set_defaults(fn=cmd_status)

    pr = sub.add_parser("probe", help="one gRPC health check of a daemon: exit 0 when it serves, 1 when not "
                                      "(for container and service health checks, TLS too)")
    pr.add_argument("target", help="the daemon's gRPC address, HOST:PORT")
    pr.add_argument("--timeout-s", type=float, default=3.0)
    add_tls_args(pr)
    pr.set_defaults(fn=cmd_probe)

    dr = sub.add_parser("drain", help="let a node finish its work, take no new work, and exit")
    dr.add_argument("node_id")
    dr.add_argument("--etcd", default=os.environ.get("TANDEM_ETCD", ""), help="etcd URL (TANDEM_ETCD)")
    dr.add_argument("--cluster", default=os.environ.get("TANDEM_CLUSTER", "default"))
    dr.add_argument("--grace-s", type=float, default=60.0, help="at most this long to finish what it holds")
    dr.add_argument("--no-wait", action="store_true", help="ask, and do not wait for the node to leave")
    add_etcd_tls_args(dr)
    dr.set_defaults(fn=cmd_drain)

    ro = sub.add_parser("role", help="switch a node to the other role: it drains, then starts again in that role "
                                     "(same node id, no cluster restart)")
    ro.add_argument("node_id")
    ro.add_argument("role", nargs="?", choices=["prefill", "decode"])
    ro.add_argument("--clear", action="store_true",
                    help="instead: forget the role given before; the node takes its command line's at its next start")
    ro.add_argument("--etcd", default=os.environ.get("TANDEM_ETCD", ""), help="etcd URL (TANDEM_ETCD)")
    ro.add_argument("--cluster", default=os.environ.get("TANDEM_CLUSTER", "default"))
    ro.add_argument("--grace-s", type=float, default=60.0, help="at most this long to finish what it holds")
    ro.add_argument("--timeout-s", type=float, default=600.0,
                    help="how long to wait for it to join in the new role (its engine starts meanwhile)")
    ro.add_argument("--no-wait", action="store_true", help="ask, and do not wait for it to come back")
    add_etcd_tls_args(ro)
    ro.set_defaults(fn=cmd_role)

    from .local.chaos_cmd import add_chaos_args, cmd_chaos

    ch = sub.add_parser("chaos", help="inject faults into a local cluster under load; report what was kept")
    add_chaos_args(ch)
    ch.set_defaults(fn=cmd_chaos)

    be = sub.add_parser("bench", help="measure serving performance")
    bsub = be.add_subparsers(dest="bench_cmd", required=True)
    br = bsub.add_parser("run", help="one open-loop run of a seeded workload against a target")
    from tandem.bench.run import add_goodput_args, add_run_args, cmd_goodput, cmd_run

    add_run_args(br)
    br.set_defaults(fn=cmd_run)
    bg = bsub.add_parser("goodput", help="find the highest rate at which >= 90%% of requests meet both SLOs")
    add_goodput_args(bg)
    bg.set_defaults(fn=cmd_goodput)
    from tandem.bench.compare import add_compare_args, cmd_compare

    bc = bsub.add_parser("compare", help="Tandem vs colocated vLLM on the same cores, one report")
    add_compare_args(bc)
    bc.set_defaults(fn=cmd_compare)

    from tandem.bench.coordinator_load import add_args as add_coordinator_bench_args
    from tandem.bench.coordinator_load import cmd_coordinator as cmd_coordinator_bench

    bco = bsub.add_parser("coordinator", help="what the coordinator adds per request and per token, with "
                                              "simulated nodes behind it (added TTFT, CPU per request/token)")
    add_coordinator_bench_args(bco)
    bco.set_defaults(fn=cmd_coordinator_bench)

    from tandem.bench.admission_cost import add_args as add_admission_bench_args
    from tandem.bench.admission_cost import cmd_admission as cmd_admission_bench

    bad = bsub.add_parser("admission", help="the CPU one admission decision costs, by pool size and "
                                             "--admission-candidates (a synthetic busy cluster, no nodes)")
    add_admission_bench_args(bad)
    bad.set_defaults(fn=cmd_admission_bench)

    from tandem.bench.relay_cost import add_args as add_relay_bench_args
    from tandem.bench.relay_cost import cmd_relay as cmd_relay_bench

    brl = bsub.add_parser("relay", help="the CPU the coordinator's own code spends a streamed message, by "
                                        "--stream-interval (in one process, no network)")
    add_relay_bench_args(brl)
    brl.set_defaults(fn=cmd_relay_bench)

    from tandem.bench.prefill_scatter import add_args as add_scatter_args
    from tandem.bench.prefill_scatter import cmd_scatter

    bsc = bsub.add_parser("scatter", help="how far a prefill's time scatters around a model of its tokens fitted in "
                                          "hindsight, through a real 1:1 cluster and in one engine pinned alone: "
                                          "the floor under admission's TTFT error on this host")
    add_scatter_args(bsc)
    bsc.set_defaults(fn=cmd_scatter)

    from tandem.bench.shift import add_args as add_shift_args
    from tandem.bench.shift import cmd_shift

    bsh = bsub.add_parser("shift", help="a workload that shifts halfway (prefill-bound, then decode-bound) on "
                                        "simulated nodes, with and without `tandem plan --live --apply`")
    add_shift_args(bsh)
    bsh.set_defaults(fn=cmd_shift)

    from tandem.bench.kvstore_tiers import add_args as add_kvstore_bench_args
    from tandem.bench.kvstore_tiers import cmd_kvstore as cmd_kvstore_bench

    bk = bsub.add_parser("kvstore", help="TTFT of the same long-prefix requests: recomputed, from the engine's "
                                         "cache, from the KV store's RAM tier, from its disk tier")
    add_kvstore_bench_args(bk)
    bk.set_defaults(fn=cmd_kvstore_bench)

    from tandem.plan import add_args as add_plan_args
    from tandem.plan import cmd_plan

    pl = sub.add_parser("plan", help="the best prefill:decode ratio for a workload and SLOs, simulated from "
                                     "node profiles (goodput per split of --nodes)")
    add_plan_args(pl)
    pl.set_defaults(fn=cmd_plan)

    kv = sub.add_parser("kvstore", help="look at or clear a KV store's disk tier")
    kvsub = kv.add_subparsers(dest="kvstore_cmd", required=True)
    ks = kvsub.add_parser("stats", help="chunks and bytes held in a disk tier directory")
    ks.add_argument("--dir", required=True, help="the node's --kvstore-dir")
    ks.add_argument("--verify", action="store_true",
                    help="read every chunk and check it; the ones that fail are removed and counted")
    ks.set_defaults(fn=cmd_kvstore_stats)
    kc = kvsub.add_parser("clear", help="remove every chunk from a disk tier directory")
    kc.add_argument("--dir", required=True)
    kc.set_defaults(fn=cmd_kvstore_clear)

    mo = sub.add_parser("model", help="model utilities")
    msub = mo.add_subparsers(dest="model_cmd", required=True)
    mt = msub.add_parser("make-tiny", help="write the seeded random-weight tiny Llama (HF format)")
    mt.add_argument("path")
    mt.add_argument("--seed", type=int, default=0)
    mt.add_argument("--preset", choices=["tiny", "bench"], default="tiny",
                    help="tiny: quick tests (1.5 M parameters); bench: compute-bound prefill (~25 M)")
    mt.set_defaults(fn=cmd_make_tiny)
    from . import __version__

    ap.add_argument("--version", action="version", version=f"tandem {__version__}")
    annotate_help(ap)
    return ap


# The daemons read every flag from a TANDEM_<FLAG> variable too; other commands only their TLS flags.
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(given)
    args.given_argv = given[given.index(args.cmd) + 1:] if args.cmd in given else []  # the command's own flags
    if args.cmd in ("prefill", "decode"):
        from .node.engine_args import parse_engine_args

        try:
            args.engine_args = parse_engine_args(extra)
        except ValueError as exc:
            print(f"tandem {args.cmd}: {exc}", file=sys.stderr)
            return 2
        except ImportError as exc:
            print(f"tandem {args.cmd}: {' '.join(extra)}: vLLM engine flags need vLLM, which does not import "
                  f"here ({exc}): install tandem-serve[cpu] or [gpu]", file=sys.stderr)
            return 2
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
