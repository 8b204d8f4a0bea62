"""Request lifecycle in the coordinator against fake nodes: migration, stalls, retries, deadlines, identity.

The fakes are a "counting model": the token after a context of n tokens is 1000 + n, for prefill
and decode alike, so an undisturbed request's output is known exactly and a migrated stream can be
checked for missing or duplicated tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tandem.coordinator.pipeline import Pipeline
from tandem.coordinator.request import FinishEvent, PipelineConfig, TokenEvent
from tandem.coordinator.router import Router
from tandem.coordinator.textcodec import TextCodec
from tandem.errors import DeadlineExceeded, NodeFailed, TandemError
from tandem.grpcserve import start_grpc
from tandem.node.calls import add_calls_servicer
from tandem.membership import NodeRecord
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.sampling import Sampling

PROMPT = [5, 6, 7]
OnRead = Callable[["Stream", pb.DecodeResponse], Awaitable[None]]
ROUTERS: list[Router] = []


def undisturbed(n: int, prompt_len: int = len(PROMPT)) -> list[int]:
    return [1000 + prompt_len + i for i in range(n)]


def rpc_error(code: grpc.StatusCode, details: str = "fake") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class Prefill:
    """PrefillNode stub; ``error``: fail every call with this status."""

    def __init__(self, error: grpc.StatusCode | None = None) -> None:
        self.error = error
        self.calls: list[pb.PrefillRequest] = []
        self.released: list[str] = []

    async def Prefill(self, req: pb.PrefillRequest, timeout: float | None = None) -> pb.PrefillResponse:
        self.calls.append(req)
        await asyncio.sleep(0)
        if self.error is not None:
            raise rpc_error(self.error)
        resp = pb.PrefillResponse(first_token=1000 + len(req.prompt_token_ids), finish_reason="length")
        if req.hold_kv:
            resp.handle.CopyFrom(pb.KVHandle(remote_request_id=req.request_id, num_tokens=len(req.prompt_token_ids)))
        return resp

    async def Release(self, req: pb.ReleaseRequest, timeout: float | None = None) -> pb.ReleaseResponse:
        self.released.append(req.handle.remote_request_id)
        return pb.ReleaseResponse()


class Stream:
    """One Decode stream of the counting model; after ``fail_after`` tokens it fails as told:
    ``error`` (a status), ``stall`` (never answers again) or ``end`` (ends without a finish)."""

    def __init__(self, req: pb.DecodeRequest, fail_after: int | None, mode: str,
                 code: grpc.StatusCode, on_read: OnRead | None = None) -> None:
        self.req, self.fail_after, self.mode, self.code, self.on_read = req, fail_after, mode, code, on_read
        self.n = len(req.prompt_token_ids)
        self.left = req.sampling.max_tokens
        self.sent = 0
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    async def read(self) -> pb.DecodeResponse:
        await asyncio.sleep(0.001)
        if self.fail_after is not None and self.sent >= self.fail_after:
            if self.mode == "stall":
                await asyncio.Event().wait()
            if self.mode == "end":
                return grpc.aio.EOF
            raise rpc_error(self.code)
        if self.sent >= self.left:
            return grpc.aio.EOF
        tok = 1000 + self.n + self.sent
        self.sent += 1
        msg = pb.DecodeResponse(token_ids=[tok], finish_reason="length" if self.sent == self.left else "")
        if self.on_read is not None:
            await self.on_read(self, msg)
        return msg


class Decode:
    """``on_read(stream, msg)`` runs before each token goes out: it may delay it or change it."""

    def __init__(self, fail_after: int | None = None, mode: str = "error",
                 code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, on_read: OnRead | None = None) -> None:
        self.fail_after, self.mode, self.code, self.on_read = fail_after, mode, code, on_read
        self.calls: list[Stream] = []

    def Decode(self, req: pb.DecodeRequest, timeout: float | None = None) -> Stream:
        call = Stream(req, self.fail_after, self.mode, self.code, self.on_read)
        self.calls.append(call)
        return call


class Health:
    def __init__(self, serving: bool) -> None:
        self.serving = serving

    async def Check(self, req: object, timeout: float | None = None) -> health_pb2.HealthCheckResponse:
        if not self.serving:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def make(tiny_model: Path, prefills: list[Prefill], decodes: list[Decode], healthy: dict[str, bool] | None = None,
         **cfg: float) -> Pipeline:
    router = Router("tiny", pool_wait_s=1.0, watch_loads=False, node_calls="call")  # the fakes stand in for the stubs
    ROUTERS.append(router)
    nodes = [("prefill", i, s) for i, s in enumerate(prefills)] + [("decode", i, s) for i, s in enumerate(decodes)]
    for port, (role, i, stub) in enumerate(nodes, start=9100):
        node_id = f"{role}-{i}"
        router.on_membership(node_id, NodeRecord(node_id, role, f"127.0.0.1:{port}", "x:1", "tiny", 512))
        router._nodes[node_id].stub = stub
        router._nodes[node_id].health = Health((healthy or {}).get(node_id, False))
    return Pipeline(router, TextCodec(str(tiny_model)), lambda: 512, "tiny", PipelineConfig(**cfg))


async def collect(p: Pipeline, max_tokens: int, request_id: str = "") -> list:
    req = p.prepare(request_id=request_id, text=None, token_ids=PROMPT, sampling=Sampling(max_tokens=max_tokens))
    return [ev async for ev in p.run(req)]


def tokens(evs: list) -> list[int]:
    return [t for e in evs if isinstance(e, TokenEvent) for t in e.token_ids]


@pytest.fixture(autouse=True)
def loop():
    """One event loop per test, current from the start (the router's gRPC channels need one)."""
    lp = asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    for router in ROUTERS:
        lp.run_until_complete(router.close())
    ROUTERS.clear()
    lp.close()
    asyncio.set_event_loop(None)


def run(coro_fn):
    async def go():
        out = await coro_fn()
        await asyncio.sleep(0.05)  # background releases finish
        return out

    return asyncio.get_event_loop().run_until_complete(go())


@pytest.mark.parametrize("mode", ["error", "stall", "end"])
def test_a_decode_node_that_fails_mid_stream_is_migrated_without_gaps_or_duplicates(tiny_model: Path,
                                                                                   mode: str) -> None:
    prefill, bad, good = Prefill(), Decode(fail_after=5, mode=mode), Decode()
    p = make(tiny_model, [prefill], [bad, good], stall_s=0.2)
    bad_node = p.router._nodes["decode-0"]
    bad_node.outstanding = -1  # make the router pick it first
    evs = run(lambda: collect(p, 20))
    assert tokens(evs) == undisturbed(20)
    fin = evs[-1]
    assert isinstance(fin, FinishEvent) and fin.reason == "length" and fin.completion_tokens == 20
    assert fin.migrations == 1 and fin.decode_node == "decode-1"
    # The second leg prefilled the prompt plus the 6 tokens already sent (1 from prefill, 5 decoded).
    assert list(prefill.calls[1].prompt_token_ids) == PROMPT + undisturbed(6)
    assert list(good.calls[0].req.prompt_token_ids) == PROMPT + undisturbed(7)
    assert good.calls[0].req.sampling.max_tokens == 20 - 7
    assert not bad_node.up  # out of routing at once, not when its etcd lease runs out
    assert bad.calls[0].cancelled
    # Nothing held is left behind: the failed leg's handle is released, the completed one was fetched.
    assert prefill.released == [prefill.calls[0].request_id]


def test_a_slow_decode_node_that_answers_its_health_probe_is_waited_on(tiny_model: Path) -> None:
    async def slowly(call: Stream, msg: pb.DecodeResponse) -> None:
        await asyncio.sleep(0.3)  # longer than stall_s: the watchdog probes, the node answers

    slow = Decode(on_read=slowly)
    p = make(tiny_model, [Prefill()], [slow], healthy={"decode-0": True}, stall_s=0.1)
    evs = run(lambda: collect(p, 4))
    assert tokens(evs) == undisturbed(4) and evs[-1].migrations == 0
    assert p.router._nodes["decode-0"].up


def test_the_stall_watch_probes_a_wait_of_stall_s_only() -> None:
    """One timer a call, not one a message: messages closer together than stall_s never probe,
    however long the stream runs, nor does a consumer busy elsewhere while they queue up; a wait
    of stall_s for the next one probes, and each stall_s more probes again; closing the stream
    cancels the call."""
    from tandem.coordinator.nodecalls import Watchdog

    class Checks:
        probes = 0

        async def check(self, node: object) -> bool:
            Checks.probes += 1
            return True

    class Call:
        def __init__(self) -> None:
            self.items: asyncio.Queue[object] = asyncio.Queue()
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    async def go() -> tuple[list[tuple[object, int]], Call]:
        call, seen = Call(), []

        async def feed() -> None:
            for i in range(8):  # 0.4 s of messages 0.05 s apart
                await asyncio.sleep(0.05)
                call.items.put_nowait(i)
            await asyncio.sleep(0.5)  # a wait: probed at 0.2 s, and again at 0.4 s (the timer set again)
            call.items.put_nowait(8)
            call.items.put_nowait(grpc.aio.EOF)

        feeder = asyncio.ensure_future(feed())
        async for item in Watchdog(Checks(), stall_s=0.2).stream(call, object()):  # type: ignore[arg-type]
            seen.append((item, Checks.probes))
            if item == 1:
                await asyncio.sleep(0.25)  # busy elsewhere (a slow client) while messages queue: no wait
        await feeder
        return seen, call

    import uvloop

    for run in (asyncio.run, uvloop.run):  # (uvloop's clock moves in whole milliseconds)
        Checks.probes = 0
        seen, call = run(go())
        assert [item for item, _ in seen] == list(range(9))
        assert all(probes == 0 for _, probes in seen[:8]) and seen[8][1] >= 2
        assert call.cancelled


def test_the_stall_timer_fires_a_tick_early_and_never_sets_itself_for_a_time_past() -> None:
    from tandem.coordinator.nodecalls import _TICK_S, _stall_due

    assert _stall_due(5.0, None, 0.2, True) == pytest.approx(5.2)  # no wait running: stall_s on
    assert _stall_due(5.1, 5.0, 0.2, True) == pytest.approx(5.2)  # a wait running: when it reaches stall_s
    assert _stall_due(5.2, 5.0, 0.2, True) is None  # it has: probe
    assert _stall_due(5.2 - _TICK_S / 2, 5.0, 0.2, True) is None  # a clock that moves in ticks fired it early
    # A message already in the queue ends the wait this turn: no probe, and the next look is a tick
    # on, not at the due time already past (which would fire again at once, and again).
    assert _stall_due(5.25, 5.0, 0.2, False) == pytest.approx(5.25 + _TICK_S)


@pytest.mark.parametrize("held, stop, text, reason", [("ab", (), "ab", "length"),
                                                    ("xSTOPy", ("STOP",), "x", "stop")])
def test_what_the_detokenizer_held_at_the_end_is_sent_and_a_stop_string_in_it_still_stops(
        tiny_model: Path, held: str, stop: tuple[str, ...], text: str, reason: str) -> None:
    """An output that ends inside a character: its text held for it comes out at the finish (through
    the stop matcher: a stop string there ends it as one found earlier would)."""
    class Held:  # holds every token's text until the end
        def __init__(self) -> None:
            self.ids: list[int] = []

        def add(self, ids: list[int]) -> str:
            self.ids.extend(ids)
            return ""

        def flush(self) -> str:
            return held

    p = make(tiny_model, [Prefill()], [Decode()])
    p.codec.detokenizer = Held  # type: ignore[method-assign]

    async def go() -> list:
        req = p.prepare(request_id="", text=None, token_ids=PROMPT, sampling=Sampling(max_tokens=4, stop=stop))
        return [ev async for ev in p.run(req)]

    evs = run(go)
    assert tokens(evs) == undisturbed(4) and "".join(e.text for e in evs if isinstance(e, TokenEvent)) == text
    assert evs[-2].token_ids == [] and evs[-2].last  # the held text: its own last event, before the finish
    fin = evs[-1]
    assert (fin.reason, fin.stop_reason, fin.completion_tokens) == (reason, "STOP" if stop else "", 4)


def test_kv_unavailable_migrates_but_keeps_the_node_in_routing(tiny_model: Path) -> None:
    flaky = Decode(fail_after=0, code=grpc.StatusCode.ABORTED)
    p = make(tiny_model, [Prefill()], [flaky, Decode()])
    p.router._nodes["decode-0"].outstanding = -1
    evs = run(lambda: collect(p, 8))
    assert tokens(evs) == undisturbed(8) and evs[-1].migrations == 1
    assert p.router._nodes["decode-0"].up


def test_after_kv_unavailable_the_next_leg_prefills_on_another_node(tiny_model: Path) -> None:
    # The KV path from prefill-0 is cut: its handle's fetch fails (ABORTED) on the decode side.
    # Both prefill nodes are equally loaded, and prefill-0 would win the tie again.
    first, second = Prefill(), Prefill()
    p = make(tiny_model, [first, second], [Decode(fail_after=0, code=grpc.StatusCode.ABORTED), Decode()])
    p.router._nodes["decode-0"].outstanding = -1
    p.router._nodes["prefill-1"].served = 1
    evs = run(lambda: collect(p, 8))
    assert tokens(evs) == undisturbed(8) and evs[-1].migrations == 1
    assert len(first.calls) == 1 and len(second.calls) == 1
    assert p.router._nodes["prefill-0"].up  # a KV failure does not take the node out of routing


def test_migration_stops_at_the_limit_with_a_clear_status(tiny_model: Path) -> None:
    prefill = Prefill()
    decodes = [Decode(fail_after=1), Decode(fail_after=1)]
    p = make(tiny_model, [prefill], decodes, migration_limit=1)
    with pytest.raises(NodeFailed, match="decode node decode-"):
        run(lambda: collect(p, 30))
    assert len(prefill.calls) == 2  # the first leg and one migration
    assert sorted(prefill.released) == sorted(c.request_id for c in prefill.calls)


def test_a_failed_prefill_is_retried_once_on_another_node(tiny_model: Path) -> None:
    dead, alive = Prefill(error=grpc.StatusCode.UNAVAILABLE), Prefill()
    p = make(tiny_model, [dead, alive], [Decode()])
    p.router._nodes["prefill-0"].outstanding = -1
    evs = run(lambda: collect(p, 6))
    assert tokens(evs) == undisturbed(6) and evs[-1].prefill_node == "prefill-1"
    assert len(dead.calls) == 1 and not p.router._nodes["prefill-0"].up


def test_bad_input_reported_by_a_node_is_not_retried(tiny_model: Path) -> None:
    bad = Prefill(error=grpc.StatusCode.INVALID_ARGUMENT)
    p = make(tiny_model, [bad, Prefill()], [Decode()])
    p.router._nodes["prefill-0"].outstanding = -1
    with pytest.raises(TandemError) as info:
        run(lambda: collect(p, 6))
    assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(bad.calls) == 1 and p.router._nodes["prefill-0"].up


def test_requests_get_their_own_ids_whatever_the_client_sent(tiny_model: Path) -> None:
    prefill = Prefill()
    p = make(tiny_model, [prefill], [Decode()])

    async def two() -> list[list]:
        return list(await asyncio.gather(collect(p, 3, "same"), collect(p, 3, "same")))

    run(two)
    ids = [c.request_id for c in prefill.calls]
    assert len(set(ids)) == 2 and not any(i.startswith("same") for i in ids)
    req = p.prepare(request_id="same", text=None, token_ids=PROMPT, sampling=Sampling(max_tokens=2))
    assert req.public_id == "same" and req.request_id != "same"


class HangingPrefill(pb_grpc.PrefillNodeServicer):
    """Accepts Prefill calls and never answers; its health service says SERVING throughout."""

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class HangingServe:
    """The same behind a NodeCalls stream (PrefillServicer.serve's place)."""

    async def serve(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.mark.parametrize("node_calls", ["stream", "call"])
def test_a_node_that_accepts_a_call_but_never_answers_ends_it_with_deadline_exceeded(tiny_model: Path,
                                                                                       node_calls: str) -> None:
    def add(s: grpc.aio.Server) -> None:
        pb_grpc.add_PrefillNodeServicer_to_server(HangingPrefill(), s)
        add_calls_servicer(s, prefill=HangingServe())  # type: ignore[arg-type]

    async def go() -> tuple[BaseException | None, float]:
        server = await start_grpc("127.0.0.1", 0, "tandem.v1.PrefillNode", add)
        router = Router("tiny", pool_wait_s=2.0, watch_loads=False, node_calls=node_calls)
        router.on_membership("prefill-0", NodeRecord("prefill-0", "prefill", f"127.0.0.1:{server.port}", "x:1",
                                                     "tiny", 512))
        p = Pipeline(router, TextCodec(str(tiny_model)), lambda: 512, "tiny",
                     PipelineConfig(prefill_timeout_s=0.6, stall_s=0.2))
        t0 = time.monotonic()
        err = None
        try:
            await collect(p, 1)
        except TandemError as exc:
            err = exc
        took = time.monotonic() - t0
        await router.close()
        await server.stop(0)
        return err, took

    err, took = asyncio.get_event_loop().run_until_complete(go())
    assert isinstance(err, DeadlineExceeded) and err.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "prefill node prefill-0" in str(err)
    assert took < 10  # one attempt of 0.6 s (a slow node is not retried elsewhere), not a hang


def test_a_call_cut_by_the_clients_own_deadline_blames_no_node(tiny_model: Path) -> None:
    slow = Prefill(error=grpc.StatusCode.DEADLINE_EXCEEDED)
    p = make(tiny_model, [slow, Prefill()], [Decode()])
    p.router._nodes["prefill-0"].outstanding = -1

    async def go() -> list:
        req = p.prepare(request_id="", text=None, token_ids=PROMPT, sampling=Sampling(max_tokens=4), timeout_s=0.0)
        return [ev async for ev in p.run(req)]

    with pytest.raises(DeadlineExceeded, match="client's deadline"):
        run(go)
    assert len(slow.calls) == 1  # not retried elsewhere
    assert p.router._nodes["prefill-0"].up


def test_an_engine_abort_on_the_decode_node_is_a_node_failure_and_migrates(tiny_model: Path) -> None:
    async def abort_third(call: Stream, msg: pb.DecodeResponse) -> None:
        if call.sent == 3:  # the engine shut down and aborted the request
            msg.finish_reason = "abort"

    p = make(tiny_model, [Prefill()], [Decode(on_read=abort_third), Decode()])
    p.router._nodes["decode-0"].outstanding = -1
    evs = run(lambda: collect(p, 10))
    assert tokens(evs) == undisturbed(10) and evs[-1].reason == "length" and evs[-1].migrations == 1
    assert not p.router._nodes["decode-0"].up


def test_a_prefill_answer_that_lands_after_a_cancel_releases_its_blocks(tiny_model: Path) -> None:
    class SlowHealth(Health):
        async def Check(self, req, timeout=None):
            await asyncio.sleep(0.3)  # the prefill answers while the watchdog waits on this probe
            return await super().Check(req, timeout)

    class SlowPrefill(Prefill):
        async def Prefill(self, req, timeout=None):
            await asyncio.sleep(0.05)
            return await super().Prefill(req, timeout)

    prefill = SlowPrefill()
    p = make(tiny_model, [prefill], [Decode()], stall_s=0.02)
    p.router._nodes["prefill-0"].health = SlowHealth(serving=True)

    async def go() -> None:
        task = asyncio.ensure_future(collect(p, 8))
        await asyncio.sleep(0.15)  # answered at ~0.05 s; the probe runs until ~0.32 s
        assert prefill.calls and not prefill.released
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go)
    assert prefill.released == [prefill.calls[0].request_id]


@pytest.mark.parametrize("change", ["left", "draining", "down"])
def test_a_decode_node_that_stops_being_routable_during_the_prefill_is_replaced(tiny_model: Path,
                                                                               change: str) -> None:
    # decode-0 is reserved for the leg before the prefill; while the prefill runs it leaves
    # etcd (a drain that finished), is marked draining, or is marked down.
    first, second = Decode(), Decode()

    class Changing(Prefill):
        async def Prefill(self, req, timeout=None):
            node = p.router._nodes["decode-0"]
            if change == "left":
                p.router.on_membership("decode-0", None)
            elif change == "draining":
                p.router.on_membership("decode-0", replace(node.record, draining=True))
            else:
                node.down_since = time.monotonic()
            return await super().Prefill(req, timeout)

    p = make(tiny_model, [Changing()], [first, second])
    p.router._nodes["decode-1"].outstanding = 1  # decode-0 wins the reservation
    evs = run(lambda: collect(p, 6))
    assert tokens(evs) == undisturbed(6) and evs[-1].migrations == 0
    assert not first.calls and len(second.calls) == 1


def test_a_seeded_request_migrates_with_its_seed_and_the_context_the_client_saw(tiny_model: Path) -> None:
    # With a seed, vLLM's output is a function of (context, sampling): the e2e seeded test shows a
    # leg (prefill token, then decode) equals a plain engine's output for its context. Here: the
    # second leg gets the same sampling, the prompt plus every token sent, and what is left to do.
    prefill, first, second = Prefill(), Decode(fail_after=3), Decode()
    p = make(tiny_model, [prefill], [first, second])
    p.router._nodes["decode-1"].outstanding = 1
    sampling = Sampling(max_tokens=10, temperature=0.9, top_p=0.8, seed=1234)
    req = p.prepare(request_id="", text=None, token_ids=PROMPT, sampling=sampling)
    evs = run(lambda: _collect(p, req))
    sent = tokens(evs)
    assert len(sent) == 10 and evs[-1].migrations == 1
    # leg 0: the prefill's token and 3 decoded ones reached the client before decode-0 failed
    leg1_prefill, leg1_decode = prefill.calls[1], second.calls[0].req
    assert list(leg1_prefill.prompt_token_ids) == [*PROMPT, *sent[:4]]
    assert list(leg1_decode.prompt_token_ids) == [*PROMPT, *sent[:5]]
    for s in (leg1_prefill.sampling, leg1_decode.sampling):
        assert (s.seed, round(s.temperature, 6), round(s.top_p, 6)) == (1234, 0.9, 0.8)
    assert leg1_decode.sampling.max_tokens == 10 - 5


async def _collect(p: Pipeline, req) -> list:
    return [ev async for ev in p.run(req)]


def test_with_no_prefill_pool_every_leg_prefills_on_its_decode_node(tiny_model: Path) -> None:
    """P:D 0:N: the decode nodes prefill what they decode, a migrated leg included."""
    bad, good = Decode(fail_after=5), Decode()
    p = make(tiny_model, [], [bad, good], stall_s=0.2)
    p.router._nodes["decode-0"].outstanding = -1  # make the router pick it first
    evs = run(lambda: collect(p, 20))
    assert tokens(evs) == undisturbed(20)
    fin = evs[-1]
    assert isinstance(fin, FinishEvent) and fin.reason == "length" and fin.migrations == 1
    assert fin.local_prefill and fin.decode_node == "decode-1"
    (first,), (second,) = bad.calls, good.calls
    assert first.req.prefill_here and list(first.req.prompt_token_ids) == PROMPT
    # The second leg prefills the prompt and the 5 tokens the client has, and streams the rest.
    assert second.req.prefill_here and list(second.req.prompt_token_ids) == PROMPT + undisturbed(5)
    assert second.req.sampling.max_tokens == 15 and not second.req.HasField("handle")
    # One token: the decode node's stream gives it.
    evs = run(lambda: collect(p, 1))
    assert tokens(evs) == undisturbed(1) and evs[-1].local_prefill
