"""`tandem plan --live`: watch a running cluster's workload; recommend, or with --apply make, role switches.

Every ``--every-s`` seconds it reads the coordinator's /metrics (tandem/mix.py) and
its cluster status. Over the last ``--window-s`` that gives the workload as it is
now: arrival rate, prompt and output lengths, and the share of requests that met
their objectives. It plans the cluster's current number of nodes on that mix (the
simulator, from the nodes' profiles: tandem/plan.py) and compares the best
prefill:decode split with the one running. When the best split's predicted goodput
beats the running one's by ``--min-gain`` in ``--confirm`` windows in a row, it
recommends moving one node (the least busy one of the pool that has too many)
to the other pool; with ``--apply`` it does so (`tandem role`), waits until the
node has joined in its new role, and starts a fresh window (the one before mixed
two splits). One node per decision: a plan that moves several gets there in steps,
each checked again on fresh measurements.

Every window it also says how far its previous prediction was from what happened:
the attainment it predicted for the running split at the rate and mix it saw,
against the attainment the coordinator measured over the window that followed.
Its objectives (``--slo-ttft``, ``--slo-tpot``) should be the coordinator's
defaults, which the measured attainment counts against.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.client import Client
from tandem.errors import TandemError
from tandem.membership import add_etcd_tls_args, check_etcd_tls, use_etcd_tls
from tandem.mix import Mix, Scrape, scrape
from tandem.nodespeed import Speed
from tandem.sim import simulate
from tandem.simconfig import SimConfig
from tandem.simresults import attainment
from tandem.timings import Timings
from tandem.tls import TlsConfig, add_tls_args


@dataclass
class Pools:
    prefill: list[tuple[str, int]]  # (node id, requests in flight there) of routable nodes
    decode: list[tuple[str, int]]
    # node id -> its fits and speeds as it last reported them (the nodes that have reported any)
    learned: dict[str, tuple[Timings, dict[str, Speed]]] = field(default_factory=dict)

    @property
    def split(self) -> tuple[int, int]:
        return len(self.prefill), len(self.decode)


def pools(client: Client) -> Pools:
    """The coordinator's routable nodes (up, not draining) by role, with what each has learned."""
    st = client.status(timeout_s=5)
    out = Pools([], [])
    for n in st.nodes:
        if not n.down and not n.draining:
            getattr(out, n.role).append((n.node_id, n.outstanding))
            try:
                out.learned[n.node_id] = (Timings.from_fits(n.fits, f"{n.node_id}, learned"), Speed.by_kind(n.speeds))
            except (ValueError, TypeError):  # no load message yet, fits without both kinds, or a speed
                # of another version's shape: not learned (named in the decision's fits)
                pass
    return out


@dataclass
class Fits:
    """What the planner simulates a pool's nodes with: their times, and how far their work strays."""
    prefill: Timings
    decode: Timings
    prefill_speed: Speed = field(default_factory=Speed)
    decode_speed: Speed = field(default_factory=Speed)
    source: str = "profiles"


def learned_fits(now: Pools, profiles: Fits) -> Fits:
    """``--fits learned``: each pool's fits as its routable nodes have learned them while serving,
    and how far their prefills and steps stray from those, as the coordinator last heard them from
    each node (its cluster status), averaged over the pool. A node that has reported none yet is
    left out and named; a pool none of whose nodes has keeps ``profiles``' times. With no prefill
    pool, the decode nodes' own prefill fits and speeds stand for it (they prefill what they decode)."""
    seen = {kind: [now.learned[n] for n, _ in getattr(now, kind) if n in now.learned] for kind in ("prefill", "decode")}
    missed = [n for n, _ in now.prefill + now.decode if n not in now.learned]
    dec = Timings.mean([t for t, _ in seen["decode"]]) if seen["decode"] else profiles.decode
    pre_from = seen["prefill"] or ([] if now.prefill else seen["decode"])
    pre = Timings.mean([t for t, _ in pre_from]) if pre_from else profiles.prefill
    source = (f"learned by {len(seen['prefill']) + len(seen['decode'])} node(s)"
              + (f"; none reported yet by {', '.join(missed)}" if missed else ""))
    return Fits(pre, dec, Speed.mean([s["prefill"] for _, s in pre_from if "prefill" in s]),
                Speed.mean([s["decode"] for _, s in seen["decode"] if "decode" in s]), source)


def choose_move(current: tuple[int, int], best: tuple[int, int], now: Pools, local: bool = False
                ) -> tuple[str, str] | None:
    """(node id, its new role): one node from the pool that has more than the best split wants,
    the one with the least in flight (then by id); None when the split is already the best.
    ``local``: the decode nodes prefill when there is no prefill pool (the coordinator's
    conditional disaggregation), so the last prefill node may go; the last decode node never."""
    if current == best:
        return None
    src, role = (now.prefill, "decode") if best[0] < current[0] else (now.decode, "prefill")
    if len(src) < (1 if local and role == "decode" else 2):
        return None  # never empty a pool the cluster cannot serve without
    node = min(src, key=lambda n: (n[1], n[0]))[0]
    return node, role


@dataclass
class Options:
    slo_ttft_s: float
    slo_tpot_s: float
    window_s: float = 60.0
    every_s: float = 15.0
    min_gain: float = 0.15
    confirm: int = 2
    min_requests: int = 30
    requests: int = 600  # per simulated probe
    seeds: int = 1
    max_model_len: int = 2048
    kv_bytes_per_token: int = 0
    max_batch: int = 64
    kv_capacity_tokens: int = 0
    order: str = "slack"
    min_duration_s: float = 300.0  # of arrivals per simulated probe (tandem.plan.MIN_DURATION_S)
    admission: bool = False  # model the coordinator's admission (its default is on: --admission on)
    local: bool = False  # the coordinator's conditional disaggregation (--conditional-disagg on): 0:N splits too
    speed: Speed = Speed()  # how far every node's times stray from its profile (plan --node-speed)
    colocate: bool = False  # the coordinator's colocation (--colocate on, its default)


class LivePlanner:
    """One decision per ``step(scrape, pools)``; ``switch`` (when given) performs a move. Its
    ``fits`` (the profiles', with --node-speed's speed for every node) may be replaced between
    steps (``learned_fits``)."""

    def __init__(self, prefill: Timings, decode: Timings, opts: Options) -> None:
        self.o = opts
        self.fits = Fits(prefill, decode, opts.speed, opts.speed)
        self.snaps: deque[Scrape] = deque()
        self.streak = 0
        self.prediction: tuple[Scrape, float] | None = None  # (from when, predicted attainment)

    def fresh_window(self) -> None:
        self.snaps.clear()
        self.streak = 0
        self.prediction = None

    def step(self, snap: Scrape, now: Pools) -> dict[str, Any]:
        from tandem.plan import plan, probe_size

        self.snaps.append(snap)
        while len(self.snaps) > 1 and snap.at - self.snaps[1].at >= self.o.window_s:
            self.snaps.popleft()
        P, D = now.split
        f = self.fits
        rec: dict[str, Any] = {"split": f"{P}:{D}", "window_s": round(snap.at - self.snaps[0].at, 1),
                               "fits": f.source}
        if self.prediction is not None:  # what the last prediction said, against what happened since
            since, predicted = self.prediction
            seen = Mix.between(since, snap)
            if seen.requests and not math.isnan(seen.attainment):
                rec["check"] = {"predicted_attainment": round(predicted, 3),
                                "measured_attainment": round(seen.attainment, 3), "requests": seen.requests,
                                "error": round(seen.attainment - predicted, 3)}
            elif seen.requests:
                rec["check"] = {"predicted_attainment": round(predicted, 3), "measured_attainment": None,
                                "requests": seen.requests, "error": None,
                                "why": "no objectives: set the coordinator's --slo-ttft-ms / --slo-tpot-ms"}
        mix = Mix.between(self.snaps[0], snap)
        rec["mix"] = {"requests": mix.requests, "served": mix.served, "rate_rps": round(mix.rate, 3),
                      "mean_prompt": round(mix.mean_prompt),
                      "mean_output": round(mix.mean_output),
                      "attainment": None if math.isnan(mix.attainment) else round(mix.attainment, 3)}
        lacking = P < (0 if self.o.local else 1) or D < 1
        if lacking or mix.served < self.o.min_requests:
            rec["action"] = ("waiting: a pool has no routable node" if lacking else
                             f"waiting: {mix.served} of {self.o.min_requests} requests served in the window")
            self.streak = 0
            return rec
        doc = plan(f.prefill, f.decode, P + D, mix, self.o.slo_ttft_s, self.o.slo_tpot_s,
                   kv_bytes_per_token=self.o.kv_bytes_per_token, max_batch=self.o.max_batch,
                   kv_capacity_tokens=self.o.kv_capacity_tokens, order=self.o.order, requests=self.o.requests,
                   seeds=self.o.seeds, max_model_len=self.o.max_model_len, min_duration_s=self.o.min_duration_s,
                   also=(P,), admission=self.o.admission, local=self.o.local, colocate=self.o.colocate,
                   speed=f.prefill_speed,
                   decode_speed=f.decode_speed,
                   prefix_cache=False)  # (a measured mix has lengths, no token ids: nothing to cache)
        rows = {(r["prefill"], r["decode"]): r["goodput_rps"] for r in doc["rows"]}
        best = max(rows, key=lambda k: (rows[k], -abs(k[0] - P)))  # ties: the split nearest the current one
        cfg = SimConfig(P, D, f.prefill, f.decode, self.o.kv_bytes_per_token, self.o.max_batch,
                        self.o.kv_capacity_tokens, self.o.order, self.o.slo_ttft_s, self.o.slo_tpot_s, self.o.admission,
                        self.o.local, colocate=self.o.colocate and P > 0, prefill_speed=f.prefill_speed,
                        decode_speed=f.decode_speed)
        n = probe_size(mix.rate, self.o.requests, self.o.min_duration_s)
        predicted = attainment(simulate(cfg, mix.trace(mix.rate, n, 0, self.o.max_model_len)),
                               self.o.slo_ttft_s, self.o.slo_tpot_s)
        self.prediction = (snap, predicted)
        gain = rows[best] / rows[(P, D)] - 1 if rows[(P, D)] > 0 else (math.inf if rows[best] > 0 else 0.0)
        rec.update({"goodput_rps": {f"{p}:{d}": round(g, 3) for (p, d), g in rows.items()},
                    "best": f"{best[0]}:{best[1]}", "gain": None if math.isinf(gain) else round(gain, 3),
                    "predicted_attainment": round(predicted, 3)})
        if best != (P, D) and gain >= self.o.min_gain:
            self.streak += 1
        else:
            self.streak = 0
        move = choose_move((P, D), best, now, self.o.local) if self.streak >= self.o.confirm else None
        rec["move"] = list(move) if move else None
        rec["action"] = (f"switch {move[0]} to {move[1]}" if move else
                         f"keep {P}:{D}" + (f" ({self.streak}/{self.o.confirm} windows favour {best[0]}:{best[1]})"
                                            if self.streak else ""))
        return rec


def line(rec: dict[str, Any]) -> str:
    mix = rec["mix"]
    parts = [f"{rec['split']}", f"{mix['requests']} req in {rec['window_s']:.0f} s ({mix['rate_rps']:.2f}/s), "
             f"prompt {mix['mean_prompt']}, output {mix['mean_output']}"]
    if mix["attainment"] is not None:
        parts.append(f"met {mix['attainment'] * 100:.0f}%")
    if "best" in rec:
        parts.append(f"predicted {rec['predicted_attainment'] * 100:.0f}% (fits: {rec['fits']}); best {rec['best']} "
                     + " ".join(f"{k}={v:.2f}" for k, v in rec["goodput_rps"].items()))
    if "check" in rec and rec["check"]["measured_attainment"] is not None:
        c = rec["check"]
        parts.append(f"last prediction {c['predicted_attainment'] * 100:.0f}% vs measured "
                     f"{c['measured_attainment'] * 100:.0f}%")
    return " | ".join(parts) + f" -> {rec['action']}"


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--live", action="store_true",
                    help="instead of a plan: watch a running cluster (--target, --metrics-url) and recommend role "
                         "switches as its workload moves; --apply makes them")
    ap.add_argument("--target", default="127.0.0.1:50051", help="--live: the coordinator's gRPC address")
    ap.add_argument("--metrics-url", default="http://127.0.0.1:8000/metrics",
                    help="--live: the coordinator's /metrics (its HTTP port)")
    ap.add_argument("--etcd", default="", help="--live --apply: etcd URL (TANDEM_ETCD)")
    ap.add_argument("--cluster", default="default")
    ap.add_argument("--apply", action="store_true", help="--live: make the switches (`tandem role`), one at a time")
    ap.add_argument("--window-s", type=float, default=60.0, help="--live: the workload is measured over this long")
    ap.add_argument("--every-s", type=float, default=15.0, help="--live: a decision this often")
    ap.add_argument("--min-gain", type=float, default=0.15,
                    help="--live: switch when the best split's predicted goodput beats the current one's by this "
                         "much (0.15: 15 %%)")
    ap.add_argument("--confirm", type=int, default=2, help="--live: ... in this many windows in a row")
    ap.add_argument("--min-requests", type=int, default=30, help="--live: no decision on fewer finished requests")
    ap.add_argument("--live-for-s", type=float, default=0.0, help="--live: stop after this long (0: until Ctrl-C)")
    ap.add_argument("--grace-s", type=float, default=60.0, help="--live --apply: a switched node's drain grace")
    # the coordinator's TLS (its /metrics too, when --metrics-url is https) and etcd's, for --apply
    add_tls_args(ap)
    add_etcd_tls_args(ap)


def cmd_live(args: argparse.Namespace, prefill: Timings, decode: Timings) -> int:
    import os

    etcd = args.etcd or os.environ.get("TANDEM_ETCD", "")
    if args.apply and not etcd:
        print("tandem plan --live --apply: --etcd (or TANDEM_ETCD) is required to switch roles", file=sys.stderr)
        return 2
    if args.window_s <= 0 or args.every_s <= 0 or args.confirm < 1 or args.min_requests < 1:
        print("tandem plan --live: --window-s and --every-s must be positive, --confirm and --min-requests at "
              "least 1", file=sys.stderr)
        return 2
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_ca, server_name=args.tls_server_name)
    try:
        tls.check("client")
        if args.apply:
            check_etcd_tls(etcd, args.etcd_cert, args.etcd_key, args.etcd_ca)
    except ValueError as exc:
        print(f"tandem plan --live: {exc}", file=sys.stderr)
        return 2
    if args.apply:
        use_etcd_tls(args.etcd_cert, args.etcd_key, args.etcd_ca)
    # TANDEM_API_KEY, as for every client; an https --metrics-url is verified with --tls-ca
    client = Client(args.target, tls=tls, retries=0)
    metrics_ctx = tls.client_ssl_context() if args.metrics_url.startswith("https://") else None
    from tandem.plan import parse_speed

    opts = Options(args.slo_ttft, args.slo_tpot, args.window_s, args.every_s, args.min_gain, args.confirm,
                   args.min_requests, min(args.requests, 600), 1, args.max_model_len, args.kv_bytes_per_token,
                   args.max_batch, args.kv_capacity_tokens, args.order, args.min_duration_s,
                   args.admission == "on", args.conditional_disagg == "on",
                   parse_speed(getattr(args, "node_speed", "")), getattr(args, "colocate", "off") == "on")
    planner = LivePlanner(prefill, decode, opts)
    profiles = planner.fits
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "live.jsonl"
    print(f"watching {args.metrics_url} and {args.target}: a decision every {args.every_s:g} s over the last "
          f"{args.window_s:g} s ({'switching' if args.apply else 'recommending only'}); log {log}", flush=True)
    t_end = time.monotonic() + args.live_for_s if args.live_for_s else math.inf
    stop = threading.Event()  # SIGINT / SIGTERM: end after the decision (or switch) under way
    def on_signal(*_: object) -> None:
        if stop.is_set():  # a second one: now (a switch under way is left to finish by itself)
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    applying = args.apply
    with log.open("a") as f, client:
        while time.monotonic() < t_end and not stop.is_set():
            t = time.monotonic()
            try:
                snap, now = scrape(args.metrics_url, t, context=metrics_ctx), pools(client)
                if args.fits == "learned":
                    planner.fits = learned_fits(now, profiles)
                rec = planner.step(snap, now)
            except (OSError, ValueError, TandemError, http.client.HTTPException) as exc:  # unreachable, restarted
                rec = {"error": f"{type(exc).__name__}: {exc}"}
                planner.fresh_window()
                print(f"[plan --live] cannot read the cluster: {rec['error']}", flush=True)
            else:
                print(f"[plan --live] {line(rec)}", flush=True)
                if applying and rec.get("move"):
                    rec["switched"] = _switch(rec["move"], etcd, args)
                    planner.fresh_window()
                    if not rec["switched"]["ok"]:
                        applying = False
                        print(f"[plan --live] the switch failed ({rec['switched']['why']}); recommending only from "
                              "now on", flush=True)
            rec["at"] = time.time()
            f.write(json.dumps(rec) + "\n")
            f.flush()
            stop.wait(max(0.0, args.every_s - (time.monotonic() - t)))
    return 0


def _switch(move: list[str], etcd: str, args: argparse.Namespace) -> dict[str, Any]:
    from tandem.drain import switch_role

    node, role = move
    t0 = time.monotonic()
    try:
        code = asyncio.run(switch_role(node, role, etcd, args.cluster, args.grace_s, wait=True))
        why = "" if code == 0 else f"tandem role exited {code}"
    except Exception as exc:  # etcd unreachable, say
        code, why = 1, f"{type(exc).__name__}: {exc}"
    return {"node": node, "role": role, "ok": code == 0, "why": why, "took_s": round(time.monotonic() - t0, 1)}
