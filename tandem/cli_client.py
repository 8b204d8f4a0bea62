"""The `tandem` commands that are clients of a running coordinator or node: generate, status, probe."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tls import TlsConfig


def cmd_generate(args: argparse.Namespace) -> int:
    from .client import AsyncClient
    from .errors import TandemError

    try:
        tls = _client_tls(args)
        if args.retries < 0:
            raise ValueError(f"--retries must be >= 0, got {args.retries}")
    except ValueError as exc:
        print(f"tandem generate: {exc}", file=sys.stderr)
        return 2

    async def go() -> int:
        t0 = time.perf_counter()
        n = 0
        kw: dict[str, object] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        if args.seed is not None:
            kw["seed"] = args.seed
        try:
            async with AsyncClient(args.target, tls=tls, retries=args.retries) as client:
                async for msg in client.stream(args.prompt, **kw):
                    n += len(msg.token_ids)
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
                    if msg.finish is None:
                        continue
                    f = msg.finish
                    dt = time.perf_counter() - t0
                    print(f"\n[finish={f.reason} tokens={f.usage.completion_tokens} ttft={f.timings.ttft_s:.3f}s "
                          f"e2e={dt:.3f}s prefill={f.timings.prefill_node} decode={f.timings.decode_node}]",
                          file=sys.stderr)
        except TandemError as exc:
            print(f"\ntandem generate: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(go())


def _client_tls(args: argparse.Namespace) -> "TlsConfig":
    from .tls import TlsConfig

    return TlsConfig(args.tls_cert, args.tls_key, args.tls_ca, server_name=args.tls_server_name).check("client")


def cmd_probe(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        tls = _client_tls(args)
    except ValueError as exc:
        print(f"tandem probe: {exc}", file=sys.stderr)
        return 2
    with tls.channel(args.target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout_s)
        except grpc.RpcError as exc:
            print(f"{args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.target}: {state}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def status_table(st: object, prev: dict[str, int] | None = None, interval_s: float = 0.0) -> list[str]:
    """The lines `tandem status` prints; with ``prev`` (each node's served count ``interval_s`` ago)
    a rate column too."""
    rate = prev is not None and interval_s > 0
    lines = [f"cluster {st.cluster}  model {st.model}",  # type: ignore[attr-defined]
             f"{'ROLE':8} {'NODE':24} {'GRPC':22} {'KV':22} {'STATE':9} {'OUTSTANDING':>11} {'SERVED':>8} "
             + (f"{'REQ/S':>6} " if rate else "")
             + f"{'QUEUE':>5} {'BATCH':>5} {'SAMPLES':>7} {'KV CHUNKS RAM/DISK':>18} {'ENGINE BLOCKS':>13}"]
    for n in st.nodes:  # type: ignore[attr-defined]
        state = "down" if n.down else "draining" if n.draining else "up"
        load = (f"{n.prefill_queue:>5} {n.decode_batch:>5} {n.perf_samples:>7} "
                f"{f'{n.kv_chunks_ram}/{n.kv_chunks_disk}':>18} {n.kv_engine_blocks:>13}" if n.load_age_s >= 0
                else f"{'-':>5} {'-':>5} {'-':>7} {'-':>18} {'-':>13}")
        per_s = ""
        if rate:
            was = prev.get(n.node_id)  # type: ignore[union-attr]
            per_s = f"{(n.served - was) / interval_s:>6.1f} " if was is not None and n.served >= was else f"{'-':>6} "
        lines.append(f"{n.role:8} {n.node_id:24} {n.grpc_address:22} {n.kv_address:22} {state:9} "
                     f"{n.outstanding:>11} {n.served:>8} {per_s}{load}")
    if not st.nodes:  # type: ignore[attr-defined]
        lines.append("(no nodes registered)")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    from .client import AsyncClient
    from .errors import TandemError

    try:
        tls = _client_tls(args)
        if args.watch < 0:
            raise ValueError(f"--watch must be >= 0 seconds, got {args.watch}")
    except ValueError as exc:
        print(f"tandem status: {exc}", file=sys.stderr)
        return 2

    async def go() -> int:
        async with AsyncClient(args.target, tls=tls, retries=0) as client:
            if not args.watch:
                print("\n".join(status_table(await client.status())))
                return 0
            # Ctrl-C ends it between two calls, never by cancelling one in flight: a grpc.aio call
            # cancelled by asyncio.run's own SIGINT handling could leave the channel's close hung
            # (seen once in CI: 30 s). A second Ctrl-C stops it at once.
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, lambda: os._exit(130) if stop.is_set() else stop.set())
            prev: dict[str, int] | None = None
            at = time.monotonic()
            while not stop.is_set():
                st = await client.status()
                now = time.monotonic()
                lines = status_table(st, prev, now - at)
                # home the cursor and clear the screen, then the table and when it was taken
                sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(lines)
                                 + f"\n\n{time.strftime('%H:%M:%S')}  every {args.watch:g} s  (Ctrl-C stops)\n")
                sys.stdout.flush()
                prev, at = {n.node_id: n.served for n in st.nodes}, now
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.watch)
            return 0

    try:
        return asyncio.run(go())
    except TandemError as exc:
        print(f"tandem status: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
