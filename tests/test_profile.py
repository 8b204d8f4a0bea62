"""The startup profile: what it measures (on a fake engine with known timings) and its cache."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tandem.node.perf import NodePerf
from tandem.perfmodel import NodeModel
from tandem.profile import Profiler, cache_file, load_cached, profile_key, save, seed_from_profile


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Comp:
    token_ids: list[int]


@dataclass
class Out:
    outputs: list[Comp]
    num_cached_tokens: int | None = 0
    finished: bool = False


def prefill_time(n: int, cached: int = 0) -> float:
    return 0.02 + 1e-4 * n + 1e-8 * n * (n + 2 * cached)


@dataclass
class FakeEngine:
    """Prefill of n uncached tokens after h cached takes ``prefill_time`` of the fake clock (a
    prompt that extends the one before it finds that one's whole 16-token blocks cached); each
    request's decode tokens come one step apart (steps of 0.004 s)."""

    clock: Clock
    prompts: list[list[int]] = field(default_factory=list)

    async def generate(self, rid, prompt, sampling, kv):
        # The profile never holds or fetches KV, nor leaves its random prompts in the node's KV store.
        assert kv == {"tandem_no_store": True}
        before = self.prompts[-1] if self.prompts else []
        cached = len(before) // 16 * 16 if len(prompt) > len(before) and prompt[:len(before)] == before else 0
        self.prompts.append(prompt)
        self.clock.t += prefill_time(len(prompt) - cached, cached)
        for i in range(sampling.max_tokens):
            if i:
                await asyncio.sleep(0)
                self.clock.t += 0.004
            yield Out([Comp([7])], num_cached_tokens=cached, finished=i == sampling.max_tokens - 1)


def test_the_profile_fits_the_engines_prefill_time_and_gets_decode_samples() -> None:
    clock = Clock()
    perf = NodePerf(clock)
    engine = FakeEngine(clock)
    asyncio.run(Profiler(engine, perf, vocab_size=1000, max_model_len=600, max_num_seqs=8,
                         progress=lambda _: None).run())
    assert perf.model.prefill_s(400) == pytest.approx(prefill_time(400), rel=1e-3)
    # prefills after a cached prefix (256 + 32 fits this context): the new tokens' attention to it
    assert perf.model.prefill_s(32, 256) == pytest.approx(prefill_time(32, 256), rel=1e-3)
    assert perf.model.prefill_s(32, 256) > perf.model.prefill_s(32)
    assert perf.model.decode.samples > 20
    # Lengths past the context are left out; prompts never repeat (the prefix cache would hit)
    # but where a prompt is a prefix cached on purpose and the next one extends it.
    assert max(len(p) for p in engine.prompts) <= 600
    fresh = [p for k, p in enumerate(engine.prompts) if not (k and p[:len(engine.prompts[k - 1])] == engine.prompts[k - 1])]
    firsts = [tuple(p[:16]) for p in fresh]
    assert len(set(firsts)) == len(firsts) and len(fresh) < len(engine.prompts)
    assert all(5 <= t < 1000 for p in engine.prompts for t in p)


def test_the_cache_is_keyed_by_what_the_timings_depend_on(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    key = profile_key(str(model_dir), {"dtype": "float32", "block_size": 16}, cores=1)
    model = NodeModel()
    for n in (100, 200, 400, 800):
        model.saw_prefill(n, 0.01 + 1e-4 * n)
    path = cache_file(tmp_path / "cache", key)
    save(path, key, model, took_s=1.0)
    got = load_cached(path, key)
    assert got is not None and got.prefill_s(300) == pytest.approx(model.prefill_s(300))
    # Other settings, other cores, other model files: another file, and never this one's model.
    for other in (profile_key(str(model_dir), {"dtype": "float16", "block_size": 16}, cores=1),
                  profile_key(str(model_dir), {"dtype": "float32", "block_size": 16}, cores=2)):
        assert cache_file(tmp_path / "cache", other) != path
        assert load_cached(path, other) is None
    (model_dir / "model.safetensors").write_bytes(b"x")
    assert cache_file(tmp_path / "cache", profile_key(str(model_dir), {"dtype": "float32", "block_size": 16},
                                                      cores=1)) != path
    # A torn or foreign file is a miss, not a crash.
    path.write_text(json.dumps({"key": key, "model": {"prefill": "garbage"}}))
    assert load_cached(path, key) is None
    path.write_text("{not json")
    assert load_cached(path, key) is None


def test_auto_profiles_once_and_then_uses_the_cache(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    kw = dict(cache_dir=tmp_path / "cache", model_dir=str(model_dir), settings={"dtype": "float32"}, cores=1,
              vocab_size=1000, max_model_len=600, max_num_seqs=4)

    def start(mode: str) -> tuple[str, FakeEngine, NodePerf]:
        clock = Clock()
        perf, engine = NodePerf(clock), FakeEngine(clock)
        said = asyncio.run(seed_from_profile(perf, engine, mode=mode, **kw))
        return said, engine, perf

    said, engine, perf = start("auto")
    assert "profiled" in said and engine.prompts and perf.model.prefill.samples > 0
    said, engine, perf = start("auto")
    assert "cached profile" in said and not engine.prompts and perf.model.prefill.samples > 0
    said, engine, _ = start("fresh")
    assert "profiled" in said and engine.prompts
    said, engine, perf = start("off")
    assert not engine.prompts and perf.model.prefill.samples == 0
    with pytest.raises(ValueError):
        start("sometimes")


@dataclass
class Stats:  # what vLLM's RequestOutput.metrics carries: the engine's clock at its latest token
    last_token_ts: float
    num_generation_tokens: int


@dataclass
class StepOut(Out):
    metrics: Stats | None = None


class SteppingEngine:
    """An engine whose decode steps are shared by the streams live at the time: each step takes
    0.002 + 0.003 x (streams in it) seconds of its clock. It takes in at most 4 new streams a
    step (a prompt budget), so a run's streams start, and end, a few steps apart; a stream
    leaves the batch at its own last token. Outputs carry the engine's clock, as vLLM's stats do."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.waiting: dict[str, list] = {}
        self.live: dict[str, list] = {}  # rid -> [its queue, tokens to make, tokens made]
        self.loop: asyncio.Task | None = None
        self.need: dict[str, int] = {}  # rid -> its prompt and output tokens
        self.peak_tokens = self.peak_batch = 0  # the most KV the live streams needed at once, and streams

    async def _steps(self) -> None:
        await asyncio.sleep(0)  # the run's other streams arrive first
        while self.live or self.waiting:
            for rid in list(self.waiting)[:4]:
                self.live[rid] = self.waiting.pop(rid)
            self.peak_batch = max(self.peak_batch, len(self.live))
            self.peak_tokens = max(self.peak_tokens, sum(self.need[r] for r in self.live))
            self.clock.t += 0.002 + 0.003 * len(self.live)
            for rid, st in list(self.live.items()):
                st[2] += 1
                done = st[2] == st[1]
                st[0].put_nowait(StepOut([Comp([7])], 0, done, Stats(self.clock.t, st[2])))
                if done:
                    del self.live[rid]
            for _ in range(5):  # the streams read their outputs before the next step
                await asyncio.sleep(0)
        self.loop = None

    async def generate(self, rid, prompt, sampling, kv):
        q: asyncio.Queue = asyncio.Queue()
        self.waiting[rid] = [q, sampling.max_tokens, 0]
        self.need[rid] = len(prompt) + sampling.max_tokens
        if self.loop is None:
            self.loop = asyncio.get_running_loop().create_task(self._steps())
        while True:
            out = await q.get()
            yield out
            if out.finished:
                return


def test_a_decode_runs_streams_leave_its_batch_at_their_own_ends() -> None:
    """The fitted step is the engine's at every batch size: streams that finished first leave
    the batch then (version 1 kept them in it until the whole run ended, and read a batch's
    steps about 2x too cheap)."""
    clock = Clock()
    perf = NodePerf(clock)
    asyncio.run(Profiler(SteppingEngine(clock), perf, vocab_size=1000, max_model_len=600, max_num_seqs=64,
                         progress=lambda _: None).run())
    for batch in (1, 8, 32):
        assert perf.model.step_s(batch, batch * 100) == pytest.approx(0.002 + 0.003 * batch, rel=0.05)


def test_a_decode_run_takes_no_more_streams_than_the_engines_kv_cache_holds() -> None:
    """Past its KV cache vLLM preempts streams, and the prompts it recomputes would be timed as
    decode steps: a run's batch is capped by the engine's KV room (its prompts, steps and a
    block of slack each)."""
    clock = Clock()
    perf = NodePerf(clock)
    perf.kv_room = lambda: (2000, 2000, 0)
    engine = SteppingEngine(clock)
    asyncio.run(Profiler(engine, perf, vocab_size=1000, max_model_len=600, max_num_seqs=64,
                         progress=lambda _: None).run())
    assert 0 < engine.peak_tokens <= 2000 and 4 < engine.peak_batch < 32
    uncapped = SteppingEngine(clock)
    asyncio.run(Profiler(uncapped, NodePerf(clock), vocab_size=1000, max_model_len=600, max_num_seqs=64,
                         progress=lambda _: None).run())
    assert uncapped.peak_batch == 32 and uncapped.peak_tokens > 2000


def test_a_seeded_model_made_again_elsewhere_keeps_its_profile_and_another_seeded_shape_does_not(tmp_path: Path) -> None:
    import os

    from tandem.local.model import GENERATOR

    def seeded(name: str, layers: int, mtime: int) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "tandem_model.json").write_text(json.dumps({"generator": GENERATOR, "seed": 0,
                                                         "spec": {"num_hidden_layers": layers}}))
        (d / "model.safetensors").write_bytes(b"w" * 64)
        for f in d.iterdir():
            os.utime(f, ns=(mtime, mtime))
        return str(d)

    settings = {"dtype": "float32", "block_size": 16}
    one, again = seeded("a", 8, 10**18), seeded("b", 8, 2 * 10**18)  # made twice, at different times, elsewhere
    assert profile_key(one, settings, 1) == profile_key(again, settings, 1)
    assert profile_key(seeded("c", 4, 10**18), settings, 1) != profile_key(one, settings, 1)  # another shape
    (Path(again) / "model.safetensors").write_bytes(b"w" * 65)  # a file of another size: not the same model
    assert profile_key(again, settings, 1) != profile_key(one, settings, 1)
    # a model of anyone else's (no generator named) is still told by its files' change times too
    plain = [seeded(n, 8, t) for n, t in (("d", 10**18), ("e", 2 * 10**18))]
    for d in plain:
        (Path(d) / "tandem_model.json").write_text("{}")
        os.utime(Path(d) / "tandem_model.json", ns=(10**18, 10**18))
    assert profile_key(plain[0], settings, 1) != profile_key(plain[1], settings, 1)
