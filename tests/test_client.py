"""tandem.client against a stand-in coordinator (the real one is in the e2e tests): typed errors,
retries before the first token and never after, the API key on every call."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest

from tandem.client import AsyncClient, Client, error_of
from tandem.errors import InvalidRequest, NodeFailed, Rejected, TandemError, Unauthenticated, Unavailable
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc


class Fake(pb_grpc.CoordinatorServicer):
    """Fails the first ``unavailable`` calls with UNAVAILABLE (``after_token``: after one token)."""

    def __init__(self) -> None:
        self.calls = 0
        self.unavailable = 0
        self.after_token = False
        self.keys: list[str | None] = []
        self.requests: list[pb.GenerateRequest] = []
        self.lock = threading.Lock()

    def Generate(self, request, context):  # noqa: N802
        with self.lock:
            self.calls += 1
            n = self.calls
            self.keys.append(dict(context.invocation_metadata()).get("authorization"))
            self.requests.append(request)
        if request.text == "reject":
            context.abort_with_status(_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "no node meets the SLO",
                                              (("x-tandem-predicted-ttft-ms", "812.5"), ("retry-after", "3"))))
        if request.text == "node-failed":  # UNAVAILABLE's code, but a node failed: not retried
            context.abort_with_status(_status(grpc.StatusCode.UNAVAILABLE, "decode-0 failed twice",
                                              (("x-tandem-error", "NodeFailed"),)))
        if request.text == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty prompt")
        if n <= self.unavailable:
            if self.after_token:
                yield pb.GenerateResponse(token_ids=[1], text="a")
            context.abort(grpc.StatusCode.UNAVAILABLE, "no decode node")
        yield pb.GenerateResponse(token_ids=[1], text="a")
        yield pb.GenerateResponse(token_ids=[2], text="b", finish=pb.Finish(reason="length",
                                                                             usage=pb.Usage(completion_tokens=2)))

    def ClusterStatus(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "an API key is required")


def _status(code: grpc.StatusCode, details: str, trailers: tuple) -> grpc.Status:
    class S(grpc.Status):
        pass

    s = S()
    s.code, s.details, s.trailing_metadata = code, details, trailers
    return s


@pytest.fixture()
def fake():
    f = Fake()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_CoordinatorServicer_to_server(f, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f, f"127.0.0.1:{port}"
    server.stop(0)


def test_sync_client_streams_retries_before_the_first_token_and_sends_the_key(fake) -> None:
    f, address = fake
    f.unavailable = 2
    with Client(address, api_key="k" * 20, backoff_s=0.01) as c:
        out = c.complete("hello", max_tokens=2, temperature=0.0, stop="x", slo_ttft_ms=500)
    assert (out.text, out.token_ids, out.finish.reason) == ("ab", [1, 2], "length")
    assert f.calls == 3 and set(f.keys) == {"Bearer " + "k" * 20}
    req = f.requests[-1]
    assert req.sampling.max_tokens == 2 and list(req.sampling.stop) == ["x"] and req.slo.ttft_ms == 500


def test_a_failure_after_a_token_is_raised_never_retried(fake) -> None:
    f, address = fake
    f.unavailable, f.after_token = 5, True
    got = []
    with Client(address, backoff_s=0.01) as c, pytest.raises(Unavailable, match="no decode node"):
        for chunk in c.stream("hello"):
            got.append(chunk.text)
    assert got == ["a"] and f.calls == 1
    f.calls, f.after_token = 0, False
    with Client(address, backoff_s=0.01, retries=1) as c, pytest.raises(Unavailable):
        c.complete("hello")
    assert f.calls == 2  # one try and one retry


def test_errors_are_tandems_own_types(fake) -> None:
    f, address = fake

    async def go() -> None:
        async with AsyncClient(address, backoff_s=0.01) as c:
            with pytest.raises(Rejected) as ei:
                await c.complete("reject")
            assert ei.value.ttft_s == pytest.approx(0.8125) and ei.value.retry_after_s == 3
            with pytest.raises(InvalidRequest, match="empty prompt"):
                await c.complete("bad")
            calls = f.calls
            with pytest.raises(NodeFailed, match="decode-0 failed twice"):
                await c.complete("node-failed")
            assert f.calls == calls + 1  # named by its trailer, and not tried again
            with pytest.raises(Unauthenticated):
                await c.status()
            assert (await c.complete([5, 6])).text == "ab"
            with pytest.raises(TypeError, match="unknown sampling parameters: temprature"):
                await c.complete("x", temprature=0.5)

    asyncio.run(go())
    assert f.requests[-1].token_ids.ids == [5, 6]


def test_error_of_maps_codes_it_does_not_know_to_tandem_error() -> None:
    class E(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNIMPLEMENTED

        def details(self):
            return "nope"

        def trailing_metadata(self):
            return ()

    err = error_of(E())
    assert type(err) is TandemError and "UNIMPLEMENTED" in str(err)
