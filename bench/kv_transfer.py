"""KV-transfer microbenchmark: GB/s moving 1-256 MiB of KV blocks between two processes.

Each transport (UCX, the TCP fallback) runs the decode side's real fetch path
(the prefill side sends straight from its cache, or gathers when blocks are scattered;
the decode side lands the bytes in its paged cache; the hold is freed when the send completes)
between a server process and a client process pinned to different cores; a
plain in-process memcpy of the same sizes is measured in the same run as the
baseline. Writes JSON results and a Markdown report with a PNG plot.

    python -m tandem.bench.kv_transfer --out bench/results/kv
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

from tandem.kvtransfer.transport import DEFAULT_CPU_UCX_TLS

LAYERS = 8
BLOCK_SHAPE = (2, 32, 128)  # kv heads, block size, 2 x head size (float32): 32 KiB per layer
FIELDS = {"block_size": 32, "num_kv_heads": 2, "head_size": 64}
BLOCK_BYTES = LAYERS * 2 * 32 * 128 * 4
GOAL_OF_MEMCPY = 0.25


def _kv(num_blocks: int, fill: bool):
    import torch

    from tandem.kvtransfer.paged import PagedKV

    make = torch.randn if fill else torch.zeros
    return PagedKV([make((num_blocks, *BLOCK_SHAPE)) for _ in range(LAYERS)], num_blocks, FIELDS)


def _server(conn, transport: str, num_blocks: int, core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    from tandem.kvtransfer.block_server import BlockServer
    from tandem.kvtransfer.transport import make_data_planes

    server = BlockServer("127.0.0.1", 0, _kv(num_blocks, True), make_data_planes(transport))
    conn.send(server.address)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        req_id, blocks = msg
        server.holds.hold(req_id, blocks, lease_s=60)
        conn.send("held")
    server.close()


def _memcpy_gbps(nbytes: int, reps: int) -> float:
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8)
    a.fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def _bench_transport(transport: str, sizes_mib: list[int], reps: int, cores: tuple[int, int] | None,
                     quiet: bool = False) -> dict:
    from tandem.kvtransfer.fetcher import BlockFetcher, LoadJob
    from tandem.kvtransfer.handle import TransferHandle
    from tandem.kvtransfer.transport import make_data_planes

    max_blocks = max(sizes_mib) * (1 << 20) // BLOCK_BYTES
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server, args=(child, transport, max_blocks + 1, cores[0] if cores else None))
    proc.start()
    child.close()  # the server's end: if it dies, recv() below ends instead of waiting forever
    before = os.sched_getaffinity(0)
    if cores:
        os.sched_setaffinity(0, {cores[1]})
    try:
        if not parent.poll(120):
            proc.kill()
            raise RuntimeError(f"the {transport} block server did not start in 120 s")
        address = parent.recv()
    except EOFError:
        os.sched_setaffinity(0, before)
        raise RuntimeError(f"the {transport} block server process died before it listened "
                           f"(exit code {proc.exitcode})") from None
    except BaseException:
        os.sched_setaffinity(0, before)
        raise
    fetcher = BlockFetcher(_kv(max_blocks + 1, False), make_data_planes(transport))
    rows = []
    try:
        for mib in sizes_mib:
            n = mib * (1 << 20) // BLOCK_BYTES
            blocks = list(range(n))
            times = []
            for r in range(reps + 1):  # the first is a warm-up (connection, registration)
                req = f"{transport}-{mib}-{r}"
                parent.send((req, blocks))
                parent.recv()
                t0 = time.perf_counter()
                handle = TransferHandle(engine_id="", address=address, remote_request_id=req, block_ids=blocks,
                                        num_tokens=0, lease_deadline=0.0)
                fetcher.submit(LoadJob(req, handle, blocks, blocks))
                while True:
                    done, failed = fetcher.take_results()
                    if done:
                        break
                    time.sleep(0.0002)
                if failed:
                    raise RuntimeError(f"{transport} fetch of {mib} MiB failed")
                if r:
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rows.append({"mib": mib, "bytes": n * BLOCK_BYTES, "blocks": n, "median_s": med,
                         "gbps": n * BLOCK_BYTES / med / 1e9, "min_s": min(times), "max_s": max(times)})
            if not quiet:
                print(f"  {transport:4} {mib:4d} MiB: {rows[-1]['gbps']:6.2f} GB/s (median of {reps})", flush=True)
    finally:
        # the fetcher's connections close while the server is still there to answer
        if not fetcher.close(wait_s=30):
            print(f"  the {transport} fetcher's lanes did not end in 30 s", flush=True)
        parent.send(None)
        proc.join(30)
        os.sched_setaffinity(0, before)
    return {"transport": transport, "rows": rows}


def _plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = [r["mib"] for r in results["memcpy"]]
    ax.plot(sizes, [r["gbps"] for r in results["memcpy"]], "k--", label="memcpy (one process)")
    for t in results["transports"]:
        ax.plot([r["mib"] for r in t["rows"]], [r["gbps"] for r in t["rows"]], "o-", label=f"Tandem fetch over {t['transport']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV bytes per fetch (MiB)")
    ax.set_ylabel("GB/s")
    ax.set_title("KV block transfer between two processes")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/kv", help="directory for results.json, report.md, plot")
    ap.add_argument("--sizes", default="1,4,16,64,256", help="MiB per fetch, comma separated")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--transports", default="ucx,tcp")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpus = sorted(os.sched_getaffinity(0))
    cores = (cpus[0], cpus[1]) if len(cpus) >= 2 else None
    print(f"KV transfer benchmark: sizes {sizes} MiB, {args.reps} reps, cores {cores}", flush=True)
    memcpy = [{"mib": m, "gbps": _memcpy_gbps(m << 20, args.reps)} for m in sizes]
    for r in memcpy:
        print(f"  memcpy {r['mib']:4d} MiB: {r['gbps']:6.2f} GB/s", flush=True)
    transports = [_bench_transport(t, sizes, args.reps, cores) for t in args.transports.split(",")]
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "block_bytes": BLOCK_BYTES, "layers": LAYERS, "reps": args.reps, "memcpy": memcpy,
               "transports": transports, "goal_fraction_of_memcpy": GOAL_OF_MEMCPY}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plotted = _plot(results, out / "kv_transfer.png")
    lines = ["# KV transfer microbenchmark", "",
             f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs; server and client "
             f"pinned to cores {cores}. Fetch path: the decode side's real one, consecutive blocks sent straight "
             f"from cache to cache, the hold freed on send completion; UCX_TLS="
             f"{os.environ.get('UCX_TLS', DEFAULT_CPU_UCX_TLS)}. Median of {args.reps} runs; memcpy measured in "
             "the same run.", "",
             "| MiB | memcpy GB/s | " + " | ".join(f"{t['transport']} GB/s | {t['transport']} / memcpy"
                                                  for t in transports) + " |",
             "|---:|---:|" + "---:|---:|" * len(transports)]
    for i, m in enumerate(memcpy):
        cells = []
        for t in transports:
            g = t["rows"][i]["gbps"]
            cells += [f"{g:.2f}", f"{g / m['gbps']:.2f}"]
        lines.append(f"| {m['mib']} | {m['gbps']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"Goal: at least {GOAL_OF_MEMCPY:.0%} of memcpy between processes on one host."]
    for t in transports:
        worst = min(r["gbps"] / m["gbps"] for r, m in zip(t["rows"], memcpy))
        big = t["rows"][-1]["gbps"] / memcpy[-1]["gbps"]
        lines.append(f"- {t['transport']}: {big:.0%} of memcpy at {t['rows'][-1]['mib']} MiB, "
                     f"{worst:.0%} at worst; goal {'met' if worst >= GOAL_OF_MEMCPY else 'not met'} across sizes.")
    if plotted:
        lines += ["", "![KV transfer](kv_transfer.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
