"""Tandem's error types, and the one place that maps them to gRPC and HTTP."""

from __future__ import annotations

import grpc


class TandemError(Exception):
    """Base of the errors a request can end with; the message is shown to the client."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    openai_type = "server_error"

    def details(self) -> dict[str, str]:
        """What goes out beside the message: HTTP headers and gRPC trailing metadata (lowercase names)."""
        return {}


class InvalidRequest(TandemError):
    """Bad input: rejected before any engine work."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    openai_type = "invalid_request_error"


class Unauthenticated(TandemError):
    """No API key, or one the coordinator does not know: refused before any work."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    openai_type = "authentication_error"

    def details(self) -> dict[str, str]:
        return {"www-authenticate": "Bearer"}


class Unavailable(TandemError):
    """No node can take the request now (an empty pool, a node gone)."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    openai_type = "service_unavailable"


class Rejected(TandemError):
    """Admission: no node is predicted to meet the request's SLO; refused before any engine work.
    Carries both predictions and, when waiting can help, how long to wait."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    openai_type = "rate_limit_exceeded"

    def __init__(self, message: str, ttft_s: float | None, tpot_s: float | None, retry_after_s: int | None) -> None:
        super().__init__(message)
        self.ttft_s = ttft_s
        self.tpot_s = tpot_s
        self.retry_after_s = retry_after_s

    def details(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.ttft_s is not None:
            out["x-tandem-predicted-ttft-ms"] = f"{self.ttft_s * 1000:.1f}"
        if self.tpot_s is not None:
            out["x-tandem-predicted-tpot-ms"] = f"{self.tpot_s * 1000:.1f}"
        if self.retry_after_s is not None:
            out["retry-after"] = str(self.retry_after_s)
        return out


class NodeFailed(TandemError):
    """A node failed while serving the request; the message says which and how."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 502
    openai_type = "server_error"


class DeadlineExceeded(TandemError):
    """A node accepted a call but did not answer within its deadline."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    openai_type = "timeout"


class KVUnavailable(TandemError):
    """A request's KV blocks could not be had (fetch failed, lease over, gone with a node):
    the request cannot go on from them, but it can be prefilled again."""

    grpc_code = grpc.StatusCode.ABORTED
    http_status = 502
    openai_type = "server_error"


class RequestAborted(TandemError):
    """One request failed on a node that is otherwise fine; it can run again elsewhere."""

    grpc_code = grpc.StatusCode.ABORTED
    http_status = 502
    openai_type = "server_error"


def grpc_trailers_of(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Its details, and its type (``x-tandem-error``: a client maps it back, since two types share
    a status code)."""
    if not isinstance(exc, TandemError):
        return ()
    return (*exc.details().items(), ("x-tandem-error", type(exc).__name__))


def grpc_status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, TandemError):
        return exc.grpc_code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def error_from_grpc(code: grpc.StatusCode, details: str, where: str) -> TandemError:
    """Turn a node's gRPC status back into a Tandem error (coordinator side)."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{where}: {details}")
    if code == grpc.StatusCode.ABORTED:
        return KVUnavailable(f"{where}: {details}")
    return NodeFailed(f"{where}: {code.name}: {details}")


def openai_error_body(exc: BaseException) -> tuple[int, dict[str, object]]:
    """(HTTP status, OpenAI-style error body)."""
    extra: dict[str, object] = {}
    if isinstance(exc, TandemError):
        status, etype, msg = exc.http_status, exc.openai_type, str(exc)
        if isinstance(exc, Rejected):
            extra = {"predicted_ttft_ms": None if exc.ttft_s is None else round(exc.ttft_s * 1000, 1),
                     "predicted_tpot_ms": None if exc.tpot_s is None else round(exc.tpot_s * 1000, 1)}
    else:
        status, etype, msg = 500, "server_error", f"internal error: {type(exc).__name__}"
    return status, {"error": {"message": msg, "type": etype, "param": None, "code": status, **extra}}
