"""What every node daemon does around its servicer: engine, gRPC server, metrics, etcd, shutdown.

A node ends one of three ways. Drained (SIGINT/SIGTERM, or `tandem drain`): it
marks its record draining (coordinators stop sending it work), finishes what it
holds (requests in flight, KV blocks held for a fetch) within the grace period,
deregisters and exits 0; a second signal cuts the wait short. Switched (`tandem
role`): drained the same way, then it starts again, in the same process (exec)
with the same node id, in the role etcd now gives it. Its engine dies:
its health service says NOT_SERVING at once, it deregisters (the coordinator
stops routing to it and moves what it held), and the daemon exits with
ENGINE_DEAD_EXIT so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
from prometheus_client import REGISTRY, start_http_server

from tandem import __version__
from tandem.grpcserve import StopSignals, start_grpc
from tandem.membership import DrainAsk, NodeRecord, Registration
from tandem.netutil import reserve_port
from tandem.profile import node_cores, node_settings, seed_from_profile
from tandem.proto import tandem_pb2 as pb
from tandem.timings import Timings

from . import monitor
from .calls import SERVICE_NAME as CALLS_SERVICE
from .calls import NodeCallsServicer
from .config import BUSY_METRICS, READY_LINE, RESTARTING_LINE, NodeConfig
from .engine import EngineHost
from .perf import NodePerf
from .simengine import SimEngine

logger = logging.getLogger(__name__)

ENGINE_DEAD_EXIT = 3
# run_node's answer when the node is to start again (a role switch): cmd_node execs itself. Were
# that exec to fail, this is the exit code (EX_TEMPFAIL), and a supervisor's restart does the same.
RESTART_EXIT = 75


def work_held() -> float:
    """Requests in flight plus KV blocks held here, from this process's own metrics."""
    return sum(s.value for fam in REGISTRY.collect() for s in fam.samples if s.name in BUSY_METRICS)


def _served_whole(role: str) -> tuple[str, ...]:
    """A prefill node's DecodeNode service (the requests it serves whole: --colocate)."""
    return (pb.DESCRIPTOR.services_by_name["DecodeNode"].full_name,) if role == "prefill" else ()


async def run_node(cfg: NodeConfig, service_name: str,
                   add_servicer: Callable[[grpc.aio.Server, EngineHost, NodePerf], NodeCallsServicer]) -> int:
    """Start the engine, serve gRPC + /metrics, register in etcd; run until SIGINT/SIGTERM
    (exit code 0) or until the engine dies (ENGINE_DEAD_EXIT)."""
    logger.info("starting %s node: %s", cfg.role, cfg.describe())
    if not cfg.kv_secret_file and not cfg.simulate:
        logger.warning("no --kv-secret-file: this node's KV port sends held blocks to anyone who can reach it "
                       "and names the request (give every node the cluster's secret file)")
    # The KV port (given, or picked now) is bound by vLLM's worker tens of seconds later;
    # meanwhile vLLM's own ZMQ sockets took it once (a failed start). Hold it until the block
    # server is up.
    reservation = reserve_port(cfg.host, cfg.kv_port)
    kv_port = reservation.getsockname()[1]
    kv_bind = f"{cfg.host}:{kv_port}"
    kv_address = cfg.kv_advertise or kv_bind  # what handles and the node's record carry
    # New with every start: handles minted by an earlier process on this address are refused.
    engine_id = f"{cfg.node_id}-{uuid.uuid4().hex[:8]}"
    engine: EngineHost | SimEngine
    if cfg.simulate:  # no engine: times from a profile, fake KV handles (load tests, the simulator's checks)
        timings = Timings.load(cfg.simulate)
        engine = SimEngine(cfg, kv_bind, f"sim:{engine_id}", timings)
    else:
        engine = EngineHost(cfg, kv_bind, engine_id, kv_port_reserved=True)
    held = None
    if cfg.kvstore_ram_gib:  # the KV store's chunks, from its events (before the engine makes any)
        from tandem.kvstore.held import HeldChunks
        from tandem.kvtransfer.stats import STORE_EVENT_SINKS

        held = HeldChunks()
        STORE_EVENT_SINKS.append(held.apply)
    engine_held, events = None, None
    if engine.events_endpoint:  # subscribed before the engine publishes anything
        from tandem.kvstore.engine_events import EngineBlocks, EngineEventsSubscriber
        from tandem.kvstore.held import HeldChunks
        from tandem.kvstore.keys import model_identity, namespace

        engine_held = HeldChunks()
        ns = namespace(model_identity(cfg.model) + f"|{cfg.dtype}", {"engine_block": cfg.block_size}, cfg.block_size)
        events = EngineEventsSubscriber(engine.events_endpoint, EngineBlocks(ns, cfg.block_size, engine_held).batch)
    try:
        await asyncio.get_running_loop().run_in_executor(None, engine.start)
    except BaseException:
        if events is not None:
            events.close()
        raise
    finally:
        reservation.close()
    # The engine's per-step budget as it runs: a prefill node's is vLLM's default unless set, and
    # the streams it serves whole (colocated) see its prefills in steps of that size.
    perf = NodePerf(step_tokens=getattr(engine, "step_tokens", 0) or cfg.max_num_batched_tokens,
                    own_steps=bool(cfg.simulate) or cfg.prompt_steps == "own")
    if isinstance(engine, EngineHost):
        perf.kv_room = engine.kv_room.tokens
        if cfg.kvstore_ram_gib:
            from tandem.kvtransfer.stats import STORE_LOAD_SINKS

            chunk = cfg.kvstore_chunk_tokens
            STORE_LOAD_SINKS.append(lambda tokens, disk_chunks: perf.saw_store_loads(tokens, disk_chunks * chunk))
    loop = asyncio.get_running_loop()
    for picture in (held, engine_held):
        if picture is not None:
            picture.on_change = lambda: loop.call_soon_threadsafe(perf.notify)
    try:
        if isinstance(engine, SimEngine):
            perf.seed(engine.timings.to_model())
            said = f"simulated: times from {cfg.simulate}"
        else:
            said = await seed_from_profile(
                perf, engine, mode=cfg.profile, cache_dir=Path(cfg.profile_cache), model_dir=cfg.model,
                settings=node_settings(cfg, engine), cores=node_cores(cfg), vocab_size=engine.vocab_size, max_model_len=engine.max_model_len, max_num_seqs=cfg.max_num_seqs)
    except BaseException:
        engine.shutdown()
        raise
    logger.info("%s node %s: %s", cfg.role, cfg.node_id, said)

    watchers: list[monitor.NodeMonitorServicer] = []
    calls: list[NodeCallsServicer] = []

    def add_services(server: grpc.aio.Server) -> None:
        calls.append(add_servicer(server, engine, perf))
        watchers.append(monitor.add_servicer(server, perf, cfg.node_id, engine_id, engine.reset_cache, held,
                                             engine_held))

    grpc_server = await start_grpc(cfg.host, cfg.grpc_port, service_name, add_services,
                                   more_services=(monitor.SERVICE_NAME, CALLS_SERVICE, *_served_whole(cfg.role)),
                                   tls=cfg.tls)
    httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
    metrics_address = f"{cfg.host}:{httpd.server_port}"

    record = NodeRecord(
        node_id=cfg.node_id, role=cfg.role, grpc_address=f"{cfg.host}:{grpc_server.port}", kv_address=kv_address,
        model=cfg.served_model_name, max_model_len=engine.max_model_len, metrics_address=metrics_address,
        layout=engine.layout(), version=__version__, engine_id=engine_id, scheduling=cfg.scheduling_policy,
        serves_whole=bool(_served_whole(cfg.role)),
        # (a simulated engine runs one prompt at a time, each its whole prefill: simengine.py)
        own_steps=bool(cfg.simulate) or cfg.prompt_steps == "own",
    )
    registration = Registration(cfg.etcd, cfg.cluster, record, cfg.ttl_s)
    await registration.start()
    # One line a supervisor (tandem up, tests) can wait for.
    print(f"{READY_LINE} role={cfg.role} node_id={cfg.node_id} grpc={record.grpc_address} "
          f"kv={kv_address} metrics={metrics_address}", flush=True)

    signals = StopSignals()
    asked = asyncio.ensure_future(_drain_asked(registration, cfg))
    stop = asyncio.ensure_future(signals.first.wait())
    died = asyncio.ensure_future(engine.wait_until_dead())
    code = 0
    try:
        await asyncio.wait({stop, asked, died}, return_when=asyncio.FIRST_COMPLETED)
        ask = asked.result() if asked.done() else None
        if not died.done():
            grace_s = ask.grace_s if ask is not None else cfg.drain_grace_s
            why = ("tandem role" if ask.restart else "tandem drain") if ask is not None else "a stop signal"
            await _drain(registration, grace_s, why, signals, died)
        if died.done():
            code = ENGINE_DEAD_EXIT
            logger.error("%s node %s: the vLLM engine died; leaving the cluster and exiting with code %d so "
                         "that the supervisor restarts the node", cfg.role, cfg.node_id, code)
            await grpc_server.set_serving(False)
        elif ask is not None and ask.restart and not signals.first.is_set():
            code = RESTART_EXIT
            # Health answered SERVING through the drain; from here nothing answers until the next
            # READY line, which a supervisor waits for as for a start.
            print(f"{RESTARTING_LINE} role={cfg.role} node_id={cfg.node_id} why=tandem-role", flush=True)
            logger.info("%s node %s drained: starting again in the role etcd gives it", cfg.role, cfg.node_id)
        else:
            logger.info("shutting down %s node %s", cfg.role, cfg.node_id)
    finally:
        for t in (stop, asked, died):
            t.cancel()
        if asked.done() and not asked.cancelled() and asked.exception() is None:
            await _quietly(registration.clear_drain(cfg.cluster))
        await registration.close()
        for w in watchers:
            w.close()
        # The coordinators' call streams end once their calls have (drained: none are left), so
        # that the server's stop does not wait out its grace for them.
        for c in calls:
            c.close()
            await c.wait_closed(STREAMS_CLOSE_S)
        await grpc_server.stop()
        httpd.shutdown()
        engine.shutdown()
        if events is not None:
            events.close()
    if code == RESTART_EXIT and signals.first.is_set():  # told to stop while it was stopping to restart
        logger.info("%s node %s: a stop signal came while it restarted; exiting instead", cfg.role, cfg.node_id)
        code = 0
    return code


async def _drain_asked(registration: Registration, cfg: NodeConfig, every_s: float = 1.0) -> DrainAsk:
    """What `tandem drain` or `tandem role` asked of this node (this process), once asked."""
    while True:
        await asyncio.sleep(every_s)
        try:
            ask = await registration.drain_requested(cfg.cluster)
        except Exception as exc:  # etcd unreachable: ask again later
            logger.debug("could not read drain requests: %s", exc)
            continue
        if ask is not None:
            return ask


DRAIN_SETTLE_S = 2.0
STREAMS_CLOSE_S = 5.0  # the most a stopping node waits for its call streams' calls (then its server's grace)


async def _drain(registration: Registration, grace_s: float, why: str, signals: StopSignals,
                 died: asyncio.Future[None]) -> None:
    """Take no new work; wait (at most ``grace_s``) until what the node holds is done."""
    node_id = registration.record.node_id
    logger.info("draining %s (asked by %s): no new work; finishing what it holds (%.0f requests and KV blocks "
                "held now; grace %.0f s)", node_id, why, work_held(), grace_s)
    await _quietly(registration.update(replace(registration.record, draining=True)))
    t0 = time.monotonic()
    last_report = t0
    # A coordinator that picked this node just before it saw the draining flag may still send
    # the work it reserved it for (a decode after its prefill): give that time to arrive.
    settle_s = min(DRAIN_SETTLE_S, grace_s)
    while (held := work_held()) > 0 or time.monotonic() - t0 < settle_s:
        now = time.monotonic()
        if now - t0 > grace_s:
            if held > 0:
                logger.warning("drain of %s: grace period over with %.0f requests and KV blocks still held",
                               node_id, held)
            return
        if signals.again.is_set() or died.done():
            logger.warning("drain of %s cut short with %.0f requests and KV blocks still held", node_id, held)
            return
        if now - last_report > 5:
            logger.info("drain of %s: %.0f requests and KV blocks still held", node_id, held)
            last_report = now
        await asyncio.sleep(0.1)
    logger.info("drain of %s done in %.1f s", node_id, time.monotonic() - t0)


async def _quietly(aw: object) -> None:
    try:
        await aw  # type: ignore[misc]
    except Exception as exc:
        logger.warning("etcd: %s", exc)
