"""What every node daemon does around its servicer: engine, gRPC server, metrics, etcd, shutdown.

A node ends one of two ways. SIGINT/SIGTERM: it deregisters, stops serving and
exits 0. Its engine dies: its health service says NOT_SERVING at once, it
deregisters (the coordinator stops routing to it and moves what it held), and
the daemon exits with ENGINE_DEAD_EXIT so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import grpc
from prometheus_client import start_http_server

from . import __version__
from .engine import EngineHost
from .grpcserve import start_grpc, wait_for_stop_signal
from .membership import NodeRecord, Registration
from .netutil import reserve_port
from .nodeconfig import NodeConfig

logger = logging.getLogger(__name__)

ENGINE_DEAD_EXIT = 3


async def run_node(cfg: NodeConfig, service_name: str,
                   add_servicer: Callable[[grpc.aio.Server, EngineHost], None]) -> int:
    """Start the engine, serve gRPC + /metrics, register in etcd; run until SIGINT/SIGTERM
    (exit code 0) or until the engine dies (ENGINE_DEAD_EXIT)."""
    logger.info("starting %s node: %s", cfg.role, cfg.describe())
    # A port picked now is bound by vLLM's worker tens of seconds later; meanwhile vLLM's own
    # ZMQ sockets took it once (a failed start). Hold it until the block server is up.
    reservation = None if cfg.kv_port else reserve_port(cfg.host)
    kv_port = cfg.kv_port or reservation.getsockname()[1]  # type: ignore[union-attr]
    kv_address = f"{cfg.host}:{kv_port}"
    # New with every start: handles minted by an earlier process on this address are refused.
    engine_id = f"{cfg.node_id}-{uuid.uuid4().hex[:8]}"
    engine = EngineHost(cfg, kv_address, engine_id, kv_port_reserved=reservation is not None)
    try:
        await asyncio.get_running_loop().run_in_executor(None, engine.start)
    finally:
        if reservation is not None:
            reservation.close()

    grpc_server = await start_grpc(cfg.host, cfg.grpc_port, service_name, lambda server: add_servicer(server, engine))
    httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
    metrics_address = f"{cfg.host}:{httpd.server_port}"

    record = NodeRecord(
        node_id=cfg.node_id, role=cfg.role, grpc_address=f"{cfg.host}:{grpc_server.port}", kv_address=kv_address,
        model=cfg.served_model_name, max_model_len=engine.max_model_len, metrics_address=metrics_address,
        layout=engine.layout(), version=__version__, engine_id=engine_id,
    )
    registration = Registration(cfg.etcd, cfg.cluster, record, cfg.ttl_s)
    await registration.start()
    # One line a supervisor (tandem up, tests) can wait for.
    print(f"TANDEM_READY role={cfg.role} node_id={cfg.node_id} grpc={record.grpc_address} "
          f"kv={kv_address} metrics={metrics_address}", flush=True)

    stop = asyncio.ensure_future(wait_for_stop_signal())
    died = asyncio.ensure_future(engine.wait_until_dead())
    code = 0
    try:
        await asyncio.wait({stop, died}, return_when=asyncio.FIRST_COMPLETED)
        if died.done():
            code = ENGINE_DEAD_EXIT
            logger.error("%s node %s: the vLLM engine died; leaving the cluster and exiting with code %d so "
                         "that the supervisor restarts the node", cfg.role, cfg.node_id, code)
            await grpc_server.set_serving(False)
        else:
            logger.info("shutting down %s node %s", cfg.role, cfg.node_id)
    finally:
        stop.cancel()
        died.cancel()
        await registration.close()
        await grpc_server.stop()
        httpd.shutdown()
        engine.shutdown()
    return code
