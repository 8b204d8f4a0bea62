"""What every node daemon does around its servicer: engine, gRPC server, metrics, etcd, shutdown."""

from __future__ import annotations

import asyncio
import logging
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

async def run_node(cfg: NodeConfig, service_name: str,
                   add_servicer: Callable[[grpc.aio.Server, EngineHost], None]) -> None:
    """Start the engine, serve gRPC + /metrics, register in etcd; run until SIGINT/SIGTERM."""
    logger.info("starting %s node: %s", cfg.role, cfg.describe())
    # A port picked now is bound by vLLM's worker tens of seconds later; meanwhile vLLM's own
    # ZMQ sockets took it once (a failed start). Hold it until the block server is up.
    reservation = None if cfg.kv_port else reserve_port(cfg.host)
    kv_port = cfg.kv_port or reservation.getsockname()[1]  # type: ignore[union-attr]
    kv_address = f"{cfg.host}:{kv_port}"
    engine = EngineHost(cfg, kv_address, kv_port_reserved=reservation is not None)
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
        layout=engine.layout(), version=__version__,
    )
    registration = Registration(cfg.etcd, cfg.cluster, record, cfg.ttl_s)
    await registration.start()
    # One line a supervisor (tandem up, tests) can wait for.
    print(f"TANDEM_READY role={cfg.role} node_id={cfg.node_id} grpc={record.grpc_address} "
          f"kv={kv_address} metrics={metrics_address}", flush=True)

    try:
        await wait_for_stop_signal()
        logger.info("shutting down %s node %s", cfg.role, cfg.node_id)
    finally:
        await registration.close()
        await grpc_server.stop()
        httpd.shutdown()
        engine.shutdown()
