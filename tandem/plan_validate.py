"""`tandem plan --validate`: the simulator's predictions against a real cluster, side by side.

It starts a real cluster on this host (1:1 by default, ``--split``; the seeded
bench model unless ``--model``), always disaggregated or, with
``--conditional-disagg on``, prefilling on the decode node where the
coordinator chooses to (the simulator then applies the same rule), with
admission off or, with ``--admission on``, on (the simulator's admission with
it; both on is Tandem as shipped), reads the profiles its nodes started from
(a pool's averaged: the simulator has one set of times a pool), and for each
rate sends one seeded trace to the cluster and plays the very same trace
through the simulator. The report puts measured and predicted SLO attainment, TTFT
and TPOT side by side with the error of each, and the goodput each implies
(the highest rate with at least 90 % attainment). The goal is within 15 %.
With ``--reps N`` the whole sweep runs N times on fresh seeded traces, on the
same cluster, and the report adds each rate's mean over the repetitions and
how far each one's error strayed: one probe of a minute is a few dozen
streams, and its TPOT median moves by ±20 % from one to the next. The report
itself: tandem/validate_report.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import astuple, replace
from pathlib import Path
from typing import Any

from tandem.node.config import DECODE_STEP_TOKENS
from tandem.nodespeed import Speed
from tandem.plan import probe_attainment, ratio_goodput
from tandem.plan_live import Fits, Pools, learned_fits
from tandem.sim import Learned, simulate_draws
from tandem.simconfig import SimConfig
from tandem.timings import Timings
# (its report; write_report is imported from here too)
from tandem.validate_report import MISSES, STRAY_KEYS, describe, misses, pct, table_lines, write_report  # noqa: F401

PROFILE_LINE = re.compile(r"(?:cached profile|cached in) (\S+\.json)")


def node_profile(log: Path) -> Path:
    """The profile file a node started from, from its log (the last start's: logs are appended)."""
    found = [m.group(1) for line in log.read_text(errors="replace").splitlines() if (m := PROFILE_LINE.search(line))]
    if not found:
        raise RuntimeError(f"{log}: no profile named (a node started with --profile off?)")
    return Path(found[-1])


def goodput(rows: list[dict[str, Any]], key: str) -> float:
    """The highest rate whose attainment (``key``) is at least 90 %, below the first that misses."""
    best = 0.0
    for r in sorted(rows, key=lambda r: r["rate"]):
        if r[key] < 0.9:
            break
        best = r["rate"]
    return best


def rel_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured if measured and not math.isnan(measured) else math.nan


def cmd_validate(args: argparse.Namespace) -> int:
    from tandem.bench import systems
    from tandem.bench.compare import bench_model

    ram_gib, disk = getattr(args, "kvstore_ram_gib", 0.0), getattr(args, "kvstore_disk", False)
    if disk and not ram_gib:
        print("tandem plan --validate: --kvstore-disk needs --kvstore-ram-gib (chunks on disk load through RAM)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bench_model(getattr(args, "model", ""), out)
    # the real cluster's KV memory, as `tandem bench compare` gives it (and the simulator the same)
    systems.MEMORY = systems.Memory(getattr(args, "kv_cache_gib", 2.0), ram_gib, str(out / "kvstore") if disk else "",
                                    getattr(args, "decode_kv_cache_gib", 0.0))
    rates = [float(r) for r in args.rates.split(",")]
    cores = sorted(os.sched_getaffinity(0))
    local = getattr(args, "conditional_disagg", "off") == "on"
    admission = getattr(args, "admission", "off") == "on"
    colocate = getattr(args, "colocate", "off") == "on"
    fits = getattr(args, "fits", "profile")
    reps = getattr(args, "reps", 1)
    try:
        num_prefill, num_decode = parse_split(getattr(args, "split", "1:1"), local, len(cores))
    except ValueError as exc:
        print(f"tandem plan --validate: {exc}", file=sys.stderr)
        return 2
    if reps < 1:
        print("tandem plan --validate: --reps must be at least 1", file=sys.stderr)
        return 2
    variant = {(True, True): "", (True, False): "-noadmit", (False, True): "-nolocal",
               (False, False): "-disagg"}[(local, admission)]
    split = f"{num_prefill}:{num_decode}"
    print(f"starting a real {split} cluster ({describe(local, admission, colocate)}) on cores {cores} ...",
          flush=True)
    system = systems.start_tandem(model, num_prefill, num_decode, args.max_model_len, out, cores, variant,
                                  ["--colocate", "on" if colocate else "off"])
    rows: list[dict[str, Any]] = []
    pool = {"prefill": [f"prefill-{k}" for k in range(num_prefill)],
            "decode": [f"decode-{k}" for k in range(num_decode)]}
    try:
        logs = out / f"tandem-{num_prefill}p{num_decode}d{variant}"
        paths = {name: node_profile(logs / f"{name}.log") for names in pool.values() for name in names}
        decode = Timings.mean([Timings.load(paths[n]) for n in pool["decode"]])
        # (0:N: no prefill pool; the decode nodes' own prefill fits are what they prefill with)
        prefill = Timings.mean([Timings.load(paths[n]) for n in pool["prefill"]]) if num_prefill else decode
        pre_path = ", ".join(str(paths[n]) for n in pool["prefill"]) or "none (no prefill pool)"
        dec_path = ", ".join(str(paths[n]) for n in pool["decode"])
        from tandem.node.simengine import model_facts
        from tandem.perfmodel import kv_bytes_per_token

        facts = model_facts(model)
        per_token = kv_bytes_per_token({**facts, "dtype": "float32"})  # the nodes' --dtype default
        # the coordinator's defaults (no SLO of its own: the trace's go with each request); the
        # engines' KV caches as the bench gives them (systems.MEMORY), their prefix caches with them
        cfg = SimConfig(num_prefill, num_decode, prefill, decode, kv_bytes_per_token=per_token,
                        max_batch=args.max_batch, order="slack", slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot, local=local,
                        admission=admission, colocate=colocate and num_prefill > 0, step_tokens=DECODE_STEP_TOKENS,
                        prefix_cache=getattr(args, "prefix_cache", "on") == "on",
                        prefill_cache_tokens=int(systems.MEMORY.kv_cache_gib * 2**30) // per_token,
                        kv_capacity_tokens=int(systems.MEMORY.decode_gib * 2**30) // per_token,
                        store_ram_tokens=int(ram_gib * 2**30) // per_token, store_disk=disk)
        print(f"profiles: prefill {pre_path}, decode {dec_path}", flush=True)
        from tandem.bench.compare import warm_up

        warm_up(system, args.workload, args.max_model_len)
        if fits == "learned":
            print(f"  {SPEED_WARM_S} s at 1 req/s first, for the nodes to measure their speeds ...", flush=True)
            warm_speeds(system.target, args.workload, args.max_model_len)

        def fresh_cfg() -> SimConfig:
            """Before each rate: the fits the nodes learned over the rates before it, and how far
            their work strayed from them (a pool's the mean of those measured; none: at its fits)."""
            now = Pools([(n, 0) for n in pool["prefill"]], [(n, 0) for n in pool["decode"]],
                        {n: learned(system.nodes[n], f"{n}, learned") for names in pool.values() for n in names})
            f = learned_fits(now, Fits(cfg.prefill, cfg.decode))
            return replace(cfg, prefill=f.prefill, decode=f.decode, prefill_speed=f.prefill_speed,
                           decode_speed=f.decode_speed)

        fresh: Callable[[], SimConfig] | None = fresh_cfg if fits == "learned" else None
        carry: list[Learned] = []  # the simulated coordinator's calibrations, from rate to rate
        for rep in range(reps):
            if reps > 1:
                print(f"repetition {rep + 1} of {reps}", flush=True)
            seed = 7000 + 1000 * rep
            rows += [{**r, "rep": rep} for r in rate_rows(system.target, cfg, args, rates, fresh, seed=seed, carry=carry)]
    finally:
        system.stop()
    print("the planner on the nodes' startup profiles ...", flush=True)
    planner = planner_view(cfg, args, rates)
    first = [r for r in rows if r["rep"] == 0]
    doc = {"split": split, "reps": reps, "transfer_modelled": any(decode.transfer), "conditional_disagg": local,
           "admission": admission, "colocate": colocate, "fits": fits,
           "prefix_cache": cfg.prefix_cache, "prefill_cache_tokens": cfg.prefill_cache_tokens,
           "kv_capacity_tokens": cfg.kv_capacity_tokens, "store_ram_tokens": cfg.store_ram_tokens,
           "store_disk": cfg.store_disk, "prefixes": getattr(args, "prefixes", 0),
           "workload": args.workload, "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
           "duration_s": args.duration, "model": model, "prefill_profile": prefill.doc(),
           "decode_profile": decode.doc(),
           "rows": rows, "goodput": {"measured": goodput(first, "measured_attainment"),
                                     "predicted": goodput(first, "predicted_attainment")},
           "goal": "predictions within 15 % of measurement"}
    if reps > 1:
        doc["over_reps"] = over_reps(rows)
        means = doc["over_reps"]
        doc["goodput"] = {"measured": goodput(means, "measured_attainment"),
                          "predicted": goodput(means, "predicted_attainment"),
                          "of": f"the mean over {reps} repetitions"}
    doc["planner"] = planner
    (out / "validate.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_report(out, doc)
    print(f"goodput measured {doc['goodput']['measured']:g} req/s, predicted {doc['goodput']['predicted']:g} req/s; "
          f"wrote {out / 'validate.md'}")
    return 0


PLAN_SEEDS = 2  # as `tandem plan` probes
# --fits learned: a request a second for this long before the first rate, unmeasured, so that the
# nodes have measured their speeds (nodespeed.MIN_WINDOWS one-second windows with work) by then;
# with the short warm-up alone the first rate was simulated at the fits, steadier than the nodes
# (validate44: 99 % predicted against 79 % measured at 2 req/s, 81 against 86 at 3 once measured)
SPEED_WARM_S = 45


def warm_speeds(target: str, workload: str, max_model_len: int) -> None:
    """``SPEED_WARM_S`` requests of ``workload``, one a second, unmeasured."""
    from tandem.bench.compare import _run, _spaced

    _run(target, _spaced(workload, SPEED_WARM_S, 1.0, 4243, max_model_len), (None, None))


def planner_view(cfg: SimConfig, args: argparse.Namespace, rates: list[float]) -> dict[str, Any]:
    """What `tandem plan` says of this split from the nodes' startup profiles (``cfg`` as the
    cluster started; the plan's own long probes, not the validation's traces): its goodput, and
    its attainment at each rate measured (the median over its seeds)."""
    nodes = cfg.num_prefill + cfg.num_decode
    slo = (args.slo_ttft, args.slo_tpot)
    prefixes = getattr(args, "prefixes", 0)
    row = ratio_goodput(cfg, args.workload, *slo, seeds=PLAN_SEEDS, max_model_len=args.max_model_len,
                        start_rate=max(0.25, nodes / 4), prefixes=prefixes)
    at = {f"{rate:g}": statistics.median(probe_attainment(cfg, args.workload, *slo, rate, seed,
                                                          max_model_len=args.max_model_len, prefixes=prefixes)
                                         for seed in range(PLAN_SEEDS)) for rate in rates}
    return {"goodput_rps": row["goodput_rps"], "attainment": at, "limited_by": row["limited_by"]}


def parse_split(split: str, local: bool, cores: int) -> tuple[int, int]:
    """``P:D`` for a real cluster on this host: a core a node at least, and a prefill pool unless the
    decode nodes prefill (conditional disaggregation); ValueError saying which."""
    try:
        p, d = (int(x) for x in split.split(":"))
    except ValueError:
        raise ValueError(f"--split {split!r}: want P:D, e.g. 1:1 or 0:2") from None
    if d < 1 or p < 0 or (p == 0 and not local):
        raise ValueError(f"--split {split}: a cluster needs a decode node, and a prefill pool unless "
                         "--conditional-disagg on (0:N: the decode nodes prefill what they decode)")
    if p + d > cores:
        raise ValueError(f"--split {split}: {p + d} nodes on {cores} cores; a real node needs a core of its own "
                         "(more as simulated nodes: --simulated)")
    return p, d




def over_reps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each rate over the repetitions: the mean of each measured and predicted figure, the error of
    those means, and the smallest and largest error of a single repetition."""
    out = []
    for rate in sorted({r["rate"] for r in rows}):
        mine = [r for r in rows if r["rate"] == rate]

        def mean(side: str, k: str) -> float:
            vals = [r[side][k] for r in mine if not math.isnan(r[side][k])]
            return sum(vals) / len(vals) if vals else math.nan

        m = {k: mean("measured", k) for k in STRAY_KEYS}
        p = {k: mean("predicted", k) for k in STRAY_KEYS}
        errs = {k: [e for r in mine if not math.isnan(e := r["error"][k])] for k in STRAY_KEYS}
        missed = {side: {k: sum(r.get("missed", {}).get(side, {}).get(k, 0) for r in mine) for k in MISSES}
                  for side in ("measured", "predicted")}
        out.append({"rate": rate, "reps": len(mine), "measured": m, "predicted": p, "missed": missed,
                    "error": {k: rel_error(p[k], m[k]) for k in STRAY_KEYS},
                    "error_range": {k: [min(v), max(v)] if v else [math.nan, math.nan] for k, v in errs.items()},
                    "measured_attainment": m["attainment"], "predicted_attainment": p["attainment"]})
    return out


def learned_timings(grpc_address: str, source: str) -> Timings:
    """A node's fits as it has learned them while serving (``learned``)."""
    return learned(grpc_address, source)[0]


def learned(grpc_address: str, source: str) -> tuple[Timings, dict[str, Speed]]:
    """A node's fits as it has learned them while serving (its NodeMonitor stream's latest message):
    what admission predicts with (``Timings.from_fits``), and how far its work strays from them
    (``Speed.by_kind``)."""
    import grpc

    from tandem.proto import tandem_pb2 as pb
    from tandem.proto import tandem_pb2_grpc as pb_grpc

    with grpc.insecure_channel(grpc_address) as ch:
        call = pb_grpc.NodeMonitorStub(ch).Watch(pb.WatchRequest(), timeout=10)
        msg = next(iter(call))
        call.cancel()
    return Timings.from_fits(msg.fits, source), Speed.by_kind(msg.speeds)


def rate_rows(target: str, cfg: SimConfig, args: argparse.Namespace, rates: list[float],
              fresh: Callable[[], SimConfig] | None = None, seed: int = 7000,
              carry: list[Learned] | None = None) -> list[dict[str, Any]]:
    """Each rate's seeded trace (``seed`` for the first rate, one more for each next) sent to
    ``target`` and played through the simulator: side by side. ``fresh``: the simulator's
    configuration made again before each rate (the nodes' learned fits). ``carry``: what the
    simulated coordinator learned by the end of the trace before (``sim.Learned``, a draw each),
    which each rate starts from and leaves its own in, as the real coordinator, serving one rate
    after another, starts each with the calibrations the ones before taught it. (Until the
    thirty-second sitting each started afresh: on that sitting's 1:1 chat run the real
    coordinator began each rate with a TPOT line of slope 0.25-0.45, learned as the rate before
    drained, that put a raw 50 ms at 36-42 ms, under the 46.6 ms objective; 18-21 of the first 30
    requests at 2.5 req/s went over it. Replayed carried over, the simulator's mean attainment
    error fell 8.1 -> 5.6 points and its TPOT misses at 2.5 req/s came to 33 and 14 where the
    run had 30 and 24, from 9 and 4.)"""
    from tandem.bench.compare import _run
    from tandem.bench.workloads import generate, materialize

    slo = (args.slo_ttft, args.slo_tpot)
    rows = []
    for k, rate in enumerate(rates):
        entries = generate(args.workload, rate=rate, duration_s=args.duration, seed=seed + k,
                           max_model_len=args.max_model_len, prefixes_n=getattr(args, "prefixes", 0) or None)
        materialize(entries, seed + k, 600)
        if fresh is not None:
            cfg = fresh()
        # before the run: only what was known then
        predicted, taught = simulate_draws(cfg, entries, *slo, learned=carry or ())
        # what the simulator said with every node exactly at its fit, without the KV store, and
        # without the engines' prefix caches too, where that differs (each from the calibrations
        # the main chain of rates carried here: what it says of this rate alone)
        bare = {}
        if cfg.speeds_vary:
            bare["predicted_at_fit"] = replace(cfg, prefill_speed=Speed(), decode_speed=Speed())
        if cfg.calibrate and (cfg.admission or cfg.local or cfg.colocate):
            bare["predicted_uncalibrated"] = replace(cfg, calibrate=False)
        if cfg.prefix_cache and cfg.store_ram_tokens:
            bare["predicted_without_kv_store"] = replace(cfg, store_ram_tokens=0, store_disk=False)
        if cfg.prefix_cache:
            bare["predicted_without_prefix_cache"] = replace(cfg, prefix_cache=False)
        row = side_by_side(_run(target, entries, slo), predicted, rate, len(entries))
        for key, other in bare.items():
            said = simulate_draws(other, entries, *slo, learned=carry or ())[0]
            if json.dumps(said, sort_keys=True) != json.dumps(predicted, sort_keys=True):
                row[key] = said
        row["decode_fit"], row["prefill_fit"] = list(cfg.decode.decode), list(cfg.prefill.prefill)
        row["local_prefill_fit"] = list(cfg.decode.prefill)  # the decode node's own prefills
        row["speed"] = {"prefill": astuple(cfg.prefill_speed), "decode": astuple(cfg.decode_speed)}
        row["measured_attainment"], row["predicted_attainment"] = row["measured"]["attainment"], row["predicted"]["attainment"]
        rows.append(row)
        if carry is not None:
            carry[:] = taught
    return rows


def side_by_side(measured: dict[str, Any], predicted: dict[str, float], rate: float, requests: int) -> dict[str, Any]:
    """One rate's row: a run's summary (bench/metrics.py) beside the simulator's, and their errors."""
    row = {"rate": rate, "requests": requests,
           "measured": {"attainment": measured["slo_attainment"], "ttft_p50_s": measured["ttft_s"]["p50"],
                        "ttft_p90_s": measured["ttft_s"]["p90"], "tpot_p50_s": measured["tpot_s"]["p50"],
                        "tpot_p90_s": measured["tpot_s"]["p90"], "failed": measured["failed"]},
           "predicted": {k: predicted[k] for k in ("attainment", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")}}
    # the requests that missed, by why (refused, failed, late first token, slow): where the two part
    row["missed"] = {"measured": measured.get("missed", {}), "predicted": predicted.get("missed", {})}
    row["error"] = {k: rel_error(row["predicted"][k], row["measured"][k]) for k in row["predicted"]}
    # the share prefilled on the decode node (conditional disaggregation), measured and simulated
    row["local_share"] = {"measured": measured.get("local_prefill_share", math.nan),
                          "predicted": predicted.get("local_prefill_share", math.nan)}
    # and the share a prefill node served whole (colocation)
    row["colocated_share"] = {"measured": measured.get("colocated_share", math.nan),
                              "predicted": predicted.get("colocated_share", math.nan)}
    m, p = row["measured"], row["predicted"]
    print(f"  {rate:g} req/s: attainment measured {m['attainment']:.0%} predicted {p['attainment']:.0%}; "
          f"TTFT p50 {m['ttft_p50_s'] * 1000:.0f} / {p['ttft_p50_s'] * 1000:.0f} ms; TPOT p50 "
          f"{m['tpot_p50_s'] * 1000:.1f} / {p['tpot_p50_s'] * 1000:.1f} ms; prefilled on the decode node "
          f"{pct(row['local_share']['measured'])} / {pct(row['local_share']['predicted'])}; served whole on "
          f"the prefill node {pct(row['colocated_share']['measured'])} / "
          f"{pct(row['colocated_share']['predicted'])}; missed "
          f"{misses(row['missed']['measured'])} / {misses(row['missed']['predicted'])}", flush=True)
    return row


def validate_simulated(args: argparse.Namespace, profile: Path) -> int:
    """`--validate --simulated P:D,...`: each split as a cluster of simulated nodes (the real
    coordinator, daemons and protocol; times from ``profile``) against the simulator on the same
    traces. It checks the simulator's model of the cluster (queueing, routing, batching), not of
    an engine: both sides take their times from one profile. Labelled as simulated."""
    from tandem.local.cluster import ClusterSpec, LocalCluster
    from tandem.local.model import ensure_default_model
    from tandem.node.simengine import model_facts
    from tandem.perfmodel import kv_bytes_per_token

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings.load(profile)
    model = str(ensure_default_model())
    per_token = kv_bytes_per_token({**model_facts(model), "dtype": "float32"})  # what a simulated node moves
    rates = [float(r) for r in args.rates.split(",")]
    clusters = []
    for split in args.simulated.split(","):
        try:
            p, d = (int(x) for x in split.split(":"))
            cfg = SimConfig(p, d, timings, timings, kv_bytes_per_token=per_token, max_batch=args.max_batch,
                            order="slack", slo_ttft_s=args.slo_ttft)
        except ValueError as exc:
            print(f"tandem plan --validate --simulated: {split!r}: {exc} (want P:D, e.g. 2:1)", file=sys.stderr)
            return 2
        print(f"simulated nodes {p}:{d} (profile {profile}) ...", flush=True)
        spec = ClusterSpec(model=model, num_prefill=p, num_decode=d, max_model_len=args.max_model_len,
                           log_dir=str(out / f"sim-{p}x{d}" / "logs"), extra_node_args=["--simulate", str(profile)],
                           extra_coordinator_args=["--conditional-disagg", "off", "--admission", "off",
                                                   "--colocate", "off"])
        with LocalCluster(spec) as cluster:
            rows = rate_rows(cluster.http_url, cfg, args, rates)
        clusters.append({"split": f"{p}:{d}", "rows": rows,
                         "goodput": {"measured": goodput(rows, "measured_attainment"),
                                     "predicted": goodput(rows, "predicted_attainment")}})
    doc = {"simulated_nodes": True, "profile": timings.doc(), "workload": args.workload,
           "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot}, "duration_s": args.duration,
           "kv_bytes_per_token": per_token, "clusters": clusters, "goal": "predictions within 15 % of measurement"}
    (out / "validate-simulated.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# tandem plan --validate --simulated: {args.workload}, SIMULATED NODES", "",
             "Each split runs as simulated nodes (`--simulate`: the real coordinator, daemons, etcd and gRPC; no "
             "engine, times from one profile) and through the simulator, on the same seeded traces, always "
             "disaggregated, admission off. Both sides take their times from the same profile, so this checks the "
             "simulator's model of the cluster (queueing, routing, batching, the coordinator's own time), not its "
             "model of an engine (the real 1:1 `--validate` does that).", ""]
    for c in clusters:
        lines += [f"## {c['split']} (simulated nodes)", "", *table_lines(c["rows"]), "",
                  f"Goodput on these rates: measured {c['goodput']['measured']:g} req/s, predicted "
                  f"{c['goodput']['predicted']:g} req/s.", ""]
    (out / "validate-simulated.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'validate-simulated.md'}")
    return 0
