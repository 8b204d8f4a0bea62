"""`tandem profile`: measure a node's engine on this host, with its progress shown, and cache
the profile where a node with the same model, hardware and settings finds it when it starts
(and where `tandem plan` looks by default).

It runs the same startup profile a node runs (prefill time against uncached prompt tokens;
decode step time against batch and context), then KV transfer time against bytes: fetches of
several sizes between two processes over the node's transport, through Tandem's own block
server and fetcher (the node's startup profile has no transfer timings: a node learns them from
its first fetches). An existing profile for the same key is kept unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path


def add_args(ap: argparse.ArgumentParser) -> None:
    from tandem.node.config import add_node_args

    add_node_args(ap)  # the node's flags, each with its TANDEM_* variable; these three have none:
    own = [ap.add_argument("--role", choices=["prefill", "decode"], default="prefill",
                           help="the node kind whose settings to profile with (decode nodes step 256 tokens at most)"),
           ap.add_argument("--fresh", action="store_true",
                           help="measure again even when a profile for this key exists"),
           ap.add_argument("--transfer-mib", default="1,4,16,64",
                           help="KV fetch sizes to time, MiB (empty: no transfer timings)")]
    for action in own:
        setattr(action, "tandem_no_env", True)  # tandem.cli_help.NO_ENV


class Bar:
    """One line that redraws on a terminal (plain lines otherwise): profile [####----] 7/20 what."""

    def __init__(self, width: int = 28) -> None:
        self.width = width
        self.tty = sys.stdout.isatty()

    def __call__(self, msg: str) -> None:
        head, _, what = msg.partition(": ")
        label, _, count = head.rpartition(" ")
        try:
            done, total = (int(x) for x in count.split("/"))
        except ValueError:
            print(msg, flush=True)
            return
        filled = self.width * done // max(1, total)
        line = f"{label:8} [{'#' * filled}{'-' * (self.width - filled)}] {done}/{total} {what}"
        if self.tty:
            print("\r" + line.ljust(90), end="" if done < total else "\n", flush=True)
        else:
            print(line, flush=True)


def transfer_samples(transport: str, sizes_mib: list[int], cores: list[int], progress: Bar) -> list[tuple[int, float]]:
    """(bytes, median seconds) of KV fetches between two processes over ``transport`` (auto: UCX,
    else TCP, as a node picks), the server and the fetcher on two of ``cores`` (one core: both)."""
    from tandem.bench.kv_transfer import _bench_transport

    pair = (cores[0], cores[1]) if len(cores) >= 2 else None
    out = []
    for i, mib in enumerate(sizes_mib):
        row = _bench_transport(transport, [mib], 3, pair, quiet=True)["rows"][0]
        out.append((int(row["bytes"]), float(row["median_s"])))
        progress(f"transfer {i + 1}/{len(sizes_mib)}: {mib} MiB in {row['median_s'] * 1000:.1f} ms")
    return out


async def _profile(args: argparse.Namespace) -> int:
    from tandem.netutil import reserve_port
    from tandem.node.config import config_from_args, parse_cores, pin_process
    from tandem.node.engine import EngineHost
    from tandem.node.perf import NodePerf
    from tandem.profile import Profiler, cache_file, load_cached, node_cores, node_settings, profile_key, save
    from tandem.perfmodel import DECODE_KNEE
    from tandem.timings import Timings

    if not args.etcd:
        args.etcd = "unused://profile"  # a profile registers nowhere
    try:
        cfg = config_from_args(args.role, args)
        sizes = [int(m) for m in str(args.transfer_mib).split(",") if m.strip()]
    except ValueError as exc:
        print(f"tandem profile: {exc}", file=sys.stderr)
        return 2
    if cfg.cores:  # as `tandem prefill|decode --cores` runs: the whole process there (see tandem.cli.cmd_node)
        pin_process(cfg.cores)
    reservation = reserve_port(cfg.host, cfg.kv_port)
    kv_bind = f"{cfg.host}:{reservation.getsockname()[1]}"
    engine = EngineHost(cfg, kv_bind, f"profile-{uuid.uuid4().hex[:8]}", kv_port_reserved=True)
    print(f"starting the engine ({cfg.model}, {args.role} settings) ...", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, engine.start)
    finally:
        reservation.close()
    bar = Bar()
    try:
        key = profile_key(cfg.model, node_settings(cfg, engine), node_cores(cfg))
        path = cache_file(Path(cfg.profile_cache), key)
        if not args.fresh and (cached := load_cached(path, key)) is not None:
            print(f"a profile for this model, hardware and settings exists: {path} (--fresh measures again"
                  f"{'' if cached.transfer.samples else ', and adds the KV transfer timings it lacks'})")
            model = cached
        else:
            t0 = time.monotonic()
            perf = NodePerf(step_tokens=cfg.max_num_batched_tokens)
            perf.kv_room = engine.kv_room.tokens  # (as a node's: its decode runs fit the engine's KV cache)
            await Profiler(engine, perf, engine.vocab_size, engine.max_model_len, cfg.max_num_seqs, progress=bar,
                           seed=int.from_bytes(os.urandom(4), "little")).run()
            model = perf.model
            engine.shutdown()  # the transfer runs on these cores next
            save(path, key, model, time.monotonic() - t0)  # kept even if the transfer part fails
            if sizes:
                cores = sorted(parse_cores(cfg.cores)) if cfg.cores else sorted(os.sched_getaffinity(0))
                for nbytes, seconds in transfer_samples(cfg.transport, sizes, cores, bar):
                    model.saw_transfer(nbytes, seconds)
                save(path, key, model, time.monotonic() - t0)
            print(f"profiled in {time.monotonic() - t0:.1f} s; cached in {path}")
    finally:
        engine.shutdown()
    t = Timings.of_model(model, str(path))
    a, b, c = t.prefill
    d, e, f, j = t.decode
    g, h = t.transfer
    print(f"prefill  {a * 1000:.2f} ms + {b * 1e6:.2f} us/token + {c * 1e9:.3f} ns/token^2   (512 tokens: "
          f"{t.prefill_s(512) * 1000:.1f} ms)")
    print(f"decode   {d * 1000:.2f} ms + {e * 1000:.3f} ms/request + {f * 1e6:.3f} us/context token + "
          f"{j * 1000:.3f} ms/request past {DECODE_KNEE}   (batch 16 x 512: {t.step_s(16, 16 * 512) * 1000:.1f} ms per step)")
    print(f"transfer {g * 1000:.2f} ms + {h * 1e9:.3f} s/GB" if any(t.transfer) else
          "transfer (not measured)")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    return asyncio.run(_profile(args))
