"""`tandem bench coordinator`: what the coordinator itself adds, with simulated nodes behind it.

The coordinator runs pinned to its own core(s); simulated prefill and decode nodes
(`--simulate`, times from a fixed profile) and the load generator share the rest. Each
probe sends open-loop Poisson arrivals at one rate over gRPC and measures, per request:

- **added TTFT**: the client's TTFT minus the prefill node's own time for it (the node
  reports it): ingress, tokenizing (prompts are text), admission, routing, any wait in
  the coordinator's prefill queue (none while the nodes keep up), the prefill call's
  round trip, the relay of the first token;
- **inside the coordinator**: the part of it the coordinator timed (the request's finish
  carries its parts): from its receipt (after tokenizing) to the prefill call's going out
  (its turn in the prefill order included), and from the first token's return to its
  detokenizing (the message's build and write come after). No client stack, no load generator
  and no node call in it; beside it, the prefill call's time less the node's own (the node
  stream's round trip, and the coordinator's wake-up for the reply);
- **CPU per request and per token**: the coordinator process's CPU time over the probe
  (from /proc) divided by the requests and tokens it relayed.

A probe whose load generator fell behind its schedule (it shares its core with the nodes)
says so: the rate it reached is reported beside the one asked for, with its send lag and how
busy the load side's cores were; a probe where they were saturated is marked load-bound (its
latencies measured the load side as much as the coordinator). With py-spy installed
the report adds where the coordinator's time goes at the highest rate (top functions).

The baseline, measured in the same run at the same rates on the same core (``--floor``, on by
default): grpc.aio alone making the same three calls a request costs, with the same messages,
and nothing else (bench/grpc_floor.py). The coordinator's CPU per request less the floor's is
what Tandem's own code costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandem.local.procs import process_tree

from .coordinator_report import load_side_words, write_report

# A node's fixed times: the coordinator's share stands out against them.
PROFILE = {"prefill": [0.002, 0.0, 0.0], "decode": [0.005, 0.0, 0.0], "transfer": [0.0005, 0.0]}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def cores_busy_seconds(cores: set[int]) -> tuple[float, float]:
    """(busy, all) seconds the cores have counted since boot (/proc/stat; idle and iowait are not busy)."""
    busy = every = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            t = [int(x) for x in ticks]
            every += sum(t[:8])  # (guest time is in user already)
            busy += sum(t[:8]) - t[3] - t[4]
    hz = os.sysconf("SC_CLK_TCK")
    return busy / hz, every / hz


def inside_s(t: Any) -> float:
    """Of a request's TTFT (its finish's ``Timings``), the part the coordinator timed as its own:
    from its receipt (after tokenizing) to the prefill call's going out, its turn in the prefill
    order included, and from the first token's return to its detokenizing. The node call between
    is left out (a local prefill's call is all of ``prefill_call_s``)."""
    return float(t.dispatch_s + max(0.0, t.ttft_s - t.dispatch_s - t.prefill_call_s))


def pct(vals: list[float], q: float) -> float:
    """The benchmarks' own percentile (linear interpolation), q in [0, 1]."""
    from .metrics import percentile

    return percentile(vals, q * 100)


async def open_loop(rng: random.Random, rate: float, duration_s: float,
                    one: Callable[[int, float], Any]) -> tuple[int, float]:
    """Poisson arrivals at ``rate`` for ``duration_s``: ``one(k, when it was due)`` started for each,
    open loop (never waiting for one to end); then all of them awaited. (requests, seconds sending)."""
    t_start = time.perf_counter()
    tasks, t, i = [], 0.0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        delay = t_start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, t_start + t)))
        i += 1
    sent_s = time.perf_counter() - t_start
    await asyncio.gather(*tasks)
    return i, sent_s


async def probe(address: str, rate: float, duration_s: float, prompt_tokens: int, output_tokens: int,
                seed: int) -> dict[str, Any]:
    import grpc

    from tandem.proto import tandem_pb2 as pb
    from tandem.proto import tandem_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    words = ["prefill", "decode", "node", "cache", "key", "value", "sends", "the", "to", "fast"]
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    stubs = [pb_grpc.CoordinatorStub(ch) for ch in channels]
    added, ttfts, errors, tokens, messages, lag = [], [], 0, 0, 0, []
    inside, node_call = [], []

    async def one(i: int, at: float) -> None:
        nonlocal errors, tokens, messages
        # text, so the coordinator tokenizes it (about one token per word here)
        text = " ".join(rng.choice(words) for _ in range(prompt_tokens))
        req = pb.GenerateRequest(text=text, sampling=pb.SamplingParams(
            max_tokens=output_tokens, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        lag.append(t0 - at)
        first = None
        try:
            async for msg in stubs[i % len(stubs)].Generate(req, timeout=60):
                if first is None and msg.token_ids:
                    first = time.perf_counter()
                tokens += len(msg.token_ids)
                messages += 1
                if msg.HasField("finish"):
                    t = msg.finish.timings
                    if first is not None:
                        ttfts.append(first - t0)
                        added.append(first - t0 - t.prefill_s)
                    if t.ttft_s > 0:  # (as the coordinator timed them)
                        inside.append(inside_s(t))
                        node_call.append(t.prefill_call_s - t.prefill_s)
        except grpc.aio.AioRpcError:
            errors += 1

    i, sent_s = await open_loop(rng, rate, duration_s, one)
    for ch in channels:
        await ch.close()
    return {"rate": rate, "requests": i, "sent_rate": i / sent_s if sent_s else 0.0, "errors": errors,
            "tokens": tokens, "messages": messages, "added_ttft_p50_ms": pct(added, 0.5) * 1000, "added_ttft_p99_ms": pct(added, 0.99) * 1000,
            "ttft_p50_ms": pct(ttfts, 0.5) * 1000, "ttft_p99_ms": pct(ttfts, 0.99) * 1000,
            "send_lag_p99_ms": pct(lag, 0.99) * 1000,
            "inside_p50_ms": pct(inside, 0.5) * 1000 if inside else None,
            "inside_p99_ms": pct(inside, 0.99) * 1000 if inside else None,
            "node_call_p50_ms": pct(node_call, 0.5) * 1000 if node_call else None,
            "node_call_p99_ms": pct(node_call, 0.99) * 1000 if node_call else None}


async def probe_http(base_url: str, rate: float, duration_s: float, prompt_tokens: int, output_tokens: int,
                     seed: int) -> dict[str, Any]:
    """``probe`` over the OpenAI HTTP API: /v1/completions streamed as server-sent events, the
    usage chunk asked for (its completion tokens are the tokens counted). The stream carries no
    node timings, so there is no added TTFT here, only the client's TTFT."""
    import aiohttp

    rng = random.Random(seed)
    words = ["prefill", "decode", "node", "cache", "key", "value", "sends", "the", "to", "fast"]
    ttfts, errors, tokens, messages, lag = [], 0, 0, 0, []

    async def one(session: aiohttp.ClientSession, at: float) -> None:
        nonlocal errors, tokens, messages
        body = {"prompt": " ".join(rng.choice(words) for _ in range(prompt_tokens)), "max_tokens": output_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        lag.append(t0 - at)
        first, usage = None, None
        try:
            async with session.post(f"{base_url}/v1/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=60)) as resp:
                if resp.status != 200:
                    errors += 1
                    return
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:  # the stream ended by an error
                        errors += 1
                        return
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    elif chunk["choices"]:
                        messages += 1
                        if first is None and chunk["choices"][0]["text"]:
                            first = time.perf_counter()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            errors += 1
            return
        if usage is None or first is None:
            errors += 1
            return
        tokens += usage["completion_tokens"]
        ttfts.append(first - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        i, sent_s = await open_loop(rng, rate, duration_s, lambda k, at: one(session, at))
    return {"rate": rate, "requests": i, "sent_rate": i / sent_s if sent_s else 0.0, "errors": errors,
            "tokens": tokens, "messages": messages, "added_ttft_p50_ms": None, "added_ttft_p99_ms": None,
            "ttft_p50_ms": pct(ttfts, 0.5) * 1000, "ttft_p99_ms": pct(ttfts, 0.99) * 1000,
            "send_lag_p99_ms": pct(lag, 0.99) * 1000}


def measured_probe(address: str, rate: float, args: argparse.Namespace, seed: int,
                   cpu: Callable[[], float], http_url: str = "", load_cores: set[int] | frozenset[int] = frozenset()
                   ) -> dict[str, Any]:
    """One probe (``probe``, or ``probe_http`` at ``http_url`` when given) and what ``cpu`` (CPU
    seconds of the process(es) under test) counted over it: the probe's row with that CPU's share
    of the wall time and per request and token; with ``load_cores`` (those of the load generator
    and the nodes), how busy they were (``load_cores_busy``, 0-1)."""
    import uvloop

    b0 = cores_busy_seconds(set(load_cores)) if load_cores else None
    c0, w0 = cpu(), time.perf_counter()
    if http_url:
        row = uvloop.run(probe_http(http_url, rate, args.duration, args.prompt_tokens, args.output_tokens, seed))
    else:
        row = uvloop.run(probe(address, rate, args.duration, args.prompt_tokens, args.output_tokens, seed))
    used, wall = cpu() - c0, time.perf_counter() - w0
    row.update({"cpu_share": used / wall, "cpu_us_per_request": used / max(1, row["requests"]) * 1e6,
                "cpu_us_per_token": used / max(1, row["tokens"]) * 1e6, "tokens_per_s": row["tokens"] / wall})
    if b0 is not None:
        b1 = cores_busy_seconds(set(load_cores))
        row["load_cores_busy"] = (b1[0] - b0[0]) / max(1e-9, b1[1] - b0[1])
    return row


def py_spy_top(pid: int, seconds: float, out: Path) -> list[tuple[str, float]]:
    """The coordinator's top functions by own samples (py-spy record, raw), or [] without py-spy."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return []
    raw = out / "coordinator-profile.txt"
    subprocess.run([exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--format", "raw",
                    "--rate", "200", "--output", str(raw), "--nonblocking", "--gil"], capture_output=True, timeout=seconds + 60)
    if not raw.exists():
        return []
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        own[leaf] = own.get(leaf, 0) + int(n)
        total += int(n)
    return [(k, v / total) for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:15]] if total else []


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rates", default="100,250,500,1000", help="arrival rates to probe, req/s")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per probe")
    ap.add_argument("--prefill", type=int, default=4, help="simulated prefill nodes")
    ap.add_argument("--decode", type=int, default=4, help="simulated decode nodes")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1,
                    help="the coordinator's --workers (processes behind one address, all on its cores)")
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="the coordinator's --stream-interval (tokens per streamed message after the first)")
    ap.add_argument("--coordinator-cores", default="0", help="the coordinator's cores; the rest run the "
                                                             "nodes and the load generator")
    ap.add_argument("--model", default="", help="the tokenizer's model dir (default: the seeded tiny model)")
    ap.add_argument("--node-calls", default="stream",
                    help="the coordinator's --node-calls, one cluster each in turn: stream, call, or "
                         "stream,call (the same rates for both, and the baseline both ways)")
    ap.add_argument("--api", default="grpc",
                    help="the clients' front end: grpc (Generate), http (/v1/completions streamed as server-sent "
                         "events), or both, comma-separated (the baseline is gRPC's)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the baseline: grpc.aio alone making the same calls (bench/grpc_floor.py)")
    ap.add_argument("--out", default="bench/results/coordinator")


def cmd_coordinator(args: argparse.Namespace) -> int:
    import uvloop

    from tandem.local.cluster import ClusterSpec, LocalCluster
    from tandem.local.model import ensure_default_model
    from tandem.node.config import core_spec, parse_cores, pin_threads

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(PROFILE))
    mine = set(parse_cores(args.coordinator_cores))
    if not mine < set(os.sched_getaffinity(0)):
        raise SystemExit(f"--coordinator-cores {args.coordinator_cores}: must be some, not all, of the cores this "
                         f"process may use ({sorted(os.sched_getaffinity(0))})")
    rest = sorted(set(os.sched_getaffinity(0)) - mine)
    if not rest:
        raise SystemExit("--coordinator-cores must leave at least one core for the nodes and the load generator")
    model = args.model or str(ensure_default_model())
    modes = [m.strip() for m in args.node_calls.split(",") if m.strip()]
    if not modes or any(m not in ("stream", "call") for m in modes) or len(set(modes)) != len(modes):
        raise SystemExit(f"--node-calls: stream, call or both, comma-separated; got {args.node_calls!r}")
    apis = [a.strip() for a in args.api.split(",") if a.strip()]
    if not apis or any(a not in ("grpc", "http") for a in apis) or len(set(apis)) != len(apis):
        raise SystemExit(f"--api: grpc, http or both, comma-separated; got {args.api!r}")
    rates = [float(r) for r in args.rates.split(",")]
    rows: list[dict[str, Any]] = []
    top: list[tuple[str, float]] = []
    for mode in modes:
        spec = ClusterSpec(model=model, num_prefill=args.prefill, num_decode=args.decode, max_model_len=2048,
                           cores=[core_spec(rest)] * (args.prefill + args.decode), log_dir=str(out / "logs" / mode),
                           extra_node_args=["--simulate", str(out / "profile.json")],
                           extra_coordinator_args=["--conditional-disagg", "off",
                                                   "--stream-interval", str(args.stream_interval),
                                                   "--workers", str(args.workers), "--node-calls", mode])
        with LocalCluster(spec) as cluster:
            assert cluster.coordinator is not None and cluster.coordinator.proc is not None
            pids = process_tree(cluster.coordinator.proc.pid)  # with --workers: the supervisor and its workers
            pid = pids[-1]  # the one py-spy looks at (a worker, with several)
            for p in pids:
                pin_threads(p, mine)
            pin_threads(os.getpid(), set(rest))
            print(f"--node-calls {mode}: coordinator pid {pid} on cores {sorted(mine)}; {args.prefill} + "
                  f"{args.decode} simulated nodes and the load generator on {rest}", flush=True)
            uvloop.run(probe(cluster.grpc_address, 20, 3, args.prompt_tokens, args.output_tokens, 99))  # warm-up
            for api in apis:
                for k, rate in enumerate(rates):
                    spy = None
                    if (mode, api) == (modes[0], apis[0]) and k == len(rates) - 1:  # where the time goes, at the top rate
                        import threading

                        spy = threading.Thread(target=lambda: top.extend(py_spy_top(pid, args.duration * 0.8, out)))
                        spy.start()
                    row = measured_probe(cluster.grpc_address, rate, args, k, lambda: tree_cpu_seconds(pids),
                                         http_url=cluster.http_url if api == "http" else "", load_cores=set(rest))
                    if spy is not None:
                        spy.join()
                    row["coordinator_cpu_share"] = row.pop("cpu_share")
                    row["node_calls"] = mode
                    row["api"] = api
                    rows.append(row)
                    added = ("added TTFT n/a" if row["added_ttft_p50_ms"] is None else
                             f"added TTFT p50 {row['added_ttft_p50_ms']:.2f} ms, p99 {row['added_ttft_p99_ms']:.2f} ms")
                    if row.get("inside_p50_ms") is not None:
                        added += (f" (inside the coordinator p50 {row['inside_p50_ms']:.2f} ms, p99 "
                                  f"{row['inside_p99_ms']:.2f} ms; node call beyond the node's time p50 "
                                  f"{row['node_call_p50_ms']:.2f} ms)")
                    print(f"  {api}, {rate:g} req/s (sent {row['sent_rate']:.0f}): {added}, TTFT p50 "
                          f"{row['ttft_p50_ms']:.2f} ms; coordinator CPU {row['coordinator_cpu_share']:.0%}, "
                          f"{row['cpu_us_per_request']:.0f} us/request, {row['cpu_us_per_token']:.1f} us/token; "
                          f"errors {row['errors']}; {load_side_words(row)}", flush=True)
    floor = [r for mode in modes for r in measure_floor(rates, args, mine, set(rest), mode)] if args.floor else []
    for row in rows:
        base = next((b for b in floor if b["node_calls"] == row["node_calls"] and b["rate"] == row["rate"]), None)
        if base is not None and row["api"] == "grpc":
            row["floor_cpu_us_per_request"] = base["cpu_us_per_request"]
    doc = {"profile": PROFILE, "prefill_nodes": args.prefill, "decode_nodes": args.decode,
           "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
           "stream_interval": args.stream_interval, "workers": args.workers, "node_calls": modes, "apis": apis,
           "coordinator_cores": sorted(mine), "other_cores": rest, "rows": rows,
           "top_functions": [[f, s] for f, s in top], "floor_rows": floor,
           "goal": "added TTFT p99 <= 1 ms at 1,000 req/s; relay >= 100k tokens/s per coordinator process"}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_report(out, doc)
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0


def measure_floor(rates: list[float], args: argparse.Namespace, mine: set[int], rest: set[int],
                  mode: str = "call") -> list[dict[str, Any]]:
    """The baseline at each rate: bench/grpc_floor.py's relay on the coordinator's cores, its nodes
    and the load generator on the rest; the relay's CPU per request. ``mode``: its node calls, a
    gRPC call each (``call``) or messages on one stream (``stream``), as ``--node-calls``."""
    import uvloop

    from tandem.netutil import free_port
    from tandem.node.config import pin_threads

    node_port, relay_port = free_port(), free_port()
    procs: list[subprocess.Popen[str]] = []
    rows = []
    try:
        for argv, cores in ((["nodes", str(node_port)], rest),
                            (["relay", str(relay_port), f"127.0.0.1:{node_port}", str(args.stream_interval),
                              str(args.prompt_tokens), mode], mine)):
            proc = subprocess.Popen([sys.executable, "-m", "tandem.bench.grpc_floor", *argv], stdout=subprocess.PIPE,
                                    text=True)
            procs.append(proc)
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            if not ready or proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"the grpc.aio baseline's {argv[0]} did not start within 60 s (exit {proc.poll()})")
            pin_threads(proc.pid, cores)
        relay = procs[-1].pid
        address = f"127.0.0.1:{relay_port}"
        uvloop.run(probe(address, 20, 3, args.prompt_tokens, args.output_tokens, 99))  # warm-up
        for k, rate in enumerate(rates):
            row = measured_probe(address, rate, args, k, lambda: cpu_seconds(relay), load_cores=rest)
            row["node_calls"] = mode
            rows.append(row)
            print(f"  baseline ({mode}), grpc.aio alone making the same calls, {rate:g} req/s (sent {row['sent_rate']:.0f}): "
                  f"added TTFT p50 {row['added_ttft_p50_ms']:.2f} ms, p99 {row['added_ttft_p99_ms']:.2f} ms; "
                  f"CPU {row['cpu_share']:.0%}, {row['cpu_us_per_request']:.0f} us/request; errors {row['errors']}; "
                  f"{load_side_words(row)}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    add_args(ap)
    sys.exit(cmd_coordinator(ap.parse_args()))
