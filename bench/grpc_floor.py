"""The floor under `tandem bench coordinator`: grpc.aio alone, doing the calls a request costs.

A *relay* serves the Coordinator's Generate and, for each request, makes the calls the real
coordinator makes: one Prefill (unary) and one Decode (server streaming) to *nodes* that answer
at once with the same messages the simulated nodes send (the first token; then the decode's
first token alone, then its tokens ``--stream-interval`` at a time, the last group with the
finish), and streams the client the same messages (the prefill's token; each of the decode's;
the last with the finish). No tokenizing, admission, routing, watchdog, metrics or
logs: what is left is what the library costs for those three calls. With ``stream`` the relay
makes the two node calls as messages on one long-lived NodeCalls stream, as the coordinator's
``--node-calls stream`` does (calls and replies ready together share a message, as there). Run beside the coordinator,
on the same core and at the same rates, it says how much of the coordinator's CPU per request is
Tandem's own and how much the calls' floor.

  python -m tandem.bench.grpc_floor nodes PORT
  python -m tandem.bench.grpc_floor relay PORT NODES_ADDRESS STREAM_INTERVAL PROMPT_TOKENS [call|stream]
"""

from __future__ import annotations

import asyncio
import sys

PREFILL_S = 0.002  # the simulated nodes' times (coordinator_load.PROFILE): the same calls in flight
STEP_S = 0.005


async def serve_nodes(port: int) -> None:
    import grpc

    from tandem.proto import tandem_pb2 as pb
    from tandem.proto import tandem_pb2_grpc as pb_grpc

    class Prefill(pb_grpc.PrefillNodeServicer):
        async def Prefill(self, request, context):  # type: ignore[no-untyped-def]
            await asyncio.sleep(PREFILL_S)
            return pb.PrefillResponse(first_token=7, finish_reason="", prefill_s=PREFILL_S,
                                      handle=pb.KVHandle(remote_request_id=request.request_id))

    class Decode(pb_grpc.DecodeNodeServicer):
        async def Decode(self, request, context):  # type: ignore[no-untyped-def]
            # As the decode engine streams (vLLM's stream_interval): the first token at once, then
            # the rest ``interval`` at a time, the last group with the finish.
            n, interval = request.sampling.max_tokens, max(1, request.stream_interval)
            await asyncio.sleep(STEP_S)
            await context.write(pb.DecodeResponse(token_ids=[8], finish_reason="" if n > 1 else "length"))
            sent = 1
            while sent < n:
                k = min(interval, n - sent)
                await asyncio.sleep(STEP_S * k)
                sent += k
                await context.write(pb.DecodeResponse(token_ids=[9] * k, finish_reason="length" if sent == n else ""))

    class Calls(pb_grpc.NodeCallsServicer):
        """The same two calls as messages on one stream (NodeCalls): a task a call, one writer
        sending whatever replies are ready in one message."""

        async def Session(self, request_iterator, context):  # type: ignore[no-untyped-def]
            out: list[pb.NodeReply] = []
            ready = asyncio.Event()
            tasks: set[asyncio.Task[None]] = set()

            def send(reply: pb.NodeReply) -> None:
                out.append(reply)
                ready.set()

            async def prefill(cid: int, request: pb.PrefillRequest) -> None:
                await asyncio.sleep(PREFILL_S)
                send(pb.NodeReply(call_id=cid, prefill=pb.PrefillResponse(
                    first_token=7, finish_reason="", prefill_s=PREFILL_S,
                    handle=pb.KVHandle(remote_request_id=request.request_id))))

            async def decode(cid: int, request: pb.DecodeRequest) -> None:
                n, interval = request.sampling.max_tokens, max(1, request.stream_interval)
                await asyncio.sleep(STEP_S)
                send(pb.NodeReply(call_id=cid, decode=pb.DecodeResponse(token_ids=[8],
                                                                        finish_reason="" if n > 1 else "length")))
                sent = 1
                while sent < n:
                    k = min(interval, n - sent)
                    await asyncio.sleep(STEP_S * k)
                    sent += k
                    send(pb.NodeReply(call_id=cid, decode=pb.DecodeResponse(
                        token_ids=[9] * k, finish_reason="length" if sent == n else "")))

            async def read() -> None:
                async for batch in request_iterator:
                    for call in batch.calls:
                        body = prefill(call.call_id, call.prefill) if call.HasField("prefill") else \
                            decode(call.call_id, call.decode)
                        task = asyncio.ensure_future(body)
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)

            reader = asyncio.ensure_future(read())
            try:
                while True:
                    await ready.wait()
                    ready.clear()
                    batch, out[:] = list(out), []
                    yield pb.NodeReplyBatch(replies=batch)
            finally:
                reader.cancel()

    server = grpc.aio.server()
    pb_grpc.add_PrefillNodeServicer_to_server(Prefill(), server)
    pb_grpc.add_DecodeNodeServicer_to_server(Decode(), server)
    pb_grpc.add_NodeCallsServicer_to_server(Calls(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def serve_relay(port: int, nodes: str, interval: int, prompt_tokens: int, mode: str = "call") -> None:
    """``mode``: ``call`` (a Prefill call and a Decode call a request) or ``stream`` (both as
    messages on one NodeCalls stream, the coordinator's ``--node-calls stream``)."""
    import grpc

    from tandem.proto import tandem_pb2 as pb
    from tandem.proto import tandem_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(nodes)
    prefill, decode = pb_grpc.PrefillNodeStub(channel), pb_grpc.DecodeNodeStub(channel)
    if mode == "stream":
        prefill = decode = _StreamCalls(pb_grpc.NodeCallsStub(channel))  # type: ignore[assignment]

    class Relay(pb_grpc.CoordinatorServicer):
        async def Generate(self, request, context):  # type: ignore[no-untyped-def]
            n = request.sampling.max_tokens
            pre = await prefill.Prefill(pb.PrefillRequest(request_id="r", prompt_token_ids=[1] * prompt_tokens,
                                                          sampling=request.sampling, hold_kv=True))
            await context.write(pb.GenerateResponse(request_id="r", token_ids=[pre.first_token]))
            if n <= 1:
                return
            sampling = pb.SamplingParams()
            sampling.CopyFrom(request.sampling)
            sampling.max_tokens = n - 1
            held = None
            async for msg in decode.Decode(pb.DecodeRequest(request_id="r", prompt_token_ids=[1] * (prompt_tokens + 1),
                                                            sampling=sampling, handle=pre.handle,
                                                            stream_interval=interval)):
                out = pb.GenerateResponse(request_id="r", token_ids=msg.token_ids)
                if msg.finish_reason:
                    out.finish.reason = msg.finish_reason
                    out.finish.timings.prefill_s = pre.prefill_s
                    held = out
                else:
                    await context.write(out)
            if held is not None:
                await context.write(held)

    server = grpc.aio.server()
    pb_grpc.add_CoordinatorServicer_to_server(Relay(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


class _StreamCalls:
    """Prefill(request) -> awaitable response and Decode(request) -> async iterator, as messages
    on one stream: one writer sending the calls made since its last write in one message, one
    reader handing each reply to its call's queue."""

    def __init__(self, stub) -> None:  # type: ignore[no-untyped-def]
        self.stub = stub
        self.call = None
        self.ids = 0
        self.out: list = []  # type: ignore[type-arg]
        self.ready = asyncio.Event()
        self.queues: dict[int, asyncio.Queue] = {}  # type: ignore[type-arg]

    def _start(self, **body) -> asyncio.Queue:  # type: ignore[no-untyped-def,type-arg]
        from tandem.proto import tandem_pb2 as pb

        if self.call is None:
            self.call = self.stub.Session()
            asyncio.ensure_future(self._read())
            asyncio.ensure_future(self._write())
        self.ids += 1
        q: asyncio.Queue = asyncio.Queue()  # type: ignore[type-arg]
        self.queues[self.ids] = q
        self.out.append(pb.NodeCall(call_id=self.ids, **body))
        self.ready.set()
        return q

    async def _write(self) -> None:
        from tandem.proto import tandem_pb2 as pb

        while True:
            await self.ready.wait()
            self.ready.clear()
            batch, self.out = self.out, []
            await self.call.write(pb.NodeCallBatch(calls=batch))  # type: ignore[attr-defined]

    async def _read(self) -> None:
        import grpc

        while (batch := await self.call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            for reply in batch.replies:
                self.queues[reply.call_id].put_nowait(reply)

    async def Prefill(self, request):  # type: ignore[no-untyped-def]
        q = self._start(prefill=request)
        reply = await q.get()
        del self.queues[reply.call_id]
        return reply.prefill

    async def Decode(self, request):  # type: ignore[no-untyped-def]
        q = self._start(decode=request)
        while True:
            reply = await q.get()
            yield reply.decode
            if reply.decode.finish_reason:
                del self.queues[reply.call_id]
                return


def main(argv: list[str]) -> int:
    import uvloop

    if len(argv) == 2 and argv[0] == "nodes":
        uvloop.run(serve_nodes(int(argv[1])))
    elif len(argv) in (5, 6) and argv[0] == "relay":
        uvloop.run(serve_relay(int(argv[1]), argv[2], int(argv[3]), int(argv[4]), *argv[5:]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
