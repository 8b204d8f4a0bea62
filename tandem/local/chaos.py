"""`tandem chaos`: faults injected into a real local cluster under a seeded streaming load.

One supervised cluster (etcd, two coordinators, 2 prefill and 2 decode nodes:
every scenario that restarts a node has a second one in its pool) serves all
scenarios in turn; the supervisor restarts what a scenario breaks. Per
scenario: a seeded open-loop load of greedy, fixed-length requests starts,
spread over both coordinators; a third of the way in, one fault lands
(SIGKILL or SIGSTOP of a prefill node, a decode node, the first coordinator
or etcd; a drain; a cut of the KV path from prefill-0, whose KV goes over TCP
through a proxy; a rolling restart that drains every node in turn; or a role
switch, `tandem role`, of a decode node, asked while it streams, to prefill
and, once it has served there, back); the load runs to its end (for the rolling restart, until every
node is back).

Every request is accounted for: completed (all its tokens), ended with a
clear gRPC status, hung (still open at the client's deadline), or lost
(neither; must not happen). Migrated requests are replayed undisturbed after
the scenario and must match token for token. KV blocks held on every live
node must drop to 0 within the KV lease plus a margin. Recovery time runs from
the fault to the first request completed with the membership reconverged
(every node registered, up and not draining). Results: one JSON per scenario
and a Markdown table (docs/RELIABILITY.md). The command and its cluster: chaos_cmd.py; the load and what it
records: chaos_load.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import sys
import time
import threading
import urllib.request

import grpc

from tandem.grpcserve import CHANNEL_OPTIONS
from tandem.node.config import BUSY_METRICS

from .chaos_load import CLIENT_DEADLINE_S, Outcome, ScenarioResult, send_one, workload
from .cluster import Daemon, LocalCluster
from .proxy import TcpProxy

logger = logging.getLogger(__name__)

# scenario -> (what it hits, what it does)
SCENARIOS: dict[str, tuple[str, str]] = {
    "kill-decode": ("decode", "kill"), "freeze-decode": ("decode", "freeze"), "drain-decode": ("decode", "drain"),
    "kill-prefill": ("prefill", "kill"), "freeze-prefill": ("prefill", "freeze"),
    "drain-prefill": ("prefill", "drain"),
    "kill-coordinator": ("coordinator", "kill"), "freeze-coordinator": ("coordinator", "freeze"),
    "kill-etcd": ("etcd", "kill"), "freeze-etcd": ("etcd", "freeze"),
    "cut-kv": ("kv-path", "cut"), "rolling-restart": ("every-node", "roll"),
    "switch-roles": ("decode", "switch"),
}
CI_SCENARIOS = ("kill-decode", "drain-prefill", "kill-coordinator", "cut-kv", "freeze-etcd", "switch-roles")
SWITCH_PROBES = 6  # requests sent at most, after a switch, until the switched node has served one
SWITCH_WAIT_S = 5.0  # how long a switch waits for its node to hold a request
LONG_STREAMS, LONG_TOKENS = 4, 900  # streams started just before the first switch, so it has work to finish
REPLAY_AT_ONCE = 8  # replayed requests in flight at once (one at a time, the four long streams took ~45 s)
# A node's log line when a drain begins (tandem/node/runtime.py): what it held then.
DRAIN_LINE = re.compile(r"draining \S+ \(asked by tandem role\): .*?\((\d+) requests and KV blocks held now")
KV_LEASE_S = 10.0
KV_CUT_S = 10.0
ROLL_STEP_TIMEOUT_S = 300.0


class _KVPath:
    """The cut-able KV path from prefill-0 (its proxy), as a scenario's victim."""

    name = "prefill-0 KV path"

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy


class _Switch:
    """A role switch there and back (`tandem role`): a decode node, asked while it streams, becomes a
    prefill node, serves a request as one, and becomes a decode node again, so the next scenario
    finds the pools as before."""

    def __init__(self, node: Daemon) -> None:
        self.node = node
        self.name = node.name
        self.done = threading.Event()
        self.failed = ""
        self.asked_at: list[float] = []  # monotonic: when each switch was asked
        self.steps: list[dict[str, object]] = []
        self.probes: list[Outcome] = []
        self.holding: list[int] = []  # requests the coordinator had in flight on it when each switch was asked


class _Roll:
    """A rolling restart: drain each node in turn and wait until it is back before the next."""

    name = "every node"

    def __init__(self) -> None:
        self.done = threading.Event()
        self.failed = ""


class Harness:
    def __init__(self, cluster: LocalCluster, requests: int, rate: float, seed: int,
                 proxy: TcpProxy | None = None) -> None:
        self.cluster = cluster
        self.proxy = proxy
        self.requests = requests
        self.rate = rate
        self.seed = seed
        from tandem.coordinator.textcodec import TextCodec

        self.vocab = TextCodec(cluster.spec.model).vocab_size
        self.t0 = time.monotonic()

    # faults -------------------------------------------------------------------
    def _victim(self, target: str, action: str = "") -> Daemon | object:
        c = self.cluster
        if action == "switch":
            return _Switch(self._victim(target))  # type: ignore[arg-type]
        if target == "coordinator":
            return c.coordinator
        if target == "etcd":
            return c.etcd
        if target == "kv-path":
            if self.proxy is None:
                raise ValueError("the cut-kv scenario needs the KV proxy (chaos_cluster starts it)")
            return _KVPath(self.proxy)
        if target == "every-node":
            return _Roll()
        busy = self._outstanding()
        pool = [d for d in c.nodes if d.role == target]
        return max(pool, key=lambda d: (busy.get(d.name, 0), d.name))

    def _outstanding(self, field: str = "outstanding") -> dict[str, int]:
        """Per node, what the coordinators have in flight there (or, with field="served", have sent
        there), summed over every coordinator that answers."""
        from tandem.proto import tandem_pb2 as pb
        from tandem.proto import tandem_pb2_grpc as pb_grpc

        out: dict[str, int] = {}
        for c in self.cluster.coordinators:
            if not c.info.get("grpc"):
                continue
            try:
                with self.cluster.channel(c.info["grpc"]) as ch:
                    st = pb_grpc.CoordinatorStub(ch).ClusterStatus(pb.ClusterStatusRequest(), timeout=2)
            except grpc.RpcError:
                continue
            for n in st.nodes:
                out[n.node_id] = out.get(n.node_id, 0) + getattr(n, field)
        return out

    def _inject(self, victim: object, action: str) -> None:
        name = getattr(victim, "name", "?")
        logger.warning("chaos: %s %s", action, name)
        if action == "kill":
            victim.kill() if name == "etcd" else victim.signal(signal.SIGKILL)  # type: ignore[attr-defined]
        elif action == "freeze":
            victim.signal(signal.SIGSTOP)  # type: ignore[attr-defined]
        elif action == "drain":
            self._drain(name)
        elif action == "cut":
            victim.proxy.cut(KV_CUT_S)  # type: ignore[attr-defined]
        elif action == "roll":
            threading.Thread(target=self._roll, args=(victim,), name="chaos-roll", daemon=True).start()
        elif action == "switch":
            threading.Thread(target=self._switch, args=(victim,), name="chaos-switch", daemon=True).start()

    def _drain(self, name: str) -> None:
        subprocess.run([sys.executable, "-m", "tandem.cli", "drain", name, "--etcd", self.cluster.etcd_url,
                        "--no-wait", "--grace-s", "60"], check=True, capture_output=True, timeout=30)

    def _switch(self, sw: _Switch) -> None:
        start_role = sw.node.role
        try:
            for role in ("decode" if start_role == "prefill" else "prefill", start_role):
                streams = None
                if role != start_role:
                    # Asked while it holds work (long streams, so they outlast the ask): that work must
                    # finish there, and each stream is replayed.
                    streams = threading.Thread(target=self._long_streams, args=(sw,), name="chaos-long", daemon=True)
                    streams.start()
                wait_until = time.monotonic() + SWITCH_WAIT_S
                while not (holding := int(self._held(sw.node))) and time.monotonic() < wait_until:
                    time.sleep(0.05)
                since = time.time()
                drains_before = len(self._drain_lines(sw.node))
                logger.warning("chaos: switching %s to %s (%d requests and KV blocks held there)", sw.name, role,
                               holding)
                sw.asked_at.append(time.monotonic())
                sw.holding.append(holding)
                subprocess.run([sys.executable, "-m", "tandem.cli", "role", sw.name, role, "--etcd",
                                self.cluster.etcd_url, "--cluster", self.cluster.spec.cluster, "--no-wait",
                                "--grace-s", "60"], check=True, capture_output=True, timeout=30)
                deadline = time.monotonic() + ROLL_STEP_TIMEOUT_S
                while not (self._back(sw.name, since) and sw.node.role == role and self._reconverged()):
                    if time.monotonic() > deadline:
                        sw.failed = f"{sw.name} was not back as a {role} node within {ROLL_STEP_TIMEOUT_S:.0f} s"
                        logger.error("chaos: %s", sw.failed)
                        return
                    time.sleep(0.5)
                if streams is not None:
                    streams.join(CLIENT_DEADLINE_S)
                served = self._served_by(sw, role) if role != start_role else 0
                drains = self._drain_lines(sw.node)[drains_before:]
                sw.steps.append({"role": role, "held_when_asked": holding,
                                 "held_at_drain": int(drains[0]) if drains else None,
                                 "back_after_s": round(time.time() - since, 1), "served": served})
        except Exception as exc:  # reported as not recovered
            sw.failed = f"{type(exc).__name__}: {exc}"
            logger.exception("chaos: role switch failed")
        finally:
            sw.done.set()

    def _held(self, node: Daemon) -> float:
        """Requests in flight and KV blocks held on a node, by its own metrics."""
        address = node.info.get("metrics")
        return sum(_scrape(address, n) for n in BUSY_METRICS) if address else 0.0

    @staticmethod
    def _drain_lines(node: Daemon) -> list[str]:
        """What the node held when each role switch's drain began, from its log (oldest first)."""
        try:
            text = node.log_path.read_text(errors="replace")
        except OSError:
            return []
        return DRAIN_LINE.findall(text)

    def _long_streams(self, sw: _Switch) -> None:
        """LONG_STREAMS greedy requests of LONG_TOKENS tokens through every coordinator; kept in
        ``sw.probes`` (replayed after the scenario)."""
        from tandem.proto import tandem_pb2_grpc as pb_grpc

        async def go() -> None:
            plan = workload(LONG_STREAMS, 1.0, self.seed + 2, self.vocab)
            fronts = self.cluster.coordinators
            channels = [self.cluster.aio_channel(c.info["grpc"], CHANNEL_OPTIONS) for c in fronts]
            try:
                outs = [Outcome(-100 - i, prompt[:16], LONG_TOKENS) for i, (_, prompt, _n) in enumerate(plan)]
                sw.probes.extend(outs)
                await asyncio.gather(*(send_one(pb_grpc.CoordinatorStub(channels[i % len(channels)]), o, self.t0)
                                       for i, o in enumerate(outs)))
            finally:
                for ch in channels:
                    await ch.close()

        asyncio.run(go())

    def _served_by(self, sw: _Switch, role: str) -> int:
        """Send requests until the switched node has served one in its new role (the coordinator
        counts what it sent there; a node new to a pool is the least loaded); how many it served."""
        from tandem.proto import tandem_pb2_grpc as pb_grpc

        async def go() -> int:
            plan = workload(SWITCH_PROBES, 1.0, self.seed + 1, self.vocab)
            async with self.cluster.aio_channel(self.cluster.grpc_address, CHANNEL_OPTIONS) as ch:
                stub = pb_grpc.CoordinatorStub(ch)
                for i, (_, prompt, max_tokens) in enumerate(plan):
                    if self._outstanding(field="served").get(sw.name, 0):
                        break
                    probe = Outcome(-1 - i, prompt, min(max_tokens, 32))
                    await send_one(stub, probe, self.t0)
                    sw.probes.append(probe)
            return self._outstanding(field="served").get(sw.name, 0)

        served = asyncio.run(go())
        if not served:
            raise RuntimeError(f"{sw.name} served no request as a {role} node ({SWITCH_PROBES} sent)")
        return served

    def _roll(self, roll: _Roll) -> None:
        try:
            for d in list(self.cluster.nodes):
                since = time.time()
                logger.warning("chaos: rolling restart: draining %s", d.name)
                self._drain(d.name)
                deadline = time.monotonic() + ROLL_STEP_TIMEOUT_S
                while not (self._back(d.name, since) and self._reconverged()):
                    if time.monotonic() > deadline:
                        roll.failed = f"{d.name} was not back within {ROLL_STEP_TIMEOUT_S:.0f} s"
                        logger.error("chaos: rolling restart: %s", roll.failed)
                        return
                    time.sleep(0.5)
        except Exception as exc:  # reported as not recovered
            roll.failed = f"{type(exc).__name__}: {exc}"
            logger.exception("chaos: rolling restart failed")
        finally:
            roll.done.set()

    # convergence --------------------------------------------------------------
    def _reconverged(self) -> bool:
        from tandem.proto import tandem_pb2 as pb
        from tandem.proto import tandem_pb2_grpc as pb_grpc

        sup = self.cluster.supervisor
        if sup is None or not sup.settled():
            return False
        try:
            with self.cluster.channel(self.cluster.grpc_address) as ch:
                st = pb_grpc.CoordinatorStub(ch).ClusterStatus(pb.ClusterStatusRequest(), timeout=2)
        except grpc.RpcError:
            return False
        want = {d.name for d in self.cluster.nodes}
        return {n.node_id for n in st.nodes if not n.down and not n.draining} == want

    def _back(self, victim: str, since_wall: float) -> bool:
        """The supervisor has seen the victim ready again since the fault."""
        sup = self.cluster.supervisor
        return sup is not None and any(e.daemon == victim and e.what == "ready" and e.at >= since_wall
                                       for e in list(sup.events))

    def _victim_back(self, victim: object, since_wall: float) -> bool:
        if isinstance(victim, _KVPath):
            return not victim.proxy.is_cut
        if isinstance(victim, (_Roll, _Switch)):
            return victim.done.is_set() and not victim.failed
        return self._back(getattr(victim, "name", "?"), since_wall)

    async def _recovery(self, fault_at: float, victim: object) -> float | None:
        """Seconds from the fault to a completed request with the membership reconverged
        (the victim restarted, every node registered, up and not draining)."""
        from tandem.proto import tandem_pb2_grpc as pb_grpc

        loop = asyncio.get_running_loop()
        fault_wall = time.time() - (time.monotonic() - fault_at)
        steps = len(self.cluster.nodes) if isinstance(victim, _Roll) else 2 if isinstance(victim, _Switch) else 0
        deadline = fault_at + 300 + ROLL_STEP_TIMEOUT_S * steps
        while time.monotonic() < deadline:
            if isinstance(victim, (_Roll, _Switch)) and victim.failed:
                return None
            if self._victim_back(victim, fault_wall) and await loop.run_in_executor(None, self._reconverged):
                async with self.cluster.aio_channel(self.cluster.grpc_address, CHANNEL_OPTIONS) as ch:
                    probe = Outcome(-1, [7, 8, 9, 10], 4)
                    await send_one(pb_grpc.CoordinatorStub(ch), probe, 0.0)
                if probe.status == "ok":
                    return time.monotonic() - fault_at
            await asyncio.sleep(0.25)
        return None

    # one scenario ---------------------------------------------------------------
    async def run(self, scenario: str) -> ScenarioResult:
        from tandem.proto import tandem_pb2_grpc as pb_grpc

        target, action = SCENARIOS[scenario]
        # A rolling restart takes as long as it takes: the load goes on (same rate) until it is done.
        plan = workload(self.requests * (50 if action == "roll" else 1), self.rate, self.seed, self.vocab)
        fault_s = plan[self.requests // 3][0]
        n_events = len(self.cluster.supervisor.events) if self.cluster.supervisor else 0
        t0, wall0 = time.monotonic(), time.time()
        self.t0 = t0  # the scenario's clock: Outcome.sent_at / done_at, the switch thread's requests too
        tasks: list[asyncio.Task[None]] = []
        outcomes: list[Outcome] = []
        victim_name, recovery, victim = "", None, None
        fronts = self.cluster.coordinators
        channels = [self.cluster.aio_channel(c.info["grpc"], CHANNEL_OPTIONS) for c in fronts]
        try:
            stubs = [pb_grpc.CoordinatorStub(ch) for ch in channels]
            for i, (arrival, prompt, max_tokens) in enumerate(plan):
                if i >= self.requests and not (isinstance(victim, _Roll) and not victim.done.is_set()):
                    break
                if victim is None and arrival >= fault_s:
                    await asyncio.sleep(max(0.0, fault_s - (time.monotonic() - t0)))
                    victim = self._victim(target, action)
                    victim_name = getattr(victim, "name", "?")
                    fault_at = time.monotonic()
                    await asyncio.get_running_loop().run_in_executor(None, self._inject, victim, action)
                    recovery = asyncio.ensure_future(self._recovery(fault_at, victim))
                await asyncio.sleep(max(0.0, arrival - (time.monotonic() - t0)))
                o = Outcome(i, prompt, max_tokens, front=fronts[i % len(fronts)].name)
                outcomes.append(o)
                tasks.append(asyncio.ensure_future(send_one(stubs[i % len(stubs)], o, t0)))
            await asyncio.gather(*tasks)
        finally:
            for ch in channels:
                await ch.close()
        recovery_s = await recovery if recovery is not None else None
        # Migrated requests, and with a role switch those in flight when one was asked and those the
        # switched node served: each must give the same tokens again, undisturbed.
        switched: list[Outcome] = []
        replay = [o for o in outcomes if o.migrations]
        if isinstance(victim, _Switch):
            asked = [a - t0 for a in victim.asked_at]
            switched = [o for o in outcomes + victim.probes if any(o.sent_at <= a < o.done_at for a in asked)]
            replay = [o for o in outcomes if o.migrations or any(o.sent_at <= a < o.done_at for a in asked)]
            replay += victim.probes
        mismatches = await self._replay(replay)
        held = await asyncio.get_running_loop().run_in_executor(None, self._blocks_held_settled)
        statuses: dict[str, int] = {}
        by_front: dict[str, dict[str, int]] = {}
        for o in outcomes:
            statuses[o.status] = statuses.get(o.status, 0) + 1
            front = by_front.setdefault(o.front, {})
            front[o.status] = front.get(o.status, 0) + 1
        events = self.cluster.supervisor.events[n_events:] if self.cluster.supervisor else []
        completed = [o for o in outcomes if o.status == "ok"]
        return ScenarioResult(
            scenario=scenario, victim=victim_name, requests=len(outcomes),
            completed=sum(1 for o in completed if len(o.tokens) == o.max_tokens),
            ended_with_status=sum(1 for o in outcomes if o.status not in ("ok", "hung", "lost")),
            statuses=statuses, migrated=sum(1 for o in outcomes if o.migrations),
            hung=statuses.get("hung", 0), lost=statuses.get("lost", 0)
            + sum(1 for o in completed if len(o.tokens) != o.max_tokens),
            token_mismatches=mismatches, kv_blocks_held_after=held, recovery_s=recovery_s,
            supervisor_events=[f"+{e.at - wall0:.1f}s {e.daemon} {e.what} {e.detail}".rstrip() for e in events],
            by_front=by_front, switches=victim.steps if isinstance(victim, _Switch) else [],
            in_flight_at_switch=len(switched))

    async def _replay(self, outcomes: list[Outcome]) -> int:
        """Completed requests again, undisturbed (no fault; REPLAY_AT_ONCE in flight, as the load had
        them batched): how many gave other tokens (or did not complete)."""
        from tandem.proto import tandem_pb2_grpc as pb_grpc

        done = [o for o in outcomes if o.status == "ok"]
        room = asyncio.Semaphore(REPLAY_AT_ONCE)

        async def again(stub: pb_grpc.CoordinatorStub, o: Outcome) -> bool:
            async with room:
                redo = Outcome(o.index, o.prompt, o.max_tokens)
                await send_one(stub, redo, 0.0)
            if redo.status != "ok" or redo.tokens != o.tokens:
                logger.error("chaos: request %d differs when replayed (%s)", o.index, redo.status)
                return False
            return True

        async with self.cluster.aio_channel(self.cluster.grpc_address, CHANNEL_OPTIONS) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            same = await asyncio.gather(*(again(stub, o) for o in done))
        return sum(not s for s in same)

    def _blocks_held_settled(self) -> float:
        """KV blocks held on every live node, once it is 0 or the KV lease plus a margin is over."""
        deadline = time.monotonic() + KV_LEASE_S + 10
        while True:
            held = 0.0
            for d in self.cluster.nodes:
                if d.alive() and d.info.get("metrics"):
                    held += _scrape(d.info["metrics"], "tandem_kv_blocks_held")
            if held == 0 or time.monotonic() > deadline:
                return held
            time.sleep(0.5)


def _scrape(address: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)
