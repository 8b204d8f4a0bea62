"""`tandem plan`: the best prefill:decode ratio for a workload and its SLOs, from node profiles.

For every split of ``--nodes`` into P prefill and D decode nodes, the
simulator (tandem/sim.py) plays seeded traces of the workload at a rate
found by bisection (DistServe goodput: the highest rate with at least 90 %
of requests meeting both objectives, tandem/bench/goodput.py), and the plan
ranks the splits by goodput per node. Each row also says which objective
gave out first just above its goodput, so the engineer sees why.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import astuple, replace
from pathlib import Path
from typing import Any

from tandem.bench.goodput import find_goodput
from tandem.bench.workloads import WORKLOADS, generate
from tandem.mix import Mix
from tandem.nodespeed import Speed
from tandem.plan_report import table, write_report
from tandem.sim import simulate
from tandem.simconfig import COLOCATE_OFF, LOCAL_OFF, NO_PREFIX_CACHE, NOT_MODELLED, SimConfig
from tandem.simresults import attainment, summary
from tandem.timings import Timings

SHARING = ("prefix-heavy", "multi-turn")  # the workloads whose prompts share prefixes


def trace(workload: str | Mix, rate: float, requests: int, seed: int, max_model_len: int,
          ids: bool = False, prefixes: int = 0) -> list[Any]:
    """About ``requests`` arrivals of the workload (a `tandem bench` workload, or a mix a
    coordinator measured) at ``rate``: lengths only, and with ``ids`` the token ids of the
    workloads whose prompts share prefixes (for the simulator's prefix caches). ``prefixes``:
    prefix-heavy's prefixes, multi-turn's conversations (0: the workload's own number)."""
    if isinstance(workload, Mix):
        return workload.trace(rate, requests, seed, max_model_len)
    return generate(workload, rate=rate, duration_s=requests / rate, seed=seed, max_model_len=max_model_len,
                    with_ids=ids and workload in SHARING, prefixes_n=prefixes or None)


MIN_DURATION_S = 300.0
DECODE_BACKLOG_S = 1.0  # a mean wait for a decode batch above this, and growing: past the pool's capacity
COARSE_SPLITS = 16  # more splits than this: a coarse pass of about this many, then a fine one near its best


def steady_attainment(outcomes: list[Any], slo_ttft_s: float, slo_tpot_s: float) -> float:
    """A probe's attainment as the cluster would hold it: the lowest of all its requests' and the
    last third of its arrivals'; when the last third is clearly worse than the middle third (by
    more than two standard errors, and 2 points), where that trend leads one third later; and 0
    when the wait for a place in a decode batch grows (past DECODE_BACKLOG_S, half as much again
    as in the middle third). A rate just above what the cluster serves builds a backlog slowly: a
    probe's share can clear the target while its last requests already miss, and more so the
    longer it runs."""
    if not outcomes:
        return 0.0
    end = outcomes[-1].arrival_s
    mid = [o for o in outcomes if end / 3 <= o.arrival_s < end * 2 / 3]
    last = [o for o in outcomes if o.arrival_s >= end * 2 / 3]
    a_all, a_mid, a_last = (attainment(x, slo_ttft_s, slo_tpot_s) for x in (outcomes, mid, last))
    out = min(a_all, a_last)
    if mid and last:
        p = (a_mid + a_last) / 2
        noise = 2 * math.sqrt(max(p * (1 - p), 1e-9) * (1 / len(mid) + 1 / len(last)))
        if a_mid - a_last > max(0.02, noise):
            out = min(out, max(0.0, a_last - (a_mid - a_last)))
    # A decode pool past its capacity: requests wait longer and longer for a place in a batch.
    # The objectives may hold for minutes while that wait grows, but it grows without bound and
    # every request ends up missing: where it leads, 0.
    return 0.0 if decode_backlog(outcomes) else out


def decode_backlog(outcomes: list[Any]) -> bool:
    """The wait for a place in a decode batch grows: past DECODE_BACKLOG_S in the last third of the
    arrivals, and half as much again as in the middle third."""
    if not outcomes:
        return False
    end = outcomes[-1].arrival_s
    mid = [o.decode_wait_s for o in outcomes if end / 3 <= o.arrival_s < end * 2 / 3]
    last = [o.decode_wait_s for o in outcomes if o.arrival_s >= end * 2 / 3]
    if not mid or not last:
        return False
    w_mid, w_last = statistics.fmean(mid), statistics.fmean(last)
    return w_last > DECODE_BACKLOG_S and w_last > 1.5 * w_mid


def probe_size(rate: float, requests: int, min_duration_s: float) -> int:
    """Requests in one probe: at least ``requests``, and at least ``min_duration_s`` of arrivals.
    A probe of a fixed count at a high rate lasts less than one request does (a second of arrivals
    at 2,000 req/s against ten-second decodes): the cluster never fills, and its goodput looks
    many times what it is."""
    return max(requests, math.ceil(rate * min_duration_s))


def probe_attainment(cfg: SimConfig, workload: str | Mix, slo_ttft_s: float, slo_tpot_s: float, rate: float,
                     seed: int, *, requests: int = 2000, max_model_len: int = 2048,
                     min_duration_s: float = MIN_DURATION_S, prefixes: int = 0) -> float:
    """One seeded probe of a plan at ``rate``: the attainment the cluster would hold there
    (``steady_attainment``)."""
    entries = trace(workload, rate, probe_size(rate, requests, min_duration_s), seed, max_model_len,
                    cfg.prefix_cache, prefixes)
    # (the nodes' speeds, where they vary, drawn anew with each probe's seed)
    return steady_attainment(simulate(replace(cfg, speed_seed=seed), entries), slo_ttft_s, slo_tpot_s)


def ratio_goodput(cfg: SimConfig, workload: str | Mix, slo_ttft_s: float, slo_tpot_s: float, *, requests: int = 2000,
                  seeds: int = 2, max_model_len: int = 2048, start_rate: float = 1.0,
                  rel_tol: float = 0.05, min_duration_s: float = MIN_DURATION_S, prefixes: int = 0) -> dict[str, Any]:
    """One P:D split's simulated goodput, and what it looks like there and just above."""

    def n(rate: float) -> int:
        return probe_size(rate, requests, min_duration_s)

    ids = cfg.prefix_cache

    def measure(rate: float, seed: int) -> float:
        return probe_attainment(cfg, workload, slo_ttft_s, slo_tpot_s, rate, seed, requests=requests,
                                max_model_len=max_model_len, min_duration_s=min_duration_s, prefixes=prefixes)

    res = find_goodput(measure, start_rate=start_rate, seeds=seeds, rel_tol=rel_tol, budget_s=600.0, max_probes=40,
                       min_rate=start_rate / 64)
    row: dict[str, Any] = {"prefill": cfg.num_prefill, "decode": cfg.num_decode,
                           "goodput_rps": res.goodput_rps, "bracket": list(res.bracket),
                           "per_node_rps": res.goodput_rps / (cfg.num_prefill + cfg.num_decode),
                           "probes": [[p.rate, p.attainment] for p in res.probes], "stopped_by": res.stopped_by}
    if res.goodput_rps > 0:
        row["at_goodput"] = summary(simulate(cfg, trace(workload, res.goodput_rps, n(res.goodput_rps), 0,
                                                        max_model_len, ids, prefixes)), slo_ttft_s, slo_tpot_s)
    above = simulate(cfg, trace(workload, res.bracket[1], n(res.bracket[1]), 0, max_model_len, ids, prefixes))
    row["limited_by"] = limited_by(above, slo_ttft_s, slo_tpot_s)
    return row


def limited_by(outcomes: list[Any], slo_ttft_s: float, slo_tpot_s: float) -> str:
    """Which objective the most requests missed (at a rate just above the goodput)."""
    too_big = sum(1 for o in outcomes if o.never_fits)
    late = sum(1 for o in outcomes if not o.never_fits and (not o.completed or o.ttft_s > slo_ttft_s))
    slow = sum(1 for o in outcomes if o.completed and o.tpot_s > slo_tpot_s)
    if not (too_big or late or slow):
        return "decode capacity (a growing backlog)" if decode_backlog(outcomes) else "–"
    return max((late, "TTFT (prefill)"), (slow, "TPOT (decode)"), (too_big, "decode KV cache (requests larger)"))[1]


def plan(prefill: Timings, decode: Timings, nodes: int, workload: str | Mix, slo_ttft_s: float, slo_tpot_s: float, *,
         kv_bytes_per_token: int = 0, max_batch: int = 64, kv_capacity_tokens: int = 0, order: str = "slack",
         requests: int = 2000, seeds: int = 2, max_model_len: int = 2048, min_duration_s: float = MIN_DURATION_S,
         also: tuple[int, ...] = (), admission: bool = False, local: bool = False, colocate: bool = False,
         prefix_cache: bool = True,
         prefill_cache_tokens: int = 0, store_ram_tokens: int = 0, store_disk: bool = False, prefixes: int = 0,
         speed: Speed = Speed(), decode_speed: Speed | None = None,
         progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """P:D splits of ``nodes`` (and the prefill counts in ``also``, always), best goodput per node
    first: every split when there are at most COARSE_SPLITS; else one in ``step`` (so that about
    COARSE_SPLITS are), then every split within a step of the best of those (goodput rises, then
    falls, with P). ``local``: conditional disaggregation (the simulator's), and 0:N among the
    splits (no prefill pool: the decode nodes prefill what they decode). ``colocate``: a prefill
    node serves a request whole where the disaggregated choice is predicted to miss the SLO and
    that is not (the coordinator's --colocate; splits with a prefill pool). ``prefix_cache``: the
    engines' prefix caches, a prefill engine's ``prefill_cache_tokens`` (0: unbounded), a decode
    engine's ``kv_capacity_tokens``; with ``store_ram_tokens`` a KV store on each node (a RAM tier
    of that many tokens, over a disk tier with ``store_disk``). ``prefixes``: the workload's
    prefixes or conversations (0: its own number). ``speed``: how far every node's times stray
    from its profile, unseen by admission (tandem/nodespeed.py; default: exactly at it); with
    ``decode_speed``, ``speed`` is the prefill nodes' and ``decode_speed`` the decode nodes' (their
    local prefills too: the simulator draws a speed a node)."""
    step_speed = speed if decode_speed is None else decode_speed
    if nodes < 2:
        raise ValueError("a plan needs at least 2 nodes (a split of them)")
    if isinstance(workload, str) and workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
    done: dict[int, dict[str, Any]] = {}
    t0 = time.monotonic()
    lo = 0 if local else 1  # the fewest prefill nodes a split has
    step = max(1, math.ceil((nodes - lo) / COARSE_SPLITS))

    def run(p: int) -> None:
        cfg = SimConfig(p, nodes - p, prefill, decode, kv_bytes_per_token, max_batch, kv_capacity_tokens, order,
                        slo_ttft_s, slo_tpot_s, admission, local, colocate=colocate and p > 0,
                        prefix_cache=prefix_cache,
                        prefill_cache_tokens=prefill_cache_tokens, store_ram_tokens=store_ram_tokens,
                        store_disk=store_disk, prefill_speed=speed, decode_speed=step_speed)
        row = ratio_goodput(cfg, workload, slo_ttft_s, slo_tpot_s, requests=requests, seeds=seeds,
                            max_model_len=max_model_len, start_rate=max(0.25, nodes / 4),
                            min_duration_s=min_duration_s, prefixes=prefixes)
        done[p] = row
        progress(f"[{len(done)}] {p}:{nodes - p}  goodput {row['goodput_rps']:.3g} req/s "
                 f"({row['per_node_rps']:.3g} per node), limited by {row['limited_by']}")

    for p in sorted({*range(lo, nodes, step), nodes - 1, *(q for q in also if lo <= q < nodes)}):
        run(p)
    if step > 1 and max(r["goodput_rps"] for r in done.values()) > 0:
        best_p = max(done, key=lambda p: done[p]["goodput_rps"])
        for p in range(max(lo, best_p - step + 1), min(nodes - 1, best_p + step - 1) + 1):
            if p not in done:
                run(p)
    rows = [done[p] for p in sorted(done)]
    ranked = sorted(rows, key=lambda r: -r["goodput_rps"])
    best = f"{ranked[0]['prefill']}:{ranked[0]['decode']}" if ranked[0]["goodput_rps"] > 0 else "none"
    return {"workload": workload if isinstance(workload, str) else f"measured ({workload.describe()})",
            "nodes": nodes, "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s},
            "prefill_profile": prefill.doc(), "decode_profile": decode.doc(), "kv_bytes_per_token": kv_bytes_per_token,
            "max_batch": max_batch, "kv_capacity_tokens": kv_capacity_tokens, "order": order,
            "requests_per_probe": requests, "min_duration_s": min_duration_s, "seeds": seeds,
            "splits_evaluated": len(rows), "splits": nodes - lo, "search_step": step, "rel_tol": 0.05,
            "admission": admission, "local": local, "colocate": colocate, "prefix_cache": prefix_cache,
            "prefill_cache_tokens": prefill_cache_tokens, "store_ram_tokens": store_ram_tokens,
            "store_disk": store_disk, "prefixes": prefixes, "node_speed": list(astuple(speed)),
            "decode_speed": list(astuple(step_speed)),
            "not_modelled": [*NOT_MODELLED, *([] if local else [LOCAL_OFF]), *([] if colocate else [COLOCATE_OFF]),
                             *([] if prefix_cache else [NO_PREFIX_CACHE])],
            "transfer_modelled": any(decode.transfer), "rows": rows,
            "best": best, "took_s": round(time.monotonic() - t0, 2)}


def newest_profile() -> Path | None:
    from tandem.profile import default_cache_dir

    files = sorted(default_cache_dir().glob("profile-*.json"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workload", default="chat", choices=WORKLOADS)
    ap.add_argument("--slo-ttft", type=float, required=True, help="TTFT objective, seconds")
    ap.add_argument("--slo-tpot", type=float, required=True, help="TPOT objective, seconds")
    ap.add_argument("--nodes", type=int, default=4, help="nodes to split into prefill and decode")
    ap.add_argument("--profile", default="",
                    help="a node profile (a node's cached profile file or {prefill, decode, transfer} "
                         "coefficients) for every node; default: the newest cached profile on this host")
    ap.add_argument("--prefill-profile", default="", help="the prefill nodes' profile (default: --profile)")
    ap.add_argument("--decode-profile", default="", help="the decode nodes' profile (default: --profile)")
    ap.add_argument("--kv-bytes-per-token", type=int, default=0,
                    help="KV bytes per token, for the transfer time (0: transfers cost only their constant)")
    ap.add_argument("--max-batch", type=int, default=64,
                    help="a decode node's most running requests (a node's --max-num-seqs, 64 by default)")
    ap.add_argument("--kv-capacity-tokens", type=int, default=0, help="a decode node's KV cache in tokens (0: unbounded)")
    ap.add_argument("--prefix-cache", default="on", choices=["on", "off"],
                    help="the engines' prefix caches: a prompt's prefix that a node's engine holds is not computed "
                         "again (the prefix-heavy and multi-turn workloads share prefixes; the others do not)")
    ap.add_argument("--prefill-cache-tokens", type=int, default=0,
                    help="a prefill node's KV cache (its prefix cache) in tokens (0: --kv-capacity-tokens, and with "
                         "that 0 too, unbounded)")
    ap.add_argument("--store-ram-tokens", type=int, default=0,
                    help="each node's KV store RAM tier in tokens (0: no KV store; with --prefix-cache on)")
    ap.add_argument("--store-disk", action="store_true", help="a disk tier below each node's RAM tier")
    ap.add_argument("--prefixes", type=int, default=0,
                    help="prefix-heavy's shared prefixes, multi-turn's conversations at once (0: the workload's "
                         "own: 4 and 16)")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0,
                    help="--validate: each engine's KV cache on the real cluster (and in the simulator), as "
                         "`tandem bench compare` gives it")
    ap.add_argument("--decode-kv-cache-gib", type=float, default=0.0,
                    help="--validate: the decode engine's KV cache (0: --kv-cache-gib)")
    ap.add_argument("--kvstore-ram-gib", type=float, default=0.0,
                    help="--validate: a KV store RAM tier on each node (0: none)")
    ap.add_argument("--kvstore-disk", action="store_true", help="--validate: a disk tier below it")
    ap.add_argument("--order", default="slack", choices=["slack", "fifo"], help="the coordinator's prefill queue order")
    ap.add_argument("--admission", default="off", choices=["on", "off"],
                    help="model admission: refuse at arrival what the profile predicts will miss an objective; "
                         "with --validate the real cluster's admission too (off: it accepts everything)")
    ap.add_argument("--requests", type=int, default=2000,
                    help="requests per simulated probe, at least (and at least --min-duration-s of arrivals)")
    ap.add_argument("--min-duration-s", type=float, default=MIN_DURATION_S,
                    help="seconds of arrivals per simulated probe, at least: long enough for the cluster to fill")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--out", default="bench/results/plan")
    ap.add_argument("--node-speed", default="", metavar="SD[,TAU_S[,JITTER_SD[,BIAS]]]",
                    help="every node's times stray from its profile as a node measures its own "
                         "(tandem_perf_speed: the log time factor's slow part, its time constant in seconds, "
                         "default 1, each piece's jitter, default 0, and the log of its mean, default 0), unseen "
                         "by admission; default: exactly at the profile")
    ap.add_argument("--parallel", default="", metavar="NAME=GPUS:PROFILE[:KV_TOKENS],...",
                    help="instead of one plan: per-node parallel settings on --gpus GPUs (e.g. tensor parallel 4 "
                         "and 8, each with its profile and its node's KV cache in tokens), ranked by goodput per GPU")
    ap.add_argument("--gpus", type=int, default=64, help="--parallel: GPUs in all")
    ap.add_argument("--validate", action="store_true",
                    help="instead of a plan: run a real cluster (--split) on this host at --rates and the "
                         "simulator on the same traces, and report predicted against measured attainment, TTFT "
                         "and TPOT, and the misses by cause (the simulator takes the profiles the nodes started "
                         "from; --profile, --order and the KV flags are for plans only)")
    ap.add_argument("--simulated", default="", metavar="P:D,...",
                    help="--validate: instead of the real cluster, these splits as simulated nodes (times from "
                         "--profile) against the simulator: a check of its cluster model, labelled as simulated")
    ap.add_argument("--split", default="1:1", metavar="P:D",
                    help="--validate: the real cluster's split, a core a node (1:1, or 0:2 with "
                         "--conditional-disagg on); a pool's nodes' times are averaged for the simulator")
    ap.add_argument("--reps", type=int, default=1,
                    help="--validate: run the sweep this many times on fresh seeded traces (same cluster) and "
                         "report each rate's mean and the spread of the errors")
    ap.add_argument("--rates", default="0.5,1,1.5,2", help="--validate: arrival rates, req/s")
    ap.add_argument("--duration", type=float, default=60.0, help="--validate: seconds of arrivals per rate")
    ap.add_argument("--model", default="", help="--validate: the model (default: the seeded bench model)")
    ap.add_argument("--fits", default="profile", choices=["profile", "learned"],
                    help="--validate: the simulator's times from the profiles the nodes started from, or from "
                         "the fits they have learned while serving (read before each rate: the rates before it "
                         "and the warm-up, 45 s at a request a second so that the nodes have measured their "
                         "speeds too), as admission predicts; --live: from the profiles (with --node-speed), "
                         "or from what the routable nodes have learned and how far their work strays from it, "
                         "as the coordinator's cluster status gives them at each decision")
    ap.add_argument("--conditional-disagg", default="off", choices=["on", "off"],
                    help="on: the simulator may prefill a request on the decode node (as the coordinator decides; "
                         "with --admission on, as Tandem ships, refused when the option chosen is predicted to "
                         "miss), and a plan also weighs 0:N (no prefill pool); with --validate the real "
                         "cluster too; with --live, match the coordinator's (a 0:N cluster is planned, and the last "
                         "prefill node may go); off: always disaggregated")
    ap.add_argument("--colocate", default="off", choices=["on", "off"],
                    help="on: the simulator lets a prefill node serve a request whole, prefill and decode on its "
                         "own engine, where the disaggregated choice is predicted to miss the SLO and that is not "
                         "(the coordinator's --colocate, on by default there); the pool's prefills then run in "
                         "that engine's steps beside those streams; with --validate the real cluster too; with "
                         "--live, match the coordinator's; off: every request decoded in the decode pool")
    from tandem.plan_live import add_args as add_live_args

    add_live_args(ap)


def parse_speed(spec: str) -> Speed:
    """``SD[,TAU_S[,JITTER_SD[,BIAS]]]`` -> Speed (empty: none); ValueError saying what is wrong."""
    if not spec.strip():
        return Speed()
    parts = spec.split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise ValueError(f"{spec!r}: want numbers, SD[,TAU_S[,JITTER_SD[,BIAS]]], e.g. 0.11,1,0.1") from None
    if len(values) > 4:
        raise ValueError(f"{spec!r}: at most four numbers, SD,TAU_S,JITTER_SD,BIAS")
    return Speed(*values)


def parse_parallel(spec: str) -> list[tuple[str, int, str, int]]:
    """``NAME=GPUS:PROFILE[:KV_TOKENS],...`` -> [(name, GPUs per node, profile path, a node's KV
    cache in tokens, 0: unbounded)]; ValueError naming the bad part."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, rest = part.partition("=")
        fields = rest.split(":")
        try:
            if not name or len(fields) not in (2, 3) or int(fields[0]) < 1:
                raise ValueError
            out.append((name, int(fields[0]), fields[1], int(fields[2]) if len(fields) == 3 else 0))
        except ValueError:
            raise ValueError(f"--parallel {part!r}: want NAME=GPUS:PROFILE[:KV_TOKENS], e.g. tp4=4:tp4.json:550000")
    if not out:
        raise ValueError("--parallel names no setting")
    return out


def plan_parallel(settings: list[tuple[str, int, str, int]], gpus: int, workload: str, slo_ttft_s: float,
                  slo_tpot_s: float, out: Path, progress: Callable[[str], None] = lambda _m: None,
                  **kw: Any) -> dict[str, Any]:
    """Per-node parallel settings on ``gpus`` GPUs: for each, ``gpus // GPUs per node`` nodes
    planned as usual (its own profile and KV cache); ranked by goodput per GPU."""
    rows = []
    for name, per_node, path, kv_tokens in settings:
        nodes = gpus // per_node
        if nodes < 2:
            raise ValueError(f"{name}: {gpus} GPUs make {nodes} node(s) of {per_node}; a plan needs 2")
        t = Timings.load(path)
        progress(f"{name}: {nodes} nodes of {per_node} GPUs, profile {path}")
        doc = plan(t, t, nodes, workload, slo_ttft_s, slo_tpot_s, kv_capacity_tokens=kv_tokens,
                   prefill_cache_tokens=kv_tokens, progress=progress, **kw)
        write_report(out / name, doc)
        best = max(doc["rows"], key=lambda r: r["goodput_rps"])
        rows.append({"setting": name, "gpus_per_node": per_node, "nodes": nodes, "profile": path,
                     "kv_capacity_tokens": kv_tokens, "best": doc["best"], "goodput_rps": best["goodput_rps"],
                     "per_gpu_rps": best["goodput_rps"] / (nodes * per_node), "limited_by": best["limited_by"]})
    ranked = sorted(rows, key=lambda r: -r["per_gpu_rps"])
    res = {"gpus": gpus, "workload": workload, "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s}, "rows": rows,
           "best": ranked[0]["setting"] if ranked[0]["goodput_rps"] > 0 else "none"}
    (out / "parallel.json").write_text(json.dumps(res, indent=1) + "\n")
    md = [f"# tandem plan --parallel: {workload} on {gpus} GPUs", "",
          f"SLOs: TTFT ≤ {slo_ttft_s * 1000:.0f} ms, TPOT ≤ {slo_tpot_s * 1000:.0f} ms. Each setting's own plan "
          "is in its folder.", "",
          "| setting | GPUs per node | nodes | KV cache per node, tokens | best P:D | goodput req/s | per GPU |",
          "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        md.append(f"| {r['setting']}{' (best)' if r['setting'] == res['best'] else ''} | {r['gpus_per_node']} | "
                  f"{r['nodes']} | {r['kv_capacity_tokens'] or 'unbounded'} | {r['best']} | {r['goodput_rps']:.3g} | "
                  f"{r['per_gpu_rps']:.3g} |")
    (out / "parallel.md").write_text("\n".join(md) + "\n")
    return res


def cmd_plan(args: argparse.Namespace) -> int:
    bad = [f"--{k.replace('_', '-')}" for k in ("store_ram_tokens", "prefill_cache_tokens", "kv_capacity_tokens",
                                                 "prefixes") if getattr(args, k) < 0]
    if bad:
        print(f"tandem plan: {', '.join(bad)} must be >= 0", file=sys.stderr)
        return 2
    if args.store_disk and not args.store_ram_tokens:
        print("tandem plan: --store-disk needs --store-ram-tokens (chunks on disk load through RAM)", file=sys.stderr)
        return 2
    if args.store_ram_tokens and args.prefix_cache == "off":
        print("tandem plan: --store-ram-tokens needs --prefix-cache on (the KV store is found by the prompt's "
              "token ids, as the prefix caches are)", file=sys.stderr)
        return 2
    try:
        speed = parse_speed(getattr(args, "node_speed", ""))
    except ValueError as exc:
        print(f"tandem plan: --node-speed: {exc}", file=sys.stderr)
        return 2
    if args.fits == "learned" and not (args.live or args.validate):
        print("tandem plan: --fits learned is for --live or --validate (a plan has no running nodes to learn "
              "from; give it --profile)", file=sys.stderr)
        return 2
    if speed.varies and args.live and args.fits == "learned":
        print("tandem plan --live: --node-speed or --fits learned, not both (the nodes' measured speeds come "
              "with their learned fits)", file=sys.stderr)
        return 2
    if speed.varies and (args.parallel or args.validate):
        print("tandem plan: --node-speed is for a plan or --live (--validate --fits learned takes the speeds the "
              "nodes measure; --parallel does not take one)", file=sys.stderr)
        return 2
    if not args.prefill_cache_tokens:  # a prefill engine's cache as large as a decode engine's, when that is given
        args.prefill_cache_tokens = args.kv_capacity_tokens
    if args.parallel:
        try:
            settings = parse_parallel(args.parallel)
            res = plan_parallel(settings, args.gpus, args.workload, args.slo_ttft, args.slo_tpot, Path(args.out),
                                progress=lambda m: print("  " + m, flush=True),
                                kv_bytes_per_token=args.kv_bytes_per_token, max_batch=args.max_batch,
                                order=args.order, requests=args.requests, seeds=args.seeds,
                                max_model_len=args.max_model_len, min_duration_s=args.min_duration_s,
                                admission=args.admission == "on", prefix_cache=args.prefix_cache == "on",
                                store_ram_tokens=args.store_ram_tokens, store_disk=args.store_disk,
                                prefixes=args.prefixes)
        except (OSError, ValueError) as exc:
            print(f"tandem plan: {exc}", file=sys.stderr)
            return 2
        print((Path(args.out) / "parallel.md").read_text())
        print(f"best per GPU: {res['best']}")
        return 0
    if args.validate and not args.simulated:
        from tandem.plan_validate import cmd_validate

        return cmd_validate(args)
    default = args.profile or (str(p) if (p := newest_profile()) else "")
    pre_path, dec_path = args.prefill_profile or default, args.decode_profile or default
    if not pre_path or not dec_path:
        print("tandem plan: no profile given and none cached on this host; start a node once (it profiles "
              "itself) or give --profile FILE", file=sys.stderr)
        return 2
    try:
        prefill, decode = Timings.load(pre_path), Timings.load(dec_path)
    except (OSError, ValueError) as exc:
        print(f"tandem plan: {exc}", file=sys.stderr)
        return 2
    print(f"profiles: prefill {pre_path}, decode {dec_path}", flush=True)
    if args.validate:
        from tandem.plan_validate import validate_simulated

        return validate_simulated(args, Path(pre_path))
    if args.live:
        from tandem.plan_live import cmd_live

        return cmd_live(args, prefill, decode)
    try:
        doc = plan(prefill, decode, args.nodes, args.workload, args.slo_ttft, args.slo_tpot,
                   kv_bytes_per_token=args.kv_bytes_per_token, max_batch=args.max_batch,
                   kv_capacity_tokens=args.kv_capacity_tokens, order=args.order, requests=args.requests,
                   seeds=args.seeds, max_model_len=args.max_model_len, min_duration_s=args.min_duration_s,
                   admission=args.admission == "on", local=args.conditional_disagg == "on",
                   colocate=args.colocate == "on",
                   prefix_cache=args.prefix_cache == "on", prefill_cache_tokens=args.prefill_cache_tokens,
                   store_ram_tokens=args.store_ram_tokens, store_disk=args.store_disk, prefixes=args.prefixes,
                   speed=speed, progress=lambda m: print("  " + m, flush=True))
    except ValueError as exc:
        print(f"tandem plan: {exc}", file=sys.stderr)
        return 2
    report = write_report(Path(args.out), doc)
    print("\n".join(table(doc)))
    print(f"best: {doc['best']} ({doc['took_s']} s); wrote {report}")
    return 0
