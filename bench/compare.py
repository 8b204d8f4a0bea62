"""`tandem bench compare`: Tandem and the systems a user would pick instead, on the same cores,
under the same seeded workload, measured one after another in one run, written as one report.

Systems: Tandem at each P:D ratio that fits the cores (1:1 on two cores;
1:2 and 2:1 from three), colocated vLLM (its OpenAI server, chunked prefill,
every core), and vLLM's own disaggregation (NixlConnector producer and
consumer on half the cores each, behind a small proxy), as shipped and with
the CPU fixes of bench/nixl-fixes/ (see bench/systems.py).
SLOs come from flags, or from a preset: k x the unloaded TTFT/TPOT measured
on colocated vLLM at the start of the run (k is recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .compare_report import GOAL, write_report
from .metrics import summarize
from .run import first_model
from .systems import (TANDEM_VARIANTS, System, check_nixl, prefills_on_decode_nodes, start_tandem, start_vllm_colocated,
                      start_vllm_nixl)
from .workloads import TraceEntry, assign_tiers, generate, materialize, warm_entries



def ratios_for(cores: int) -> list[tuple[int, int]]:
    """P:D ratios that fit: every node needs a core of its own pool."""
    out = [(1, 1)]
    if cores >= 3:
        out += [(1, 2), (2, 1)]
    return out


def parse_ratios(text: str) -> list[tuple[int, int]]:
    """``--ratios 2:1,1:1`` as [(2, 1), (1, 1)]; 0:N is a cluster without a prefill pool (its decode
    nodes prefill what they decode: Tandem's conditional disaggregation, always local)."""
    out = []
    for part in text.split(","):
        p, sep, d = part.strip().partition(":")
        if not sep or not p.isdigit() or not d.isdigit() or int(p) < 0 or int(d) < 1:
            raise SystemExit(f"--ratios: {part.strip()!r} is not P:D (e.g. 2:1, or 0:2 for no prefill pool)")
        out.append((int(p), int(d)))
    return out


class Pinning:
    """Where the load generator runs. With cores to spare (4 or more) the last core is the
    client's and the systems get the rest; on fewer, the client shares the systems' cores
    (its own CPU use is in every result). This process sits on the systems' cores, so the
    servers it starts inherit them, and moves to the client's only while it sends load."""

    def __init__(self, cores: list[int], client: list[int]) -> None:
        self.client = sorted(client)
        self.systems = [c for c in cores if c not in client] or list(cores)
        if self.client:
            os.sched_setaffinity(0, self.systems)

    @contextlib.contextmanager
    def client_side(self) -> Iterator[None]:
        if not self.client:
            yield
            return
        os.sched_setaffinity(0, self.client)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.systems)

    def describe(self) -> str:
        if self.client:
            return f"load generator pinned to core(s) {self.client}, systems on {self.systems}"
        return (f"load generator shares the systems' cores {self.systems} (too few to spare one; "
                "its CPU share is reported per probe)")


PINNING = Pinning([], [])


def _run(target: str, entries: list[TraceEntry], slo: tuple[float | None, float | None]) -> dict[str, Any]:
    import uvloop

    from .loadgen import run_trace

    model = first_model(target)
    with PINNING.client_side():
        res = uvloop.run(run_trace(target, entries, model=model, slo=slo))
    s = summarize(res.timings, res.duration_s, *slo)
    s["client_cpu_share"] = res.client_cpu_s / res.duration_s if res.duration_s else 0.0
    ok = [t for t in res.timings if t.ok]
    s["ttft_values"] = [t.ttft for t in ok if t.ttft is not None]
    s["tpot_values"] = [t.tpot for t in ok if t.tpot is not None]
    return s


def _spaced(workload: str, n: int, gap_s: float, seed: int, max_model_len: int) -> list[TraceEntry]:
    """``n`` requests of a workload, one every ``gap_s`` seconds (no overlap, no load)."""
    entries = generate(workload, rate=1.0, duration_s=60, seed=seed, max_model_len=max_model_len)[:n]
    for i, e in enumerate(entries):
        e.arrival_s = gap_s * i
    materialize(entries, seed, 600)
    return entries


def warm_corpus(system: System, args: argparse.Namespace) -> None:
    """--warm-prefixes: each prefix of prefix-heavy's corpus, or each of multi-turn's conversations
    under way, once, one at a time, unmeasured (as a deployment has seen its shared system prompts,
    documents and the conversations in progress before the traffic being measured)."""
    entries = warm_entries(args.workload, args.prefixes, args.max_model_len, 600, args.seed)
    what = "conversations under way" if args.workload == "multi-turn" else "prefixes of the corpus"
    print(f"  {system.name}: warming {len(entries)} {what} ...", flush=True)
    t = 0.0
    for e in entries:  # one at a time: a warm-up, not load
        e.arrival_s = t
        t += 1.5
    _run(system.target, entries, (None, None))


def unloaded_slos(target: str, workload: str, max_model_len: int, k_ttft: float, k_tpot: float,
                  n: int = 5) -> dict[str, float]:
    """SLO = k x the median unloaded TTFT / TPOT (one request at a time, 2 s apart)."""
    s = _run(target, _spaced(workload, n, 2.0, 9999, max_model_len), (None, None))
    ttft, tpot = statistics.median(s["ttft_values"]), statistics.median(s["tpot_values"])
    return {"unloaded_ttft_s": ttft, "unloaded_tpot_s": tpot, "k_ttft": k_ttft, "k_tpot": k_tpot,
            "slo_ttft_s": k_ttft * ttft, "slo_tpot_s": k_tpot * tpot}


def warm_up(system: System, workload: str, max_model_len: int, n: int = 4) -> None:
    """A few unmeasured requests first: a fresh engine's first steps are slow."""
    _run(system.target, _spaced(workload, n, 0.5, 4242, max_model_len), (None, None))


def sweep(system: System, args: argparse.Namespace, slo: tuple[float, float],
          overload: list[tuple[float, float]] = (), warm: bool = True,  # type: ignore[assignment]
          swept: bool = True) -> list[dict[str, Any]]:
    """One row per probed rate, in order. Once no request meets the SLOs at a rate (median
    attainment 0), higher rates are not probed: an overloaded system drains its queue for
    minutes per probe, to measure another 0 (``--probe-all`` probes them anyway). Then the
    ``overload`` probes, (multiple of the goodput, rate), each whatever came before (only
    those when not ``swept``)."""
    if warm:
        warm_up(system, args.workload, args.max_model_len)
        if getattr(args, "warm_prefixes", False):
            warm_corpus(system, args)
    rows: list[dict[str, Any]] = []
    probes = [(ri, rate, None) for ri, rate in enumerate(args.rates)] if swept else []
    probes += [(100 + i, rate, k) for i, (k, rate) in enumerate(overload)]
    stop = False
    for ri, rate, k in probes:
        if stop and k is None:
            continue
        reps = []
        for rep in range(args.reps):
            # A fresh seed per probe: replaying one seed at every rate would make every
            # run after the first a prefix-cache hit. The same probe is identical across systems.
            seed = args.seed + 1000 * ri + rep
            entries = generate(args.workload, rate=rate, duration_s=args.duration, seed=seed,
                               max_model_len=args.max_model_len, prefixes_n=getattr(args, "prefixes", None),
                               corpus_seed=args.seed if getattr(args, "warm_prefixes", False) else None)
            materialize(entries, seed, 600)
            if getattr(args, "ttft_tiers", None):
                assign_tiers(entries, args.ttft_tiers, seed)
            s = _run(system.target, entries, slo)
            print(f"  {system.name:16} rate {rate:5.2f} rep {rep}: attainment {s['slo_attainment']:.0%}, "
                  f"TTFT p50 {s['ttft_s']['p50'] * 1000:.0f} ms, TPOT p50 {s['tpot_s']['p50'] * 1000:.1f} ms, "
                  f"refused {s['rejected']}", flush=True)
            reps.append(s)
        att = [r["slo_attainment"] for r in reps]
        rows.append({"rate": rate, "attainment_median": statistics.median(att), "attainment_min": min(att),
                     "attainment_max": max(att), "reps": reps,
                     "in_slo_rps": statistics.median(r["goodput_at_rate_rps"] for r in reps)})
        if k is not None:
            rows[-1]["x_goodput"] = k
        elif rows[-1]["attainment_median"] == 0 and not args.probe_all and rate != args.rates[-1]:
            print(f"  {system.name:16} met no SLO at {rate} req/s; not probing higher rates", flush=True)
            stop = True
    return rows


def overload_rates(multiples: list[float], rows: list[dict[str, Any]], rates: list[float]) -> list[tuple[float, float]]:
    """(multiple, rate) for each multiple of the goodput read off ``rows`` (the lowest swept rate
    when none met the goal)."""
    g = goodput_from_sweep(rows) or min(rates)
    return [(k, round(k * g, 3)) for k in multiples]


def goodput_from_sweep(rows: list[dict[str, Any]]) -> float:
    """The highest swept rate whose median attainment meets the goal (0 if none)."""
    return max([r["rate"] for r in rows if r["attainment_median"] >= GOAL], default=0.0)


def bench_model(model: str, out: Path) -> str:
    """``model``, or the seeded bench model under ``out`` (made once)."""
    from tandem.local.model import BENCH_SPEC, make_tiny_model

    if model:
        return model
    path = out / "model-bench-seed0"
    if not Path(path, "tandem_model.json").exists():
        print("making the seeded bench model ...", flush=True)
        make_tiny_model(str(path), seed=0, spec=BENCH_SPEC)
    return str(path)


def add_compare_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="", help="HF model dir (default: the seeded bench model, made once)")
    ap.add_argument("--workload", default="chat")
    ap.add_argument("--prefixes", type=int, default=None,
                    help="prefix-heavy: shared prefixes; multi-turn: conversations at once (the working set)")
    ap.add_argument("--warm-prefixes", action="store_true",
                    help="prefix-heavy: one corpus of prefixes for every probe (the tails still differ), each "
                         "prefix sent once before the sweep; multi-turn: the conversations are already under "
                         "way (0 to 3/4 of the context each) and the same for every probe, each sent once "
                         "before the sweep: steady state, not each probe's first sights")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0,
                    help="each engine's own KV cache (fractions too: make it smaller than the working set); "
                         "each prefill engine's when --decode-kv-cache-gib is given")
    ap.add_argument("--decode-kv-cache-gib", type=float, default=0.0,
                    help="each decode engine's own KV cache (Tandem's and vllm-nixl's; its running batch lives "
                         "there); 0: --kv-cache-gib")
    ap.add_argument("--kvstore-ram-gib", type=float, default=0.0,
                    help="Tandem's nodes get a KV store RAM tier each (0: none). Colocated vLLM's one cache "
                         "is as large as all the KV memory of the run's largest Tandem cluster: every engine's "
                         "cache and every RAM tier")
    ap.add_argument("--kvstore-disk", action="store_true",
                    help="Tandem's nodes get a KV store disk tier each too (under --out, emptied before each system)")
    ap.add_argument("--rates", default="0.5,1,2", help="arrival rates to sweep, req/s")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per probe")
    ap.add_argument("--reps", type=int, default=2, help="seeded repetitions per rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--systems", default="tandem,tandem-noadmit,vllm-colocated,vllm-nixl,vllm-nixl-fixed",
                    help="which systems, comma separated, run in this order (tandem runs every P:D ratio "
                         "that fits the cores): "
                         "tandem (admission on, conditional disaggregation on), tandem-headroom (admission "
                         "with 10 %% TPOT headroom), tandem-margin (a TPOT margin under overload, by the share "
                         "refused), tandem-colocate (a prefill node serves a request whole when the "
                         "disaggregated choice would miss its SLO), tandem-colocateonly (that, and no prefill on "
                         "the decode node), tandem-unprotected (a newcomer may push running streams past their "
                         "TPOT objective), tandem-roomblind (admission does not predict the wait for room in "
                         "a decode node's KV cache), tandem-syncload (KV store hits load before the step that "
                         "computes the prompt's rest, not beside it), tandem-noadmit (admission off), tandem-nolocal "
                         "(admission on, "
                         "conditional disaggregation off: always disaggregated), tandem-disagg (both off: "
                         "always disaggregated, accepts everything), tandem-fifo (prefills sent at once, run "
                         "in arrival order), tandem-engine (sent at once, vLLM priority scheduling by "
                         "deadline), tandem-leastloaded and tandem-random (routing that ignores what the "
                         "nodes' KV stores hold), tandem-bigstep (nodes with a 2048-token step budget, "
                         "vLLM's default here, instead of the decode nodes' 256), tandem-sharedsteps (engines "
                         "that start a prompt beside another's last chunk), tandem-nopace (TTFT predictions not "
                         "scaled by a prefill node's pace), tandem-coordondecode (the coordinator on the decode "
                         "node's cores, not the prefill node's), "
                         "vllm-colocated, vllm-nixl, vllm-nixl-fixed")
    ap.add_argument("--ratios", default="",
                    help="Tandem's P:D ratios, e.g. 2:1,1:1 (default: every ratio with a core per node; nodes "
                         "of one pool share cores when there are fewer); 0:N: no prefill pool, the decode nodes "
                         "prefill what they decode")
    ap.add_argument("--tandem-flags", default="",
                    help="more coordinator flags for every Tandem system, after its variant's (e.g. "
                         "\"--conditional-disagg off\" to compare routing policies on the prefill pool alone; "
                         "each coordinator runs on its first prefill node's cores unless they give --cores)")
    ap.add_argument("--slo-ttft", type=float, default=None)
    ap.add_argument("--slo-tpot", type=float, default=None)
    ap.add_argument("--k-ttft", type=float, default=5.0, help="preset: SLO TTFT = k x unloaded TTFT")
    ap.add_argument("--k-tpot", type=float, default=3.0, help="preset: SLO TPOT = k x unloaded TPOT")
    ap.add_argument("--ttft-tiers", default="",
                    help="SLO tiers: each request's TTFT objective is the run's times one of these, e.g. "
                         "1,4 (half tight, half relaxed; seeded); attainment is against each one's own")
    ap.add_argument("--overload", default="",
                    help="also probe every system at these multiples of the first system's goodput, e.g. "
                         "1,1.5,2 (goodput held under overload; the report has its table)")
    ap.add_argument("--probe-all", action="store_true",
                    help="probe every rate even after a system met no SLO at a lower one")
    ap.add_argument("--client-cores", default="auto",
                    help="cores for the load generator, apart from the systems': auto = the last core when "
                         "there are 4 or more, none (shared) below that; or a list like 7; or none")
    ap.add_argument("--out", default="bench/results/compare")


def cmd_compare(args: argparse.Namespace) -> int:
    import platform

    from tandem.local.model import param_count

    args.rates = [float(r) for r in str(args.rates).split(",")]
    args.ttft_tiers = [float(k) for k in str(args.ttft_tiers).split(",") if k.strip()]
    wanted = [s.strip() for s in args.systems.split(",")]
    known = {f"tandem{v}" for v in TANDEM_VARIANTS} | {"vllm-colocated", "vllm-nixl", "vllm-nixl-fixed"}
    if set(wanted) - known:
        raise SystemExit(f"unknown system(s) {sorted(set(wanted) - known)}; known: {sorted(known)}")
    if args.warm_prefixes and args.workload not in ("prefix-heavy", "multi-turn"):
        raise SystemExit("--warm-prefixes warms prefix-heavy's corpus of prefixes or multi-turn's conversations; "
                         "use it with --workload prefix-heavy or multi-turn")
    extra = {w.split("=", 1)[0] for w in shlex.split(args.tandem_flags) if w.startswith("--")}
    for name in wanted:  # a variant's own flags win silently otherwise (the last one given)
        own = TANDEM_VARIANTS[name.removeprefix("tandem")][0] if name.startswith("tandem") else []
        if extra & set(own):
            raise SystemExit(f"--tandem-flags sets {', '.join(sorted(extra & set(own)))}, which {name} sets itself")
    no_pool = args.ratios and any(p == 0 for p, _ in parse_ratios(args.ratios))
    for name in wanted if no_pool else []:  # a 0:N cluster whose decode nodes may not prefill serves nothing
        if name.startswith("tandem") and not prefills_on_decode_nodes(
                TANDEM_VARIANTS[name.removeprefix("tandem")][0] + shlex.split(args.tandem_flags)):
            raise SystemExit(f"{name} at 0:N: with no prefill pool the decode nodes must prefill, and its "
                             "--conditional-disagg off forbids it (leave 0:N out of --ratios for it)")
    if {"vllm-nixl", "vllm-nixl-fixed"} & set(wanted):
        check_nixl()  # before any measurement, not after the first systems ran
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bench_model(args.model, out)
    global PINNING
    from . import systems

    if args.kvstore_disk and not args.kvstore_ram_gib:
        raise SystemExit("--kvstore-disk needs --kvstore-ram-gib (chunks on disk load through RAM)")
    all_cores = sorted(os.sched_getaffinity(0))
    if args.client_cores == "auto":
        client = all_cores[-1:] if len(all_cores) >= 4 else []
    elif args.client_cores == "none":
        client = []
    else:
        from tandem.node.config import parse_cores

        client = sorted(parse_cores(args.client_cores))
        if not set(client) < set(all_cores):
            raise SystemExit(f"--client-cores {args.client_cores}: must be some, not all, of {all_cores}")
    PINNING = Pinning(all_cores, client)
    cores = PINNING.systems
    layouts = parse_ratios(args.ratios) if args.ratios else ratios_for(len(cores))
    systems.MEMORY = systems.Memory(args.kv_cache_gib, args.kvstore_ram_gib,
                                    str(out / "kvstore") if args.kvstore_disk else "",
                                    args.decode_kv_cache_gib, tuple(layouts))
    print(PINNING.describe(), flush=True)
    slo_doc: dict[str, Any]
    if args.slo_ttft is not None and args.slo_tpot is not None:
        slo_doc = {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot, "how": "given on the command line"}
    else:
        print("measuring unloaded latency on colocated vLLM for the SLO preset ...", flush=True)
        ref = start_vllm_colocated(model, cores, args.max_model_len, out)
        try:
            warm_up(ref, args.workload, args.max_model_len)
            pre = unloaded_slos(ref.target, args.workload, args.max_model_len, args.k_ttft, args.k_tpot)
        finally:
            ref.stop()
        slo_doc = {"ttft_s": pre["slo_ttft_s"], "tpot_s": pre["slo_tpot_s"], "preset": pre,
                   "how": f"preset: {args.k_ttft} x unloaded TTFT {pre['unloaded_ttft_s'] * 1000:.1f} ms, "
                          f"{args.k_tpot} x unloaded TPOT {pre['unloaded_tpot_s'] * 1000:.2f} ms"}
    slo = (slo_doc["ttft_s"], slo_doc["tpot_s"])
    print(f"SLO: TTFT {slo[0] * 1000:.0f} ms, TPOT {slo[1] * 1000:.1f} ms ({slo_doc['how']})", flush=True)
    systems_doc = []
    starters = []
    for name in wanted:  # in the order given (run the same systems in reverse to see drift)
        if name.startswith("tandem"):
            variant = name.removeprefix("tandem")
            starters += [(f"tandem-{p}:{d}{variant}",
                          lambda p=p, d=d, v=variant: start_tandem(model, p, d, args.max_model_len, out, cores, v,
                                                                   shlex.split(args.tandem_flags)))
                         for p, d in layouts]
        elif name == "vllm-colocated":
            starters.append((name, lambda: start_vllm_colocated(model, cores, args.max_model_len, out)))
        else:
            fixed = name == "vllm-nixl-fixed"
            starters.append((name, lambda fixed=fixed: start_vllm_nixl(model, cores, args.max_model_len, out, fixed)))
    multiples = [float(k) for k in str(args.overload).split(",") if k.strip()]
    overload: list[tuple[float, float]] = []
    failed: list[dict[str, str]] = []
    for name, start in starters:
        print(f"starting {name} ...", flush=True)
        try:
            system = start()
        except RuntimeError as exc:  # did not come up: the others are still measured, the report says so
            print(f"  {name} did not start: {exc}", flush=True)
            failed.append({"name": name, "error": str(exc)})
            continue
        try:
            rows = sweep(system, args, slo)
            if multiples and not overload:  # the first system: its goodput sets the overload rates
                overload = overload_rates(multiples, rows, args.rates)
                print(f"  overload probes at {overload} (multiple, req/s)", flush=True)
            over = sweep(system, args, slo, overload, warm=False, swept=False) if overload else []
            try:
                facts = system.facts()
            except Exception as exc:  # the measurements stand without them
                print(f"  {name}: could not collect its facts: {exc!r}", flush=True)
                facts = {"facts_error": repr(exc)}
        finally:
            system.stop()
        systems_doc.append({"name": system.name, "version": system.version, "commands": system.commands,
                            "notes": system.notes, "facts": facts, "sweep": rows, "overload": over,
                            "goodput_rps": goodput_from_sweep(rows)})
    doc = {"machine": f"{platform.platform()}, {len(all_cores)} cores", "client": PINNING.describe(), "model": model,
           "model_params_m": param_count(model) / 1e6, "workload": args.workload, "rates": args.rates,
           "duration_s": args.duration, "reps": args.reps, "slo": slo_doc, "systems": systems_doc,
           "failed": failed,
           "overload": overload, "ttft_tiers": args.ttft_tiers, "prefixes": args.prefixes,
           "warm_prefixes": bool(args.warm_prefixes),
           "memory": {"kv_cache_gib": args.kv_cache_gib, "decode_kv_cache_gib": systems.MEMORY.decode_gib,
                      "kvstore_ram_gib": args.kvstore_ram_gib, "kvstore_disk": bool(args.kvstore_disk),
                      "colocated_kv_gib": systems.MEMORY.colocated_gib,
                      "tandem_kv_gib": {f"{p}:{d}": systems.MEMORY.tandem_gib(p, d) for p, d in layouts}},
           "goodput_kind": "DistServe goodput from a rate sweep (highest swept rate with >= 90% attainment)"}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    report = write_report(out, doc)
    for s in systems_doc:
        print(f"{s['name']:16} goodput {s['goodput_rps']:.2f} req/s")
    print(f"wrote {out / 'results.json'} and {report}")
    for f in failed:
        print(f"{f['name']} did not start (see the report)")
    return 1 if failed else 0
