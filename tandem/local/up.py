"""`tandem up`: a one-machine cluster in the foreground, a demo completion, Ctrl-C to stop."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time

from tandem.client import AsyncClient
from .cluster import ClusterSpec, LocalCluster, StartStopped


def _say(msg: str) -> None:
    print(f"[tandem up] {msg}", flush=True)


async def _demo(address: str, prompt: str, max_tokens: int) -> None:
    _say(f"demo completion (greedy, {max_tokens} tokens) for: {prompt!r}")
    t0 = time.perf_counter()
    ttft = None
    n = 0
    sys.stdout.write("  ")
    async with AsyncClient(address, retries=0) as client:
        async for msg in client.stream(prompt, max_tokens=max_tokens, temperature=0.0):
            if ttft is None and msg.token_ids:
                ttft = time.perf_counter() - t0
            n += len(msg.token_ids)
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            if msg.finish is None:
                continue
            dt = time.perf_counter() - t0
            decode_rate = (n - 1) / (dt - (ttft or 0)) if n > 1 and dt > (ttft or 0) else 0.0
            print()
            _say(f"finish={msg.finish.reason} tokens={n} TTFT={ttft or 0:.3f}s "
                 f"decode={decode_rate:.1f} tok/s e2e={dt:.3f}s "
                 f"(prefill on {msg.finish.timings.prefill_node}, decode on {msg.finish.timings.decode_node})")


def run_up(args: argparse.Namespace) -> int:
    from .model import ensure_default_model

    model = args.model
    if not model:
        _say("making the default seeded tiny model (once) ...")
        model = str(ensure_default_model())
    spec = ClusterSpec(model=model, num_prefill=args.prefill, num_decode=args.decode,
                       transport=args.kv_transport, kv_cache_gib=args.kv_cache_gib,
                       decode_kv_cache_gib=args.decode_kv_cache_gib, etcd=args.etcd,
                       grpc_port=args.grpc_port, http_port=args.http_port, log_dir=args.log_dir,
                       supervise=True, kvstore_ram_gib=args.kvstore_ram_gib, kvstore_root=args.kvstore_dir)
    cluster = LocalCluster(spec, on_event=lambda ev: _say(f"supervisor: {ev.daemon} {ev.what} {ev.detail}".rstrip()))
    _say(f"starting etcd, a coordinator, {args.prefill} prefill and {args.decode} decode node(s); "
         f"logs in {cluster.log_dir}")
    _say("vLLM engines take about half a minute each to start on CPU ...")
    t0 = time.monotonic()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        try:
            cluster.start(progress=_say, stop=stop)
        except StartStopped:
            _say("stopped during start-up")
            return 130
        _say(f"ready in {time.monotonic() - t0:.0f} s")
        _say(f"etcd         {cluster.etcd_url}")
        _say(f"coordinator  gRPC {cluster.grpc_address}   OpenAI HTTP {cluster.http_url}")
        for d in cluster.nodes:
            _say(f"{d.role:8} {d.name:12} gRPC {d.info.get('grpc')}  KV {d.info.get('kv')}  "
                 f"metrics http://{d.info.get('metrics')}/metrics")
        asyncio.run(_demo(cluster.grpc_address, args.prompt, args.max_tokens))
        if args.exit_after_demo:
            return 0
        _say(f"serving; try: tandem generate 'hello' --target {cluster.grpc_address}   (Ctrl-C stops)")
        _say("a daemon that dies or stops answering is restarted; the others keep serving")
        while not stop.wait(1.0):
            pass
        return 0
    except Exception as exc:
        _say(f"failed: {exc}")
        return 1
    finally:
        _say("stopping all daemons ...")
        cluster.stop()
        _say("stopped")
