"""What every daemon's gRPC server has: message limits, keepalive, health checking, reflection,
signals, and a guard that turns bytes which are not a valid request into INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter

from .logs import RateLimitedLog
from .tls import TlsConfig

logger = logging.getLogger(__name__)

# Large enough that oversize requests reach the servicer, which rejects them with a reason.
_LIMITS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
# Keepalive both ways: a peer that stops answering (frozen, partitioned) breaks its calls within
# ~15 s even when nothing else notices; servers accept the callers' pings.
SERVER_OPTIONS = [*_LIMITS,
                  ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                  ("grpc.keepalive_permit_without_calls", 1),
                  ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                  ("grpc.http2.max_ping_strikes", 0)]
CHANNEL_OPTIONS = [*_LIMITS,
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                   ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]

MALFORMED = Counter("tandem_grpc_malformed_requests", "Requests whose bytes were not a valid message", ["method"])
_malformed_log = RateLimitedLog(logger, every_s=10.0)


class Malformed:
    """Stands in for a request whose bytes did not parse, so the servicer is never called."""

    def __init__(self, method: str, reason: str) -> None:
        self.method = method
        self.reason = reason

    def note(self) -> None:
        """Counted, and one rate-limited warning line."""
        MALFORMED.labels(self.method).inc()
        _malformed_log.warning("rejected a malformed request: %s", self.reason)


def _guard(method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, but bytes that are not a valid message end the call with
    INVALID_ARGUMENT and one rate-limited warning line (gRPC's own answer is UNKNOWN plus a
    traceback per call: a log-flooding lever for anyone who can reach the port)."""
    parse = h.request_deserializer

    def safe_parse(raw: bytes) -> object:
        try:
            return parse(raw)
        except Exception as exc:
            return Malformed(method, f"{method}: the request is not a valid message ({type(exc).__name__})")

    if h.request_streaming:
        # A stream's handler reads each message itself: one that did not parse reaches it as a
        # ``Malformed``, and the handler ends the stream with its reason (tandem/node/calls.py).
        return h._replace(request_deserializer=safe_parse)

    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]] = h.unary_unary or h.unary_stream

    async def guarded(request: object, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            request.note()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await behavior(request, context)

    kind = "unary_stream" if h.response_streaming else "unary_unary"
    return h._replace(request_deserializer=safe_parse, **{kind: guarded})


class _GuardedServer:
    """What generated ``add_*Servicer_to_server`` functions see: every method handler they
    register goes through ``_guard`` first. (They register each service twice, as a generic
    handler and as registered methods; the registered ones are enough to build both.)"""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        return  # rebuilt from add_registered_method_handlers below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        guarded = {name: _guard(f"{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        self._server.add_registered_method_handlers(service, guarded)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    services: tuple[str, ...] = ()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=grace_s)


async def start_grpc(host: str, port: int, service_name: str, add_servicer: Callable[[grpc.aio.Server], None],
                     more_services: tuple[str, ...] = (), tls: TlsConfig | None = None) -> GrpcServer:
    """Start a server with ``service_name`` (and ``more_services``, which ``add_servicer`` adds too)
    plus health and reflection; mark it SERVING. ``add_servicer`` gets a server whose registered
    methods are guarded against malformed bytes. ``tls`` (when on): TLS, mutual with a CA."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_servicer(_GuardedServer(server))  # type: ignore[arg-type]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service_name, *more_services, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)
    if tls is not None and tls.on:
        bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials())
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    out = GrpcServer(server, health_servicer, bound, (service_name,))
    await out.set_serving(True)
    return out


class StopSignals:
    """SIGINT/SIGTERM as two events: ``first`` (stop gracefully) and ``again`` (stop now)."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.again = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.first.is_set():
            self.again.set()
        self.first.set()
