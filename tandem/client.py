"""A small gRPC client for the coordinator (used by `tandem generate`, `tandem up` and tests)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.tls import TlsConfig


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: pb.Finish | None = None


def _auth(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call's metadata: ``api_key``, else TANDEM_API_KEY, as a bearer token (none when neither is set)."""
    key = api_key if api_key is not None else os.environ.get("TANDEM_API_KEY", "")
    return (("authorization", f"Bearer {key}"),) if key else ()


async def stream(address: str, prompt: str | list[int], *, request_id: str = "", api_key: str | None = None,
                 tls: TlsConfig | None = None, **sampling: object) -> AsyncIterator[pb.GenerateResponse]:
    """Yield the coordinator's Generate messages for one prompt."""
    req = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sampling))  # type: ignore[arg-type]
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    async with (tls or TlsConfig()).aio_channel(address) as ch:
        async for msg in pb_grpc.CoordinatorStub(ch).Generate(req, metadata=_auth(api_key)):
            yield msg


async def complete(address: str, prompt: str | list[int], **kw: object) -> Completion:
    out = Completion()
    async for msg in stream(address, prompt, **kw):  # type: ignore[arg-type]
        out.token_ids.extend(msg.token_ids)
        out.text += msg.text
        if msg.HasField("finish"):
            out.finish = msg.finish
    return out


async def cluster_status(address: str, api_key: str | None = None, tls: TlsConfig | None = None
                         ) -> pb.ClusterStatusResponse:
    async with (tls or TlsConfig()).aio_channel(address) as ch:
        return await pb_grpc.CoordinatorStub(ch).ClusterStatus(pb.ClusterStatusRequest(), timeout=10,
                                                               metadata=_auth(api_key))
