"""The Python client of Tandem's coordinator (gRPC): ``Client`` (blocking) and ``AsyncClient``.

    from tandem.client import Client
    with Client("10.0.0.1:50051", api_key="...") as c:
        for chunk in c.stream("the decode node", max_tokens=32, temperature=0):
            print(chunk.text, end="")
        print(c.complete([5, 6, 7], max_tokens=8).finish.reason)

Errors are Tandem's own types (``tandem.errors``): ``InvalidRequest``,
``Unauthenticated``, ``Rejected`` (with the predictions and ``retry_after_s``
the coordinator sent), ``Unavailable``, ``DeadlineExceeded``, ``NodeFailed``,
``KVUnavailable``, ``TandemError`` for the rest. A call that fails with
UNAVAILABLE before its first token (the coordinator restarting, no node in a
pool yet) is tried again, ``retries`` times, after a backoff that doubles from
``backoff_s`` to ``max_backoff_s`` with jitter; once a token has arrived a
failure is raised, never retried (the text would repeat). ``api_key`` (default:
TANDEM_API_KEY) goes as ``authorization: Bearer``; ``tls`` is a
``tandem.tls.TlsConfig`` (a CA alone verifies a coordinator that asks for no
client certificate).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from tandem.errors import (DeadlineExceeded, InvalidRequest, KVUnavailable, NodeFailed, Rejected, RequestAborted,
                           TandemError, Unauthenticated, Unavailable)
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.tls import TlsConfig

SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "min_tokens")


@dataclass
class Chunk:
    """One streamed message: new tokens and their text; ``finish`` on the last one; the id the
    coordinator gave the request."""

    token_ids: list[int]
    text: str
    finish: pb.Finish | None = None
    request_id: str = ""


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: pb.Finish | None = None
    request_id: str = ""


def error_of(exc: grpc.RpcError) -> TandemError:
    """The Tandem error a coordinator's status means (its trailers too: Rejected's predictions)."""
    code, details = exc.code(), exc.details() or ""
    trailers = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}

    def num(name: str, scale: float = 1.0) -> float | None:
        try:
            return float(trailers[name]) * scale
        except (KeyError, ValueError):
            return None

    if trailers.get("x-tandem-error") in _BY_NAME and trailers["x-tandem-error"] != "Rejected":
        return _BY_NAME[trailers["x-tandem-error"]](details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return Unauthenticated(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = num("retry-after")
        return Rejected(details, num("x-tandem-predicted-ttft-ms", 1e-3), num("x-tandem-predicted-tpot-ms", 1e-3),
                        None if retry is None else int(retry))
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(details)
    if code == grpc.StatusCode.ABORTED:
        return KVUnavailable(details)
    return TandemError(f"{code.name}: {details}")


# The coordinator names the type in its trailers; these take just a message.
_BY_NAME: dict[str, type[TandemError]] = {c.__name__: c for c in (
    InvalidRequest, Unauthenticated, Unavailable, NodeFailed, DeadlineExceeded, KVUnavailable, RequestAborted)}


def _request(prompt: str | list[int], request_id: str, model: str, slo_ttft_ms: float | None,
             slo_tpot_ms: float | None, priority: str, tenant: str, sampling: dict[str, Any]) -> pb.GenerateRequest:
    unknown = set(sampling) - set(SAMPLING)
    if unknown:
        raise TypeError(f"unknown sampling parameters: {', '.join(sorted(unknown))} (known: {', '.join(SAMPLING)})")
    params = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    req = pb.GenerateRequest(request_id=request_id, model=model, priority=priority, tenant=tenant,
                             sampling=pb.SamplingParams(**params))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    if slo_ttft_ms is not None:
        req.slo.ttft_ms = slo_ttft_ms
    if slo_tpot_ms is not None:
        req.slo.tpot_ms = slo_tpot_ms
    return req


class _Base:
    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None, tls: TlsConfig | None = None,
                 retries: int = 3, backoff_s: float = 0.25, max_backoff_s: float = 4.0,
                 timeout_s: float | None = None) -> None:
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("retries, backoff_s and max_backoff_s must be >= 0")
        self.target = target
        key = api_key if api_key is not None else os.environ.get("TANDEM_API_KEY", "")
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {key}"),) if key else ()
        self.tls = tls or TlsConfig()
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s

    def _pause(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)


class Client(_Base):
    """Blocking; one channel, safe to share between threads."""

    def __init__(self, target: str = "127.0.0.1:50051", **kw: Any) -> None:
        super().__init__(target, **kw)
        self._channel = self.tls.channel(target)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def stream(self, prompt: str | list[int], *, request_id: str = "", model: str = "",
               slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None, priority: str = "",
               tenant: str = "", timeout_s: float | None = None, **sampling: Any) -> Iterator[Chunk]:
        req = _request(prompt, request_id, model, slo_ttft_ms, slo_tpot_ms, priority, tenant, sampling)
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        for attempt in range(self.retries + 1):
            got = False
            try:
                for msg in self._stub.Generate(req, metadata=self._metadata, timeout=timeout):
                    got = True
                    yield Chunk(list(msg.token_ids), msg.text, msg.finish if msg.HasField("finish") else None,
                                msg.request_id)
                return
            except grpc.RpcError as exc:
                err = error_of(exc)
                if got or type(err) is not Unavailable or attempt == self.retries:
                    raise err from None
                time.sleep(self._pause(attempt))

    def complete(self, prompt: str | list[int], **kw: Any) -> Completion:
        out = Completion()
        for chunk in self.stream(prompt, **kw):
            out.request_id = chunk.request_id or out.request_id
            out.token_ids.extend(chunk.token_ids)
            out.text += chunk.text
            out.finish = chunk.finish or out.finish
        return out

    def status(self, timeout_s: float = 10.0) -> pb.ClusterStatusResponse:
        try:
            return self._stub.ClusterStatus(pb.ClusterStatusRequest(), metadata=self._metadata, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise error_of(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio; make it inside the event loop that uses it."""

    def __init__(self, target: str = "127.0.0.1:50051", **kw: Any) -> None:
        super().__init__(target, **kw)
        self._channel = self.tls.aio_channel(target)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    async def stream(self, prompt: str | list[int], *, request_id: str = "", model: str = "",
                     slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None, priority: str = "",
                     tenant: str = "", timeout_s: float | None = None, **sampling: Any) -> AsyncIterator[Chunk]:
        req = _request(prompt, request_id, model, slo_ttft_ms, slo_tpot_ms, priority, tenant, sampling)
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        for attempt in range(self.retries + 1):
            got = False
            try:
                async for msg in self._stub.Generate(req, metadata=self._metadata, timeout=timeout):
                    got = True
                    yield Chunk(list(msg.token_ids), msg.text, msg.finish if msg.HasField("finish") else None,
                                msg.request_id)
                return
            except grpc.aio.AioRpcError as exc:
                err = error_of(exc)
                if got or type(err) is not Unavailable or attempt == self.retries:
                    raise err from None
                await asyncio.sleep(self._pause(attempt))

    async def complete(self, prompt: str | list[int], **kw: Any) -> Completion:
        out = Completion()
        async for chunk in self.stream(prompt, **kw):
            out.request_id = chunk.request_id or out.request_id
            out.token_ids.extend(chunk.token_ids)
            out.text += chunk.text
            out.finish = chunk.finish or out.finish
        return out

    async def status(self, timeout_s: float = 10.0) -> pb.ClusterStatusResponse:
        try:
            return await self._stub.ClusterStatus(pb.ClusterStatusRequest(), metadata=self._metadata,
                                                  timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_of(exc) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
