"""`tandem bench scatter`: how far a prefill's time scatters on this host, alone and inside a
real node: the floor under admission's TTFT error here.

Prompts of random tokens (nothing cached), each prefill's time measured; the phases (``--phases``):

- ``engine-idle``: one vLLM engine as a prefill node runs it (its engine-core and worker processes,
  float32, eager, no prefix cache, no KV connector), the whole of it pinned to ``--core``, the
  other cores idle; prompts one at a time, one output token each, timed from this process.
- ``engine-memory``: the same beside a process streaming memory on another core (a decode node's
  steps are bandwidth-bound).
- ``node-serial``: a real 1:1 cluster (bench/systems.py's, with admission, local prefill and
  colocation off), prompts one at a time through the coordinator, one output token each (no KV
  moves): the prefill node's own time from its engine's first step (its log).
- ``node-open``: the same cluster, requests of ``--stream-tokens`` output tokens sent open loop
  (exponential gaps, mean ``--gap-s``): prefills beside decode streams, KV moving, the relay.

In every phase the prompts' lengths are uniform over ``--min-tokens``..``--max-tokens``; a line
and a quadratic in tokens (admission's prefill fit has both terms) are fitted in hindsight on the
phase's own prefills by least relative squares, and their p50 / p90 error is what a model that
knows only the prompt leaves. ``carried``: the quadratic with the previous prefill's deviation
carried into the next as admission's pace does (coordinator/nodeclient.py: PACE_GAIN of its log,
fading over PACE_HOLD_S): what a perfect reading of the node's speed a moment ago adds. The engine
phases also run ``--fixed-tokens`` prompts, all one length: the best single number for those in
hindsight leaves the scatter of identical work, which no model of the prompt removes.

Error: |predicted - actual| / actual, as the bench's prediction error. Everything is scored on
what it was fitted on, so it is optimistic: admission has to predict before it sees them. This
VM's speed wanders: a phase's quarters are shown apart (its drift).

    tandem bench scatter --n 200 --out bench/results/scatter
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tandem.logs import log_time

PHASES = ("node-serial", "node-open", "engine-idle", "engine-memory")  # the order they run in
# A core's worth of memory traffic: copying 512 MiB over and over (no cache holds it)
_MEMORY_HOG = "import numpy as np\na = np.ones(64 << 20)\nb = np.empty_like(a)\nwhile True:\n    np.copyto(b, a)\n"
# the coordinator's id for a request of ours (its client id)
_CLIENT_ID = re.compile(r"request (req-\S+): client id '(scatter-[\w-]+)'")
# a prefill node's finish line for a prefill call: the call's id (the coordinator's request id, then
# -p<leg>.<attempt>), tokens, cached tokens, its engine's time from its first step
_PREFILLED = re.compile(r"^(\S+ \S+) .*request (\S+?-p\d+\.\d+): prefilled (\d+) tokens \((\d+) cached\) "
                        r"in [\d.]+ s \(([\d.]+) s from its first step\)")


def node_prefills(path: str | Path) -> dict[str, tuple[int, float, float]]:
    """A prefill node's log: its prefill calls by their own id (a request's retries and later legs
    apart: the coordinator's request id is the part before the last "-p"), each as (uncached tokens,
    its engine's seconds from its first step, when that step began (epoch seconds))."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if m := _PREFILLED.search(line):
            took = float(m.group(5))
            end = log_time(m.group(1))
            out[m.group(2)] = (int(m.group(3)) - int(m.group(4)), took, end - took)
    return out


def best_constant(times: list[float], steps: int = 601) -> tuple[float, float]:
    """(the one number that, predicting every one of ``times``, gives them the lowest p90 error;
    that p90): error_kinds' ``best_scale`` of a prediction of 1, over ``steps`` factors from their
    least to their most."""
    from tandem.bench.error_kinds import best_scale

    return best_scale([(1.0, t) for t in times], min(times), max(times), steps)


def fit_relative(tokens: list[int], times: list[float], degree: int) -> list[float]:
    """Coefficients of a polynomial in tokens (constant first) that minimize the sum of squared
    relative errors over the samples."""
    import numpy as np

    k, t = np.asarray(tokens, float), np.asarray(times, float)
    x = np.column_stack([k ** i for i in range(degree + 1)])
    coef, *_ = np.linalg.lstsq(x / t[:, None], np.ones_like(t), rcond=None)
    return [float(c) for c in coef]


def poly(coef: list[float], tokens: int) -> float:
    return sum(c * tokens ** i for i, c in enumerate(coef))


def carried(predicted: list[float], samples: list[tuple[int, float, float]]) -> list[float]:
    """``predicted`` (in the order the prefills started), each after the first scaled as admission's
    pace would scale it had it read the previous prefill's deviation from its prediction exactly:
    exp(PACE_GAIN x log(actual / predicted), faded by exp(-age / PACE_HOLD_S)), the age from that
    prefill's end to this one's start."""
    from tandem.coordinator.nodeclient import PACE_GAIN, PACE_HOLD_S

    out = list(predicted[:1])
    for i in range(1, len(samples)):
        _, took, started = samples[i - 1]
        age = max(0.0, samples[i][2] - (started + took))
        deviation = math.log(took / predicted[i - 1])
        out.append(predicted[i] * math.exp(PACE_GAIN * deviation * math.exp(-age / PACE_HOLD_S)))
    return out


def hindsight_errors(samples: list[tuple[int, float, float]],
                     coef: list[float] | None = None) -> tuple[list[float], list[float]]:
    """|predicted - actual| / actual of each of ``samples`` ((tokens, seconds, started at), in the order
    they started) under the polynomial ``coef`` in tokens (default: the quadratic fitted on them),
    and under it with the pace carried."""
    if coef is None:
        coef = fit_relative([k for k, _, _ in samples], [t for _, t, _ in samples], 2)
    pred = [poly(coef, k) for k, _, _ in samples]
    return ([abs(p - t) / t for p, (_, t, _) in zip(pred, samples)],
            [abs(p - t) / t for p, (_, t, _) in zip(carried(pred, samples), samples)])


def quarters(predicted: list[float], actual: list[float]) -> list[float]:
    """The median of actual / predicted in each quarter of the run, in order (the host's drift)."""
    from tandem.bench.metrics import percentile

    n = len(actual)
    cut = [round(n * i / 4) for i in range(5)]
    return [percentile([a / p for p, a in zip(predicted[cut[i]:cut[i + 1]], actual[cut[i]:cut[i + 1]])], 50)
            for i in range(4) if cut[i + 1] > cut[i]]


def summarize(varied: list[tuple[int, float, float]], fixed: list[float] | None = None) -> dict[str, Any]:
    """A phase's numbers from its prefills of varied lengths, (tokens, seconds, started at) each
    in the order they started (started at: epoch seconds from a node's log, or this process's
    perf_counter for an engine here; only differences count): the fits' error and drift, the
    quadratic's with the pace carried;
    with ``fixed`` (the times of prompts all one length), their spread and best constant."""
    from tandem.bench.forecast import p50_p90
    from tandem.bench.metrics import percentile

    tokens, times = [k for k, _, _ in varied], [t for _, t, _ in varied]
    out: dict[str, Any] = {"varied": {"n": len(varied)}}
    for name, degree in (("line", 1), ("quadratic", 2)):
        coef = fit_relative(tokens, times, degree)
        errors, paced = hindsight_errors(varied, coef)
        out["varied"][name] = {"coefficients": coef, **p50_p90(errors),
                               "drift": quarters([poly(coef, k) for k in tokens], times)}
        if name == "quadratic":
            out["varied"]["carried"] = p50_p90(paced)
    if fixed:
        const, const_p90 = best_constant(fixed)
        out["fixed"] = {"n": len(fixed), **{f"p{q}_s": percentile(fixed, q) for q in (10, 50, 90)},
                        "best_constant_s": const, "best_constant_p90": const_p90,
                        "best_constant_p50": percentile([abs(const - t) / t for t in fixed], 50),
                        "drift": quarters([const] * len(fixed), fixed)}
    return out


def _lengths(args: argparse.Namespace, rnd: random.Random) -> list[int]:
    return [rnd.randint(args.min_tokens, args.max_tokens) for _ in range(args.n)]


def _engine_phase(llm: Any, lengths: list[int], rnd: random.Random, vocab: int, what: str) -> list[tuple[int, float, float]]:
    """(tokens, seconds, started at) of each prompt of ``lengths``, one at a time."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, detokenize=False)
    out = []
    for i, n in enumerate(lengths):
        prompt = [rnd.randrange(5, vocab) for _ in range(n)]
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
        out.append((n, time.perf_counter() - t0, t0))
        if (i + 1) % 50 == 0 or i + 1 == len(lengths):
            print(f"  {what}: {i + 1}/{len(lengths)} prefills", flush=True)
    return out


def _post(url: str, rid: str, ids: list[int], max_tokens: int) -> None:
    body = json.dumps({"prompt": ids, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json", "X-Request-Id": rid})
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()


def node_phases(args: argparse.Namespace, vocab: int, rnd: random.Random) -> dict[str, list[tuple[int, float, float]]]:
    """The node phases asked for, on one 1:1 cluster: each one's (tokens, engine seconds, started at)
    from the prefill node's log, in the order they started."""
    from tandem.bench.systems import start_tandem

    phases = [p for p in args.phases if p.startswith("node-")]
    system = start_tandem(args.model, 1, 1, max(args.max_tokens + args.stream_tokens, 64) + 16, Path(args.out),
                          sorted(os.sched_getaffinity(0)), "-disagg")
    logs = Path(args.out) / "tandem-1p1d-disagg"
    errors: list[BaseException] = []
    try:
        for i in range(10):  # warm-up
            _post(system.target, f"warm-{i}", [rnd.randrange(5, vocab) for _ in range(args.max_tokens)], 1)
        for phase in phases:
            print(f"{phase}:", flush=True)
            lengths = _lengths(args, rnd)
            threads = []
            for i, n in enumerate(lengths):
                ids, rid = [rnd.randrange(5, vocab) for _ in range(n)], f"scatter-{phase}-{i}"
                if phase == "node-serial":
                    _post(system.target, rid, ids, 1)
                else:
                    def send(rid: str = rid, ids: list[int] = ids) -> None:
                        try:
                            _post(system.target, rid, ids, args.stream_tokens)
                        except BaseException as exc:  # noqa: BLE001 - reported below, with the rest
                            errors.append(exc)

                    threads.append(threading.Thread(target=send, daemon=True))
                    threads[-1].start()
                    time.sleep(rnd.expovariate(1.0 / args.gap_s))
                if (i + 1) % 50 == 0 or i + 1 == len(lengths):
                    print(f"  {phase}: {i + 1}/{len(lengths)} requests sent", flush=True)
            for t in threads:
                t.join()
            if errors:
                raise RuntimeError(f"{len(errors)} of {phase}'s requests failed; the first: {errors[0]!r}")
        time.sleep(1.0)  # the node's log pump
    finally:
        system.stop()
    ours = {m.group(1): m.group(2).rsplit("-", 1)[0][len("scatter-"):]
            for line in (logs / "coordinator.log").read_text(encoding="utf-8", errors="replace").splitlines()
            if (m := _CLIENT_ID.search(line))}
    out: dict[str, list[tuple[int, float, float]]] = {p: [] for p in phases}
    for call, sample in node_prefills(logs / "prefill-0.log").items():
        if (rid := call.rsplit("-p", 1)[0]) in ours:
            out[ours[rid]].append(sample)
    for phase, samples in out.items():
        if len(samples) != args.n:
            raise RuntimeError(f"{phase}: the prefill node logged {len(samples)} prefill calls for its {args.n} "
                               f"requests (a retry is one more) ({logs})")
        samples.sort(key=lambda s: s[2])
    return out


def engine_phases(args: argparse.Namespace, vocab: int, rnd: random.Random) -> dict[str, dict[str, Any]]:
    """The engine phases asked for, on one engine in this process pinned to ``args.core`` (this
    process stays pinned there): each one's varied (tokens, seconds, started at) and fixed times."""
    from tandem.node.config import pin_process

    others = [c for c in sorted(os.sched_getaffinity(0)) if c != args.core]
    pin_process(str(args.core))  # before vLLM starts: its engine-core and worker processes inherit it
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(args.core)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    from vllm import LLM

    llm = LLM(model=args.model, dtype="float32", enforce_eager=True,
              max_model_len=max(args.max_tokens, args.fixed_tokens) + 16, block_size=32, enable_prefix_caching=False)
    _engine_phase(llm, [args.fixed_tokens] * 20, rnd, vocab, "warm-up")
    out = {}
    for phase in (p for p in args.phases if p.startswith("engine-")):
        hog = None
        if phase == "engine-memory":
            hog = subprocess.Popen([sys.executable, "-c", _MEMORY_HOG],
                                   preexec_fn=lambda: os.sched_setaffinity(0, {others[0]}))
            time.sleep(2.0)
        try:
            print(f"{phase}:", flush=True)
            fixed = [t for _, t, _ in _engine_phase(llm, [args.fixed_tokens] * args.n, rnd, vocab, "fixed")]
            varied = _engine_phase(llm, _lengths(args, rnd), rnd, vocab, "varied")
        finally:
            if hog is not None:
                died = hog.poll()
                hog.kill()
                hog.wait()
                if died is not None:
                    raise RuntimeError(f"{phase}: the memory-streaming process exited (code {died}) before the "
                                       "phase ended: the phase ran without it")
        out[phase] = {"varied": varied, "fixed": fixed}
    return out


def write_report(out: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = doc["phases"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for phase, ph in phases.items():
        coef = ph["varied"]["quadratic"]["coefficients"]
        ratios = [t / poly(coef, k) for k, t, _ in ph["varied_samples"]]
        axes[0].scatter([k for k, _, _ in ph["varied_samples"]], ratios, s=7, label=phase)
        axes[1].plot(ratios, lw=0.8, label=phase)
    axes[0].set_xlabel("prompt tokens")
    axes[1].set_xlabel("prefill, in the order they started")
    for ax in axes:
        ax.set_ylabel("time / quadratic fitted in hindsight")
        ax.axhline(1.2, color="grey", ls=":", lw=0.8)
        ax.axhline(1 / 1.2, color="grey", ls=":", lw=0.8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=110)
    plt.close(fig)
    pct = lambda x: f"{x * 100:.1f} %"  # noqa: E731
    lines = ["# How far a prefill's time scatters on this host", "",
             f"{doc['n']} prefills a phase of {doc['min_tokens']}-{doc['max_tokens']} random tokens "
             f"({Path(doc['model']).name}; the engine phases on core {doc['core']}). Error: |predicted - actual| / "
             "actual, with the prediction fitted in hindsight on the same prefills (optimistic); `carried`: the "
             "quadratic with the previous prefill's deviation carried as admission's pace does. The goal for "
             "admission's TTFT error is a p90 of 20 %.", "",
             "| phase | line: p50 / p90 | quadratic: p50 / p90 | carried: p50 / p90 | drift by quarter (quadratic) |",
             "|---|---|---|---|---|"]
    for phase, ph in phases.items():
        v = ph["varied"]
        lines.append(f"| {phase} | {pct(v['line']['p50'])} / {pct(v['line']['p90'])} | "
                     f"{pct(v['quadratic']['p50'])} / {pct(v['quadratic']['p90'])} | "
                     f"{pct(v['carried']['p50'])} / {pct(v['carried']['p90'])} | "
                     f"{' '.join(f'x{d:.3f}' for d in v['quadratic']['drift'])} |")
    fixed = {p: ph["fixed"] for p, ph in phases.items() if "fixed" in ph}
    if fixed:
        lines += ["", f"The same {doc['fixed_tokens']} tokens every time:", "",
                  "| phase | p10 / p50 / p90 | best constant: p50 / p90 error | drift by quarter |", "|---|---|---|---|"]
        for phase, f in fixed.items():
            lines.append(f"| {phase} | {f['p10_s'] * 1000:.0f} / {f['p50_s'] * 1000:.0f} / {f['p90_s'] * 1000:.0f} ms | "
                         f"{pct(f['best_constant_p50'])} / {pct(f['best_constant_p90'])} | "
                         f"{' '.join(f'x{d:.3f}' for d in f['drift'])} |")
    lines += ["", "![time against its hindsight prediction](scatter.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="", help="HF model dir (default: the seeded bench model, made once under --out)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma separated, of: {', '.join(PHASES)}")
    ap.add_argument("--core", type=int, default=None,
                    help="the core the engine phases run on (default: this process's first)")
    ap.add_argument("--n", type=int, default=200, help="prefills a phase (and as many of --fixed-tokens)")
    ap.add_argument("--fixed-tokens", type=int, default=300)
    ap.add_argument("--min-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=1000)
    ap.add_argument("--stream-tokens", type=int, default=64, help="node-open: output tokens a request")
    ap.add_argument("--gap-s", type=float, default=1.0, help="node-open: mean seconds between requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/scatter")


def cmd_scatter(args: argparse.Namespace) -> int:
    from tandem.bench.compare import bench_model

    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not args.phases or set(args.phases) - set(PHASES) or len(set(args.phases)) < len(args.phases):
        raise SystemExit(f"--phases: some of {', '.join(PHASES)}, each once, comma separated")
    if args.n < 8 or not 1 <= args.min_tokens <= args.max_tokens or args.fixed_tokens < 1 \
            or args.stream_tokens < 2 or not args.gap_s > 0:
        raise SystemExit("--n must be at least 8, 1 <= --min-tokens <= --max-tokens, --fixed-tokens >= 1, "
                         "--stream-tokens >= 2 and --gap-s > 0")
    cores = sorted(os.sched_getaffinity(0))
    if args.core is None:
        args.core = cores[0]
    elif args.core not in cores:
        raise SystemExit(f"--core {args.core}: not a core this process may use ({cores})")
    if "engine-memory" in args.phases and len(cores) < 2:
        raise SystemExit(f"engine-memory needs a core besides --core {args.core}: this process may use {cores}")
    if any(p.startswith("node-") for p in args.phases) and len(cores) < 2:
        raise SystemExit(f"the node phases need 2 cores (a prefill and a decode node): this process may use {cores}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.model = bench_model(args.model, out)
    vocab = int(json.loads((Path(args.model) / "config.json").read_text())["vocab_size"])
    rnd = random.Random(args.seed)
    runs: dict[str, dict[str, Any]] = {}
    if any(p.startswith("node-") for p in args.phases):  # first: the engine phases pin this process
        runs.update({p: {"varied": v} for p, v in node_phases(args, vocab, rnd).items()})
    if any(p.startswith("engine-") for p in args.phases):
        runs.update(engine_phases(args, vocab, rnd))
    phases = {p: {**summarize(runs[p]["varied"], runs[p].get("fixed")), "varied_samples": runs[p]["varied"],
                  **({"fixed_times_s": runs[p]["fixed"]} if "fixed" in runs[p] else {})}
              for p in PHASES if p in runs}
    doc = {"model": args.model, "core": args.core, "n": args.n, "fixed_tokens": args.fixed_tokens,
           "min_tokens": args.min_tokens, "max_tokens": args.max_tokens, "stream_tokens": args.stream_tokens,
           "gap_s": args.gap_s, "seed": args.seed, "phases": phases}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_report(out, doc)
    for phase, ph in phases.items():
        v = ph["varied"]
        print(f"{phase}: quadratic p90 {v['quadratic']['p90'] * 100:.1f} %, carried {v['carried']['p90'] * 100:.1f} %"
              + (f"; the same length, best constant p90 {ph['fixed']['best_constant_p90'] * 100:.1f} %"
                 if "fixed" in ph else ""), flush=True)
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0
