"""A coordinator's calls to a node as messages on one NodeCalls stream: the coordinator's side
(coordinator/callstream.py) against the node's (tandem/node/calls.py) over a real in-process gRPC
server, with fake prefill and decode work behind the node's servicer (no engines)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tandem.coordinator.callstream import NodeStream
from tandem.coordinator.pipeline import Pipeline
from tandem.coordinator.request import FinishEvent, PipelineConfig, TokenEvent
from tandem.coordinator.router import Router
from tandem.coordinator.textcodec import TextCodec
from tandem.errors import InvalidRequest, KVUnavailable
from tandem.grpcserve import GrpcServer, start_grpc
from tandem.membership import NodeRecord
from tandem.node.calls import NodeCallsServicer, add_calls_servicer
from tandem.proto import tandem_pb2 as pb
from tandem.sampling import Sampling


class Prefills:
    """Stands in for PrefillServicer.serve: the first token is the prompt's length; a request id
    starting with "bad" is refused; while ``gate`` is set and not open, calls wait on it."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.gate: asyncio.Event | None = None

    async def serve(self, req: pb.PrefillRequest) -> pb.PrefillResponse:
        self.started.append(req.request_id)
        try:
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(req.request_id)
            raise
        if req.request_id.startswith("bad"):
            raise InvalidRequest("empty prompt")
        return pb.PrefillResponse(first_token=len(req.prompt_token_ids), prefill_s=0.001,
                                  handle=pb.KVHandle(remote_request_id=req.request_id))


class Decodes:
    """Stands in for DecodeServicer.serve: tokens 100, 101, ... up to max_tokens, the last with
    "length". Request ids: "hang..." waits after its first token, "kv..." fails after it,
    "cut..." ends after it without a finish reason."""

    def __init__(self, step_s: float = 0.001) -> None:
        self.step_s = step_s
        self.cancelled: list[str] = []
        self.served = 0

    async def serve(self, req: pb.DecodeRequest) -> AsyncIterator[pb.DecodeResponse]:
        rid, n = req.request_id, req.sampling.max_tokens
        self.served += 1
        try:
            for i in range(n):
                await asyncio.sleep(self.step_s)
                if i == 1 and rid.startswith("hang"):
                    await asyncio.Event().wait()
                if i == 1 and rid.startswith("kv"):
                    raise KVUnavailable("the KV did not arrive")
                if i == 1 and rid.startswith("cut"):
                    return
                yield pb.DecodeResponse(token_ids=[100 + i], finish_reason="length" if i == n - 1 else "")
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise


async def serve(prefill: Prefills | None = None, decode: Decodes | None = None,
                port: int = 0) -> tuple[GrpcServer, NodeCallsServicer]:
    held: list[NodeCallsServicer] = []
    server = await start_grpc("127.0.0.1", port, "tandem.v1.NodeCalls",
                              lambda s: held.append(add_calls_servicer(s, prefill, decode)))  # type: ignore[arg-type]
    return server, held[0]


def prefill_req(rid: str, n: int = 3) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id=rid, prompt_token_ids=list(range(1, n + 1)))


def decode_req(rid: str, n: int = 4) -> pb.DecodeRequest:
    return pb.DecodeRequest(request_id=rid, prompt_token_ids=[1, 2], sampling=pb.SamplingParams(max_tokens=n))


async def read_all(call: object) -> list[int]:
    out: list[int] = []
    while (msg := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        out.extend(msg.token_ids)
    return out


async def until(cond: object, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_many_calls_share_one_stream_and_each_gets_its_own_replies() -> None:
    async def go() -> None:
        prefills, decodes = Prefills(), Decodes()
        server, servicer = await serve(prefills, decodes)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        s = NodeStream(ch, "node n0")
        try:
            pre = [s.Prefill(prefill_req(f"p{i}", i + 1), timeout=5) for i in range(40)]
            dec = [s.Decode(decode_req(f"d{i}", 2 + i % 5), timeout=5) for i in range(15)]
            answers = await asyncio.gather(*pre)
            tokens = await asyncio.gather(*(read_all(c) for c in dec))
            assert [a.first_token for a in answers] == [i + 1 for i in range(40)]
            assert tokens == [[100 + k for k in range(2 + i % 5)] for i in range(15)]
            assert len(servicer._sessions) == 1 and s.calls == 0
            # A refused call ends alone, with the status its RPC would have had.
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await s.Prefill(prefill_req("bad-1"), timeout=5)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty prompt" in bad.value.details()
            kv = s.Decode(decode_req("kv-1"), timeout=5)
            assert (await kv.read()).token_ids == [100]
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await kv.read()
            assert lost.value.code() == grpc.StatusCode.ABORTED
            # A decode that ended without a finish reason: its messages, then the end.
            assert await read_all(s.Decode(decode_req("cut-1"), timeout=5)) == [100]
            assert (await s.Prefill(prefill_req("p-after"), timeout=5)).first_token == 3
            # A decode node asked to prefill: UNIMPLEMENTED, naming what it does.
            only_decode, _ = await serve(decode=decodes)
            s2 = NodeStream(grpc.aio.insecure_channel(f"127.0.0.1:{only_decode.port}"), "node n1")
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await s2.Prefill(prefill_req("p"), timeout=5)
            assert wrong.value.code() == grpc.StatusCode.UNIMPLEMENTED and "decodes" in wrong.value.details()
            s2.close()
            await only_decode.stop(0)
        finally:
            s.close()
            await ch.close()
            await server.stop(0)

    asyncio.run(go())


def test_cancel_and_deadline_reach_the_node() -> None:
    async def go() -> None:
        prefills, decodes = Prefills(), Decodes()
        prefills.gate = asyncio.Event()
        server, _ = await serve(prefills, decodes)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        s = NodeStream(ch, "node n0")
        try:
            waiting = s.Prefill(prefill_req("p-cancel"), timeout=30)
            await until(lambda: "p-cancel" in prefills.started)
            waiting.cancel()
            await until(lambda: "p-cancel" in prefills.cancelled)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await s.Prefill(prefill_req("p-late"), timeout=0.2)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await until(lambda: "p-late" in prefills.cancelled)
            hang = s.Decode(decode_req("hang-1"), timeout=30)
            assert (await hang.read()).token_ids == [100]
            hang.cancel()
            await until(lambda: "hang-1" in decodes.cancelled)
            slow = s.Decode(decode_req("hang-2"), timeout=0.3)
            assert (await slow.read()).token_ids == [100]
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await slow.read()
            assert over.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await until(lambda: "hang-2" in decodes.cancelled)
            assert s.calls == 0
            prefills.gate.set()
            assert (await s.Prefill(prefill_req("p-ok"), timeout=5)).first_token == 3
        finally:
            s.close()
            await ch.close()
            await server.stop(0)

    asyncio.run(go())


def test_a_node_that_dies_fails_every_call_on_the_stream_and_the_next_call_opens_a_new_one() -> None:
    async def go() -> None:
        prefills, decodes = Prefills(), Decodes()
        prefills.gate = asyncio.Event()
        server, _ = await serve(prefills, decodes)
        port = server.port
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        s = NodeStream(ch, "node n0")
        try:
            calls = [s.Prefill(prefill_req(f"p{i}"), timeout=30) for i in range(3)]
            hang = s.Decode(decode_req("hang-1"), timeout=30)
            assert (await hang.read()).token_ids == [100]
            await server.stop(0)  # the process is gone
            codes = set()
            for c in calls:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c
                codes.add(e.value.code())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await hang.read()
            codes.add(e.value.code())
            # What a broken connection does to RPCs: the pipeline retries or migrates them.
            assert codes <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
            assert s.calls == 0
            again, _ = await serve(Prefills(), decodes, port=port)  # restarted on its address
            try:
                assert (await s.Prefill(prefill_req("p-new"), timeout=10)).first_token == 3
            finally:
                await again.stop(0)
        finally:
            s.close()
            await ch.close()

    asyncio.run(go())


def test_a_stopping_node_serves_its_calls_to_the_end_then_ends_the_stream() -> None:
    async def go() -> None:
        prefills, decodes = Prefills(), Decodes()
        prefills.gate = asyncio.Event()
        server, servicer = await serve(prefills, decodes)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        s = NodeStream(ch, "node n0")
        try:
            running = s.Prefill(prefill_req("p-running"), timeout=30)
            await until(lambda: "p-running" in prefills.started)
            servicer.close()  # drained: it stops
            with pytest.raises(grpc.aio.AioRpcError) as new:
                await s.Prefill(prefill_req("p-new"), timeout=5)
            assert new.value.code() == grpc.StatusCode.UNAVAILABLE and "stopping" in new.value.details()
            assert not running.done()
            prefills.gate.set()
            assert (await running).first_token == 3  # served to its end
            await servicer.wait_closed(5)
            assert not servicer._sessions  # and then the stream ended, before the server's stop
            assert prefills.cancelled == []
        finally:
            s.close()
            await ch.close()
            await server.stop(0)

    asyncio.run(go())


def test_a_retired_stream_lets_its_calls_finish_and_takes_no_new_ones() -> None:
    async def go() -> None:
        prefills, decodes = Prefills(), Decodes(step_s=0.05)
        server, servicer = await serve(prefills, decodes)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        s = NodeStream(ch, "decode node n0")
        try:
            running = s.Decode(decode_req("d-1", 6), timeout=30)
            assert (await running.read()).token_ids == [100]
            s.retire()  # the node left the cluster, or its channel is being replaced
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await read_all(s.Decode(decode_req("d-2"), timeout=5))
            assert gone.value.code() == grpc.StatusCode.UNAVAILABLE and "left the cluster" in gone.value.details()
            assert await read_all(running) == [101, 102, 103, 104, 105]
            await until(lambda: not servicer._sessions)  # the stream ended with its last call
            assert decodes.cancelled == []
        finally:
            s.close()
            await ch.close()
            await server.stop(0)

    asyncio.run(go())


def test_a_call_cancelled_in_the_message_that_starts_it_leaves_nothing_running() -> None:
    """The coordinator's writer can send a call and its cancel together (it was busy writing while
    the caller gave up): the node runs nothing, and the stream still ends when its caller's half
    does."""
    async def go() -> None:
        prefills = Prefills()
        server, servicer = await serve(prefills, Decodes())
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            call = ch.stream_stream("/tandem.v1.NodeCalls/Session", request_serializer=pb.NodeCallBatch.SerializeToString,
                                    response_deserializer=pb.NodeReplyBatch.FromString)()
            await call.write(pb.NodeCallBatch(calls=[pb.NodeCall(call_id=1, prefill=prefill_req("p-1")),
                                                     pb.NodeCall(call_id=1, cancel=True),
                                                     pb.NodeCall(call_id=2, prefill=prefill_req("p-2"))]))
            await call.done_writing()
            replies = []
            async with asyncio.timeout(5):  # the stream ends: no call is left running on it
                while (batch := await call.read()) is not grpc.aio.EOF:
                    replies.extend(batch.replies)
            assert [r.call_id for r in replies] == [2] and prefills.started == ["p-2"]
            assert not servicer._sessions
        finally:
            await ch.close()
            await server.stop(0)

    asyncio.run(go())


def test_bytes_that_are_not_a_message_end_the_stream_with_invalid_argument() -> None:
    async def go() -> None:
        server, _ = await serve(Prefills(), Decodes())
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            call = ch.stream_stream("/tandem.v1.NodeCalls/Session")()
            await call.write(b"\x0f\xff\xff\xff garbage")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await ch.close()
            await server.stop(0)

    asyncio.run(go())


def test_the_pipeline_over_call_streams_serves_and_migrates_when_a_decode_node_dies(tiny_model: Path) -> None:
    """The whole request path with ``--node-calls stream``: a request is served; one whose decode
    node dies mid-stream moves to the other decode node and ends with every token."""

    async def go() -> None:
        prefills = Prefills()
        decodes = [Decodes(step_s=0.02), Decodes(step_s=0.02)]
        p_server, _ = await serve(prefills)
        d_servers = [(await serve(decode=d))[0] for d in decodes]
        router = Router("tiny", pool_wait_s=1.0, watch_loads=False, node_calls="stream")
        router.on_membership("prefill-0", NodeRecord("prefill-0", "prefill", f"127.0.0.1:{p_server.port}", "x:1",
                                                     "tiny", 512))
        for i, srv in enumerate(d_servers):
            router.on_membership(f"decode-{i}", NodeRecord(f"decode-{i}", "decode", f"127.0.0.1:{srv.port}",
                                                           "x:1", "tiny", 512))
        p = Pipeline(router, TextCodec(str(tiny_model)), lambda: 512, "tiny", PipelineConfig(stall_s=0.5))
        try:
            req = p.prepare(request_id="", text=None, token_ids=[5, 6, 7], sampling=Sampling(max_tokens=5))
            evs = [ev async for ev in p.run(req)]
            ids = [t for ev in evs if isinstance(ev, TokenEvent) for t in ev.token_ids]
            assert ids == [3, 100, 101, 102, 103] and evs[-1].reason == "length"
            # The next request: its decode node dies after its second token.
            req = p.prepare(request_id="", text=None, token_ids=[5, 6, 7], sampling=Sampling(max_tokens=30))
            got: list[int] = []
            finish = None
            async for ev in p.run(req):
                if isinstance(ev, TokenEvent):
                    got.extend(ev.token_ids)
                    if len(got) == 3:
                        dying = next(i for i in range(2) if router._nodes[f"decode-{i}"].outstanding)
                        await d_servers[dying].stop(0)
                elif isinstance(ev, FinishEvent):
                    finish = ev
            assert finish is not None and finish.reason == "length" and finish.migrations == 1
            assert len(got) == 30
        finally:
            await router.close()
            await p_server.stop(0)
            for srv in d_servers:
                await srv.stop(0)

    asyncio.run(go())
