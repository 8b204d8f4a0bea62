"""`tandem bench relay`: the CPU the coordinator's own code spends relaying a streamed message.

`tandem bench coordinator` measures the whole coordinator process against simulated nodes over
gRPC, and beside it grpc.aio alone making the same calls; the difference is Tandem's own, but it
is the difference of two noisy numbers. This measures Tandem's part directly: in this process,
no network, the coordinator's ``Generate`` (grpc_api.py), or its /v1/completions with
``stream: true`` (http_api.py: server-sent events, each chunk's JSON as the client gets it),
runs ``--requests`` requests at once through the real pipeline (admission off, the router, the stall watch, detokenizing, stop
strings, metrics, the finish), each with a client side that only keeps what it is sent (the
HTTP stream's text is checked afterwards against the tokens' own), and
decode calls whose replies arrive in their queues as a node's call stream puts them there
(callstream.py): a reply a turn of the event loop for every open call, prepared beforehand.
What is timed is the thread's CPU from the first request to the last finish, per message sent
to a client and per token; the fastest of ``--repeats`` runs (this VM's speed wanders). The
stubs' own share is in it too, the same in every run: the feeder's loop turn and a pop and a
put a message, and the client side's keeping of what it is sent.

    tandem bench relay --intervals 1,16 --apis grpc,http --requests 64 --tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any


FIRST_TOKEN = 7  # the prefill's


def _decode_ids(tokens: int, interval: int) -> list[list[int]]:
    """The decode replies' token ids, ``interval`` a reply (the prefill's token came first)."""
    n = tokens - 1
    return [[3 + (k + i) % 200 for i in range(min(interval, n - k))] for k in range(0, n, interval)]


def _fakes(tokens: int, interval: int) -> tuple[Any, Any]:
    """A router with one prefill and one decode node whose stubs answer at once, the decode's
    replies prepared; the feeder that puts them into each call's queue, one a loop turn."""
    import grpc

    from tandem.coordinator.router import Router
    from tandem.membership import NodeRecord
    from tandem.proto import tandem_pb2 as pb

    class Prefill:
        async def Prefill(self, req: Any, timeout: float | None = None) -> Any:
            resp = pb.PrefillResponse(first_token=FIRST_TOKEN, finish_reason="")
            resp.handle.CopyFrom(pb.KVHandle(remote_request_id=req.request_id, num_tokens=len(req.prompt_token_ids)))
            return resp

        async def Release(self, req: Any, timeout: float | None = None) -> Any:
            return pb.ReleaseResponse()

    class Call:  # a call on a call stream: its replies in ``items`` (what Watchdog.stream reads)
        def __init__(self, replies: list[Any]) -> None:
            self.items: asyncio.Queue[Any] = asyncio.Queue()
            self.replies = replies

        def cancel(self) -> bool:
            return False

    # A decode call's replies (its first token came from the prefill), made before the clock starts;
    # each call pops its own copy of the list.
    n = tokens - 1
    groups = _decode_ids(tokens, interval)
    replies = [pb.DecodeResponse(token_ids=ids, finish_reason="length" if k == len(groups) - 1 else "")
               for k, ids in enumerate(groups)]
    replies = [*replies, grpc.aio.EOF][::-1]

    class Decode:
        def __init__(self) -> None:
            self.open: list[Call] = []

        def Decode(self, req: Any, timeout: float | None = None) -> Call:
            if req.sampling.max_tokens != n:
                raise RuntimeError(f"the relay bench's decode call asks {req.sampling.max_tokens} tokens, not {n}")
            call = Call(list(replies))
            self.open.append(call)
            return call

    decode = Decode()
    router = Router("bench", watch_loads=False, node_calls="call")
    for i, (role, stub) in enumerate((("prefill", Prefill()), ("decode", decode))):
        router.on_membership(f"{role}-0", NodeRecord(f"{role}-0", role, f"127.0.0.1:{9000 + i}", "x:1", "bench",
                                                     tokens + 64))
        router._nodes[f"{role}-0"].stub = stub

    async def feed() -> None:
        while True:
            await asyncio.sleep(0)
            for call in decode.open:
                call.items.put_nowait(call.replies.pop())
            decode.open = [c for c in decode.open if c.replies]

    return router, feed


class _GrpcClient:  # the servicer context Generate uses: what it is sent
    def __init__(self) -> None:
        self.messages = 0
        self.tokens = 0

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> float:
        return 600.0

    async def write(self, msg: Any) -> None:
        self.messages += 1
        self.tokens += len(msg.token_ids)

    async def abort(self, code: Any, details: str, trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"the relay bench's request failed: {code}: {details}")


class _SseResponse:
    """Stands in for aiohttp's ``web.StreamResponse``: what is written goes to the request's
    client (``_HttpClient``), kept as it was sent."""

    def __init__(self, headers: Any = None) -> None:
        self.client: _HttpClient | None = None

    async def prepare(self, request: _HttpClient) -> None:
        self.client = request

    async def write(self, data: bytes) -> None:
        self.client.chunks.append(data)  # type: ignore[union-attr]

    async def write_eof(self) -> None:
        pass


class _HttpClient:
    """An aiohttp request to /v1/completions with ``stream: true`` as the handler reads it; the
    bytes its stream response was sent."""

    def __init__(self, tokens: int) -> None:
        self.body = {"prompt": [5, 6, 7], "max_tokens": tokens, "stream": True}
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []

    def __getitem__(self, key: str) -> str:
        if key != "tenant":
            raise KeyError(key)
        return ""

    async def json(self) -> Any:
        return self.body

    def events(self) -> list[dict[str, Any]]:
        """The SSE events sent, parsed (after the clock): the chunks before ``[DONE]``."""
        text = b"".join(self.chunks).decode()
        datas = [e[len("data: "):] for e in text.split("\n\n") if e]
        if not datas or datas[-1] != "[DONE]" or any(not d.startswith("{") for d in datas[:-1]):
            raise RuntimeError(f"the relay bench's SSE stream is not JSON chunks then [DONE]: {text[-200:]!r}")
        return [json.loads(d) for d in datas[:-1]]


def _expected_text(codec: Any, tokens: int, interval: int) -> str:
    """What a request's stream must add up to: the prefill's token, then the decode's."""
    return codec.tok.decode([FIRST_TOKEN] + [t for ids in _decode_ids(tokens, interval) for t in ids])


def time_relay(model: str, requests: int, tokens: int, interval: int, repeats: int,
               api: str = "grpc") -> dict[str, float]:
    """The fastest of ``repeats`` runs: CPU µs per client message, per token and per request,
    through the gRPC front end (``Generate``) or the HTTP one (/v1/completions, SSE)."""
    from unittest import mock

    from tandem.coordinator import http_api
    from tandem.coordinator.grpc_api import CoordinatorServicer
    from tandem.coordinator.pipeline import Pipeline
    from tandem.coordinator.textcodec import TextCodec
    from tandem.proto import tandem_pb2 as pb

    codec = TextCodec(model)
    want_text = _expected_text(codec, tokens, interval)

    async def once() -> dict[str, float]:
        router, feed = _fakes(tokens, interval)
        pipeline = Pipeline(router, codec, lambda: tokens + 64, "bench")
        if api == "grpc":
            servicer = CoordinatorServicer(pipeline, "bench")
            grpc_clients = [_GrpcClient() for _ in range(requests)]
            calls = [servicer.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                                          sampling=pb.SamplingParams(max_tokens=tokens)), c)
                     for c in grpc_clients]
        else:
            front = http_api.OpenAIHttp(pipeline)
            http_clients = [_HttpClient(tokens) for _ in range(requests)]
            calls = [front.completions(c) for c in http_clients]  # type: ignore[arg-type]
        feeder = asyncio.ensure_future(feed())
        t0 = time.thread_time()
        await asyncio.gather(*calls)
        cpu = time.thread_time() - t0
        feeder.cancel()
        await router.close()
        if api == "grpc":
            messages, sent = sum(c.messages for c in grpc_clients), sum(c.tokens for c in grpc_clients)
            if sent != requests * tokens:
                raise RuntimeError(f"the relay bench sent {sent} tokens, not {requests * tokens}")
        else:
            messages = 0
            for c in http_clients:
                events = c.events()
                text = "".join(e["choices"][0]["text"] for e in events)
                if text != want_text or events[-1]["choices"][0]["finish_reason"] != "length":
                    raise RuntimeError(f"the relay bench's SSE text is {text[:80]!r}..., finish "
                                       f"{events[-1]['choices'][0]['finish_reason']!r}: not the tokens' text, "
                                       f"{want_text[:80]!r}..., then 'length'")
                messages += len(events)
        return {"us_per_message": cpu / messages * 1e6, "us_per_token": cpu / (requests * tokens) * 1e6,
                "us_per_request": cpu / requests * 1e6, "messages": messages}

    import uvloop

    with mock.patch.object(http_api.web, "StreamResponse", _SseResponse):
        runs = [uvloop.run(once()) for _ in range(repeats)]
    return min(runs, key=lambda r: r["us_per_message"])


APIS = ("grpc", "http")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--intervals", default="1,16", help="--stream-interval values: tokens a decode message")
    ap.add_argument("--apis", default="grpc,http",
                    help="front ends: grpc (Generate), http (/v1/completions streamed as server-sent events)")
    ap.add_argument("--requests", type=int, default=64, help="requests relayed at once")
    ap.add_argument("--tokens", type=int, default=256, help="output tokens a request")
    ap.add_argument("--repeats", type=int, default=3, help="runs a point; the fastest counts")
    ap.add_argument("--model", default="", help="the tokenizer's model dir (default: the seeded tiny model)")
    ap.add_argument("--out", default="bench/results/relay")


def cmd_relay(args: argparse.Namespace) -> int:
    intervals = [int(i) for i in args.intervals.split(",") if i.strip()]
    apis = [a.strip() for a in args.apis.split(",") if a.strip()]
    if not intervals or min(intervals) < 1 or args.requests < 1 or args.tokens < 2 or args.repeats < 1:
        raise SystemExit("--intervals: token counts >= 1; --requests, --repeats >= 1; --tokens >= 2")
    if not apis or set(apis) - set(APIS):
        raise SystemExit(f"--apis: some of {', '.join(APIS)}, comma separated; got {args.apis!r}")
    if not args.model:
        from tandem.local.model import ensure_default_model

        args.model = str(ensure_default_model())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for interval in intervals:
        for api in apis:
            row = {"api": api, "interval": interval,
                   **time_relay(args.model, args.requests, args.tokens, interval, args.repeats, api)}
            rows.append(row)
            print(f"  {api}, interval {interval}: {row['us_per_message']:.1f} us a message, "
                  f"{row['us_per_token']:.2f} us a token, {row['us_per_request']:,.0f} us a request", flush=True)
    doc = {"requests": args.requests, "tokens": args.tokens, "repeats": args.repeats, "rows": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_report(out, doc)
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0


def write_report(out: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    intervals = sorted({r["interval"] for r in rows})
    apis = [a for a in APIS if any(r["api"] == a for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(apis)
    for k, api in enumerate(apis):
        by = {r["interval"]: r["us_per_message"] for r in rows if r["api"] == api}
        xs = [i + (k - (len(apis) - 1) / 2) * width for i in range(len(intervals))]
        ax.bar(xs, [by.get(i, 0.0) for i in intervals], width, label=api)
    ax.set_xticks(range(len(intervals)), [str(i) for i in intervals])
    ax.set_xlabel("tokens a decode message (--stream-interval)")
    ax.set_ylabel("coordinator CPU per client message, us")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "relay-cost.png", dpi=110)
    plt.close(fig)
    lines = ["# What relaying a message costs the coordinator's own code", "",
             f"{doc['requests']} requests of {doc['tokens']} tokens at once through the front end and the "
             "pipeline, in one process, no network (the client side and the nodes' stubs only keep and hand "
             f"over messages): the thread's CPU time, the fastest of {doc['repeats']} runs. The transport's own "
             "cost per message (grpc.aio's, aiohttp's) is not in it (`tandem bench coordinator` measures "
             "gRPC's beside). A gRPC message carries the finish with the last tokens; an HTTP stream sends "
             "it as one more event (and then `[DONE]`, not counted).", "",
             "| front end | tokens a message | messages | CPU a message | a token | a request |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['api']} | {r['interval']} | {r['messages']:,} | {r['us_per_message']:.1f} us | "
                     f"{r['us_per_token']:.2f} us | {r['us_per_request']:,.0f} us |")
    lines += ["", "![CPU per message](relay-cost.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
