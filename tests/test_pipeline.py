"""The coordinator's request pipeline against fake node stubs (no engines, no network)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from tandem.coordinator.pipeline import Pipeline
from tandem.coordinator.request import FinishEvent, TokenEvent
from tandem.coordinator.router import Router
from tandem.coordinator.textcodec import TextCodec
from tandem.membership import NodeRecord
from tandem.proto import tandem_pb2 as pb
from tandem.sampling import Sampling


class FakePrefill:
    """PrefillNode stub with knobs: the first token, a delay, whether the engine stopped on EOS."""

    def __init__(self, first: int = 100, delay_s: float = 0.0, finish: str = "length") -> None:
        self.first, self.delay_s, self.finish = first, delay_s, finish
        self.calls: list[pb.PrefillRequest] = []
        self.released: list[str] = []

    async def Prefill(self, req: pb.PrefillRequest, timeout: float | None = None) -> pb.PrefillResponse:
        self.calls.append(req)
        await asyncio.sleep(self.delay_s)
        resp = pb.PrefillResponse(first_token=self.first, finish_reason=self.finish)
        if req.hold_kv:
            resp.handle.CopyFrom(pb.KVHandle(remote_request_id=req.request_id, num_tokens=len(req.prompt_token_ids)))
        return resp

    async def Release(self, req: pb.ReleaseRequest, timeout: float | None = None) -> pb.ReleaseResponse:
        self.released.append(req.request_id)
        return pb.ReleaseResponse()


class FakeCall:
    """A Decode stream: read() returns one token message at a time, then grpc.aio.EOF."""

    def __init__(self, tokens: list[int], delay_s: float) -> None:
        self.tokens, self.delay_s, self.cancelled = tokens, delay_s, False
        self._i = 0

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    async def read(self):
        if self._i >= len(self.tokens):
            return grpc.aio.EOF
        await asyncio.sleep(self.delay_s)
        t, self._i = self.tokens[self._i], self._i + 1
        return pb.DecodeResponse(token_ids=[t], finish_reason="length" if self._i == len(self.tokens) else "")


class FakeDecode:
    def __init__(self, tokens: list[int], delay_s: float = 0.0) -> None:
        self.tokens, self.delay_s = tokens, delay_s
        self.calls: list[FakeCall] = []
        self.requests: list[pb.DecodeRequest] = []

    def Decode(self, req: pb.DecodeRequest, timeout: float | None = None) -> FakeCall:
        self.requests.append(req)
        call = FakeCall(self.tokens[: req.sampling.max_tokens], self.delay_s)
        self.calls.append(call)
        return call


def make(tiny_model: Path, prefill: FakePrefill, decodes: list[FakeDecode]) -> Pipeline:
    router = Router("tiny", watch_loads=False, node_calls="call")  # the fakes stand in for the stubs
    for i, stub in enumerate([prefill, *decodes]):
        role = "prefill" if i == 0 else "decode"
        node_id = f"{role}-{i}"
        router.on_membership(node_id, NodeRecord(node_id, role, f"127.0.0.1:{9000 + i}", "x:1", "tiny", 512))
        router._nodes[node_id].stub = stub
    return Pipeline(router, TextCodec(str(tiny_model)), lambda: 512, "tiny")


async def collect(p: Pipeline, sampling: Sampling, ids: list[int] | None = None) -> list:
    req = p.prepare(request_id="", text=None, token_ids=ids or [5, 6, 7], sampling=sampling)
    return [ev async for ev in p.run(req)]


def run_one(tiny_model: Path, prefill: FakePrefill, decodes: list[FakeDecode], sampling: Sampling) -> list:
    async def go() -> list:
        evs = await collect(make(tiny_model, prefill, decodes), sampling)
        await asyncio.sleep(0.05)  # background releases finish
        return evs

    return asyncio.run(go())


def test_concurrent_requests_spread_over_the_decode_pool(tiny_model: Path) -> None:
    decodes = [FakeDecode([101, 102, 103], delay_s=0.01), FakeDecode([101, 102, 103], delay_s=0.01)]
    pipelines: list[Pipeline] = []

    async def go() -> list[list]:
        pipelines.append(make(tiny_model, FakePrefill(delay_s=0.01), decodes))
        return await asyncio.gather(*[collect(pipelines[0], Sampling(max_tokens=4)) for _ in range(6)])

    results = asyncio.run(go())
    p = pipelines[0]
    assert [len(d.calls) for d in decodes] == [3, 3]
    for evs in results:
        assert [t for e in evs if isinstance(e, TokenEvent) for t in e.token_ids] == [100, 101, 102, 103]
        assert evs[-1].reason == "length" and evs[-1].completion_tokens == 4
    assert all(n.outstanding == 0 for n in p.router.nodes())


def test_first_token_comes_before_decode_and_max_tokens_one_skips_decode(tiny_model: Path) -> None:
    decode = FakeDecode([101])
    prefill = FakePrefill()
    evs = run_one(tiny_model, prefill, [decode], Sampling(max_tokens=1))
    assert isinstance(evs[0], TokenEvent) and evs[0].token_ids == [100]
    assert isinstance(evs[-1], FinishEvent) and evs[-1].reason == "length"
    assert not decode.calls and not prefill.calls[0].hold_kv


def test_eos_at_prefill_ends_the_request_and_releases_the_blocks(tiny_model: Path) -> None:
    decode = FakeDecode([101])
    prefill = FakePrefill(finish="stop")
    evs = run_one(tiny_model, prefill, [decode], Sampling(max_tokens=8))
    assert evs[-1].reason == "stop" and not decode.calls
    assert len(prefill.released) == 1


def test_stop_string_cuts_the_text_and_cancels_the_decode(tiny_model: Path) -> None:
    codec = TextCodec(str(tiny_model))
    words = codec.encode(" node cache block stream")
    decode = FakeDecode(words[1:] + [101, 102])
    evs = run_one(tiny_model, FakePrefill(first=words[0]), [decode], Sampling(max_tokens=20, stop=(" block",)))
    text = "".join(e.text for e in evs if isinstance(e, TokenEvent))
    assert text == " node cache"
    assert evs[-1].reason == "stop" and evs[-1].stop_reason == " block"
    assert decode.calls[0].cancelled


def test_cancel_during_decode_cancels_the_call_and_releases(tiny_model: Path) -> None:
    decode = FakeDecode(list(range(101, 200)), delay_s=0.05)
    prefill = FakePrefill()
    pipelines: list[Pipeline] = []
    rids: list[str] = []

    async def go() -> None:
        p = make(tiny_model, prefill, [decode])
        pipelines.append(p)
        req = p.prepare(request_id="c1", text=None, token_ids=[5, 6], sampling=Sampling(max_tokens=50))
        rids.append(req.request_id)
        gen = p.run(req)
        assert (await gen.__anext__()).token_ids == [100]
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gen.aclose()
        await asyncio.sleep(0.05)

    asyncio.run(go())
    assert decode.calls[0].cancelled
    assert prefill.released == [rids[0]] and rids[0] != "c1"  # the coordinator's own id, not the client's
    assert all(n.outstanding == 0 for n in pipelines[0].router.nodes())


def test_a_request_admission_sends_to_prefill_on_its_decode_node_skips_the_prefill_pool(tiny_model: Path) -> None:
    fits = [pb.PerfFit(name="prefill", terms=["const", "tokens", "tokens2"], coefficients=[0.01, 0.001, 0], samples=9),
            pb.PerfFit(name="decode", terms=["const", "batch", "context"], coefficients=[0.005, 0.001, 0], samples=9)]
    prefill, decode = FakePrefill(), FakeDecode([100, 101, 102, 103])

    async def go() -> tuple[list, Pipeline]:
        p = make(tiny_model, prefill, [decode])
        p.router._nodes["prefill-0"].saw_load(pb.NodeLoad(prefill_queue=[3000, 3000], fits=fits))  # ~6 s queued
        p.router._nodes["decode-1"].saw_load(pb.NodeLoad(fits=fits))
        return await collect(p, Sampling(max_tokens=4)), p

    evs, p = asyncio.run(go())
    assert [t for e in evs if isinstance(e, TokenEvent) for t in e.token_ids] == [100, 101, 102, 103]
    fin = evs[-1]
    assert fin.reason == "length" and fin.local_prefill and fin.prefill_node == fin.decode_node == "decode-1"
    assert fin.predicted_ttft_s == pytest.approx(0.013)  # 3 prompt tokens on an idle decode node
    assert not prefill.calls and not prefill.released
    (req,) = decode.requests
    assert req.prefill_here and not req.HasField("handle") and list(req.prompt_token_ids) == [5, 6, 7]
    assert req.sampling.max_tokens == 4  # the first token comes from this stream too
    node = p.router._nodes["decode-1"]
    assert node.outstanding == 0 and not node.prefilling and not node.inflight


def test_every_request_that_ends_counts_once_against_its_objectives(tiny_model: Path) -> None:
    """tandem_requests_slo_total: served and met (yes), served late (no), no objective (none), and a
    client that gave up after its TTFT objective had passed without a token (no)."""
    from prometheus_client import REGISTRY

    from tandem.coordinator.admission import Slo

    def counts() -> dict[str, float]:
        return {met: REGISTRY.get_sample_value("tandem_requests_slo_total", {"met": met}) or 0.0
                for met in ("yes", "no", "none")}

    async def one(p: Pipeline, slo: Slo) -> None:
        req = p.prepare(request_id="", text=None, token_ids=[5, 6], sampling=Sampling(max_tokens=3), slo=slo)
        [ev async for ev in p.run(req)]

    async def gives_up(p: Pipeline, slo: Slo) -> None:
        req = p.prepare(request_id="", text=None, token_ids=[5, 6], sampling=Sampling(max_tokens=3), slo=slo)
        gen = p.run(req)
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.1)  # past its 50 ms objective, before the prefill's 0.3 s
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gen.aclose()

    async def go() -> None:
        fast = make(tiny_model, FakePrefill(), [FakeDecode([101, 102])])
        slow = make(tiny_model, FakePrefill(delay_s=0.3), [FakeDecode([101, 102])])
        before = counts()
        await one(fast, Slo(ttft_s=5.0, tpot_s=5.0))
        await one(slow, Slo(ttft_s=0.05))
        await one(fast, Slo())
        await gives_up(slow, Slo(ttft_s=0.05))
        await gives_up(slow, Slo())  # no objective to miss: the client's choice, not counted
        after = counts()
        assert {k: after[k] - before[k] for k in after} == {"yes": 1, "no": 2, "none": 1}

    asyncio.run(go())


class FakeContext:
    """The grpc.aio servicer context Generate uses: the messages it writes."""

    def __init__(self) -> None:
        self.written: list[pb.GenerateResponse] = []

    def invocation_metadata(self):
        return ()

    def time_remaining(self) -> float:
        return 60.0

    async def write(self, msg: pb.GenerateResponse) -> None:
        self.written.append(msg)

    async def abort(self, code, details, trailing_metadata=()):
        raise AssertionError(f"aborted {code}: {details}")


def generate_messages(tiny_model: Path, prefill: FakePrefill, decodes: list[FakeDecode],
                      sampling: pb.SamplingParams) -> list[pb.GenerateResponse]:
    from tandem.coordinator.grpc_api import CoordinatorServicer

    async def go() -> list[pb.GenerateResponse]:
        ctx = FakeContext()
        servicer = CoordinatorServicer(make(tiny_model, prefill, decodes), "test")
        await servicer.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=sampling), ctx)
        await asyncio.sleep(0.05)
        return ctx.written

    return asyncio.run(go())


def test_the_last_tokens_go_with_the_finish_in_one_message(tiny_model: Path) -> None:
    msgs = generate_messages(tiny_model, FakePrefill(), [FakeDecode([101, 102, 103])],
                             pb.SamplingParams(max_tokens=4))
    # The first token alone (the TTFT), one message per decode message, the last one with the finish.
    assert [list(m.token_ids) for m in msgs] == [[100], [101], [102], [103]]
    assert [m.HasField("finish") for m in msgs] == [False, False, False, True]
    assert msgs[-1].finish.reason == "length" and msgs[-1].finish.usage.completion_tokens == 4
    # A request of one token: that token and its finish, one message.
    (only,) = generate_messages(tiny_model, FakePrefill(), [FakeDecode([101])], pb.SamplingParams(max_tokens=1))
    assert list(only.token_ids) == [100] and only.finish.reason == "length"


def test_a_stop_strings_held_back_text_goes_with_the_finish(tiny_model: Path) -> None:
    codec = TextCodec(str(tiny_model))
    words = codec.encode(" node cache block stream")
    # " blo" could begin the stop string " block!" until the stream ends without it: held back, then
    # flushed with the finish.
    msgs = generate_messages(tiny_model, FakePrefill(first=words[0]), [FakeDecode(words[1:3])],
                             pb.SamplingParams(max_tokens=3, stop=[" block!"]))
    assert "".join(m.text for m in msgs) == " node cache block"
    # its token, the text held back until the end (flushed after it) and the finish: one message
    assert len(msgs) == 3 and list(msgs[-1].token_ids) == words[2:3] and msgs[-1].text.endswith(" block")
    assert msgs[-1].finish.reason == "length" and not any(m.HasField("finish") for m in msgs[:-1])
    assert [t for m in msgs for t in m.token_ids] == words[:3]


class FailingAfterFinish(FakeCall):
    """A Decode stream whose close fails after its last message (the finish) came."""

    async def read(self):
        if self._i >= len(self.tokens):
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "connection reset")
        return await super().read()


class FailingDecode(FakeDecode):
    def Decode(self, req: pb.DecodeRequest, timeout: float | None = None) -> FakeCall:
        self.requests.append(req)
        call = FailingAfterFinish(self.tokens[: req.sampling.max_tokens], self.delay_s)
        self.calls.append(call)
        return call


def test_a_stream_that_fails_after_its_finish_ends_the_request_as_finished(tiny_model: Path) -> None:
    decode, other = FailingDecode([101, 102, 103]), FakeDecode([201, 202, 203])
    msgs = generate_messages(tiny_model, FakePrefill(), [decode, other], pb.SamplingParams(max_tokens=4))
    # Every token once, the last ones with the finish; not migrated to the other decode node.
    assert [t for m in msgs for t in m.token_ids] == [100, 101, 102, 103]
    assert msgs[-1].finish.reason == "length" and msgs[-1].finish.migrations == 0
    assert len(decode.calls) == 1 and not other.calls


def test_a_running_stream_tells_admission_what_is_left_of_its_tpot_objective(tiny_model: Path) -> None:
    from tandem.coordinator.admission import Slo

    async def go() -> list[tuple[float, int] | None]:
        p = make(tiny_model, FakePrefill(), [FakeDecode([101, 102, 103, 104, 105], delay_s=0.02)])
        node = p.router._nodes["decode-1"]
        seen: list[tuple[float, int] | None] = []
        req = p.prepare(request_id="", text=None, token_ids=[5, 6, 7], sampling=Sampling(max_tokens=6),
                        slo=Slo(tpot_s=0.1))
        async for ev in p.run(req):
            if isinstance(ev, TokenEvent):
                (budget,) = node.budgets.values()
                seen.append(budget(time.perf_counter()))
        assert not node.budgets  # gone with the request
        # Without a TPOT objective: nothing to protect.
        req = p.prepare(request_id="", text=None, token_ids=[5, 6, 7], sampling=Sampling(max_tokens=6))
        async for ev in p.run(req):
            assert not node.budgets
        return seen

    seen = asyncio.run(go())
    # After k of 6 tokens: 6 - k tokens left, and 5 x 0.1 s less the time since the first token.
    assert [s[1] for s in seen[:-1]] == [5, 4, 3, 2, 1]  # type: ignore[index]
    secs = [s[0] for s in seen[:-1]]  # type: ignore[index]
    assert secs[0] == pytest.approx(0.5, abs=0.01) and all(a > b for a, b in zip(secs, secs[1:]))
    assert 0.5 - secs[-1] == pytest.approx(4 * 0.02, abs=0.03)
    assert seen[-1] is None  # its last token: nothing left to make


def test_a_reserved_decode_node_counts_the_prompt_as_coming_until_its_first_token(tiny_model: Path) -> None:
    async def go() -> dict[str, int]:
        seen: dict[str, int] = {}

        class Watching(FakePrefill):
            async def Prefill(self, req: pb.PrefillRequest, timeout: float | None = None) -> pb.PrefillResponse:
                seen["prefilling"] = node.awaiting.total
                return await super().Prefill(req, timeout)

        class WatchingDecode(FakeDecode):
            def Decode(self, req: pb.DecodeRequest, timeout: float | None = None) -> FakeCall:
                seen["fetching"] = node.awaiting.total
                return super().Decode(req, timeout)

        p = make(tiny_model, Watching(), [WatchingDecode([101, 102, 103])])
        node = p.router._nodes["decode-1"]
        req = p.prepare(request_id="", text=None, token_ids=[5, 6, 7], sampling=Sampling(max_tokens=4))
        tokens = 0
        async for ev in p.run(req):
            if isinstance(ev, TokenEvent):
                tokens += 1
                if tokens == 2:  # its first token from the decode node
                    seen["decoding"] = node.awaiting.total
        seen["ended"] = len(node.awaiting)
        # A request cancelled while a prefill node computes it leaves nothing counted.
        p2 = make(tiny_model, FakePrefill(delay_s=5.0), [FakeDecode([101, 102])])
        node2 = p2.router._nodes["decode-1"]
        task = asyncio.ensure_future(collect(p2, Sampling(max_tokens=3)))
        await asyncio.sleep(0.1)
        seen["cancel_prefilling"] = node2.awaiting.total
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen["cancelled"] = len(node2.awaiting)
        return seen

    seen = asyncio.run(go())
    assert seen == {"prefilling": 3, "fetching": 3, "decoding": 0, "ended": 0, "cancel_prefilling": 3,
                    "cancelled": 0}


@pytest.mark.parametrize("mode", ["one process", "multiprocess"])
def test_observe_many_and_add_record_what_as_many_observations_and_inc_would(mode: str, tmp_path, monkeypatch) -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram, values
    from prometheus_client.multiprocess import MultiProcessCollector

    from tandem.coordinator.metrics import add, observe_many

    reg = CollectorRegistry()
    if mode == "multiprocess":  # as under --workers (PROMETHEUS_MULTIPROC_DIR): values in mmapped files
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    one = Histogram("one_by_one", "", buckets=(0.01, 0.1, 1.0), registry=None if mode == "multiprocess" else reg)
    many = Histogram("at_once", "", buckets=(0.01, 0.1, 1.0), registry=None if mode == "multiprocess" else reg)
    if mode == "multiprocess":
        MultiProcessCollector(reg, path=str(tmp_path))
    for value, n in ((0.005, 3), (0.05, 16), (5.0, 2), (0.1, 1)):
        for _ in range(n):
            one.observe(value)
        observe_many(many, value, n)

    def samples(name: str) -> list[tuple[str, dict, float]]:
        return sorted((s.name.replace(name, ""), sorted(s.labels.items()), s.value) for f in reg.collect()
                      if f.name == name for s in f.samples if not s.name.endswith("_created"))

    a, b = samples("one_by_one"), samples("at_once")
    assert a and [(k, lab) for k, lab, _ in a] == [(k, lab) for k, lab, _ in b]
    assert [v for _, _, v in a] == pytest.approx([v for _, _, v in b])  # (the sum: one product, not n adds)
    assert dict((k, v) for k, lab, v in b if k == "_count")["_count"] == 22
    assert dict((k, v) for k, lab, v in b if k == "_bucket" and lab == [("le", "0.1")])["_bucket"] == 20
    # And a counter's: add() as inc().
    counted = Counter("counted", "", ["model"], registry=None if mode == "multiprocess" else reg).labels("m")
    for n in (1, 16, 3):
        add(counted, n)
    assert [s.value for f in reg.collect() if f.name == "counted" for s in f.samples
            if s.name == "counted_total"] == [20]
