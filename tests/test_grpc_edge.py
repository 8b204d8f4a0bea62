"""The gRPC edge every daemon shares: bytes that are not a valid request get INVALID_ARGUMENT
and one rate-limited log line, never UNKNOWN and a traceback per call."""

from __future__ import annotations

import asyncio
import logging
import random

import grpc
import pytest

from tandem.grpcserve import start_grpc
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc


class Echo(pb_grpc.PrefillNodeServicer):
    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        return pb.PrefillResponse(first_token=len(request.prompt_token_ids))


def garbage(rng: random.Random) -> bytes:
    # A field tag with wire type 7 (invalid) makes sure the bytes cannot parse.
    return bytes([0x0F]) + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))


def test_malformed_bytes_get_invalid_argument_and_few_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> list[grpc.StatusCode]:
        server = await start_grpc("127.0.0.1", 0, "tandem.v1.PrefillNode",
                                  lambda s: pb_grpc.add_PrefillNodeServicer_to_server(Echo(), s))
        rng = random.Random(7)
        codes = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            raw = ch.unary_unary("/tandem.v1.PrefillNode/Prefill")
            for _ in range(50):
                try:
                    await raw(garbage(rng), timeout=5)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
            ok = await pb_grpc.PrefillNodeStub(ch).Prefill(pb.PrefillRequest(prompt_token_ids=[1, 2, 3]), timeout=5)
            assert ok.first_token == 3  # the server still serves a good request
        await server.stop(0)
        return codes

    with caplog.at_level(logging.WARNING):
        codes = asyncio.run(go())
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    lines = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert not any(r.exc_info for r in caplog.records)
