"""What every node daemon does around its servicer: engine, gRPC server, metrics, etcd, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from . import __version__
from .engine import EngineHost
from .membership import NodeRecord, Registration
from .netutil import free_port
from .nodeconfig import NodeConfig

logger = logging.getLogger(__name__)

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


async def run_node(cfg: NodeConfig, service_name: str,
                   add_servicer: Callable[[grpc.aio.Server, EngineHost], None]) -> None:
    """Start the engine, serve gRPC + /metrics, register in etcd; run until SIGINT/SIGTERM."""
    logger.info("starting %s node: %s", cfg.role, cfg.describe())
    kv_address = f"{cfg.host}:{cfg.kv_port or free_port(cfg.host)}"
    engine = EngineHost(cfg, kv_address)
    await asyncio.get_running_loop().run_in_executor(None, engine.start)

    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_servicer(server, engine)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
    await server.start()
    await health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
    metrics_address = f"{cfg.host}:{httpd.server_port}"

    record = NodeRecord(
        node_id=cfg.node_id, role=cfg.role, grpc_address=f"{cfg.host}:{port}", kv_address=kv_address,
        model=cfg.served_model_name, max_model_len=engine.max_model_len, metrics_address=metrics_address,
        layout=engine.layout(), version=__version__,
    )
    registration = Registration(cfg.etcd, cfg.cluster, record, cfg.ttl_s)
    await registration.start()
    # One line a supervisor (tandem up, tests) can wait for.
    print(f"TANDEM_READY role={cfg.role} node_id={cfg.node_id} grpc={record.grpc_address} "
          f"kv={kv_address} metrics={metrics_address}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("shutting down %s node %s", cfg.role, cfg.node_id)
    finally:
        await registration.close()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=5)
        httpd.shutdown()
        engine.shutdown()
