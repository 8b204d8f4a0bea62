"""The node's own performance samples: which timings count, with a fake clock."""

from __future__ import annotations

import pytest

from tandem.node.perf import NodePerf


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_prefill_that_ran_alone_is_a_sample_and_overlapping_ones_are_not() -> None:
    clock = Clock()
    perf = NodePerf(clock)
    with perf.prefill() as run:
        clock.t += 0.25
        run.uncached_tokens = 500
    assert perf.model.prefill.samples == 1
    # Two overlapping prefills share the engine's steps: neither is a sample.
    a = perf.prefill()
    ra = a.__enter__()
    b = perf.prefill()
    rb = b.__enter__()
    clock.t += 0.5
    ra.uncached_tokens = rb.uncached_tokens = 300
    b.__exit__(None, None, None)
    a.__exit__(None, None, None)
    assert perf.model.prefill.samples == 1
    # One that failed, or whose cached count is unknown, is not either.
    with pytest.raises(RuntimeError):
        with perf.prefill() as run:
            run.uncached_tokens = 100
            raise RuntimeError("engine said no")
    with perf.prefill():
        clock.t += 0.1
    assert perf.model.prefill.samples == 1


def test_prefill_samples_fit_the_prefill_time() -> None:
    clock = Clock()
    perf = NodePerf(clock)
    for n in range(50, 2000, 75):
        with perf.prefill() as run:
            clock.t += 0.01 + 2e-4 * n
            run.uncached_tokens = n
    assert perf.model.prefill_s(1000) == pytest.approx(0.01 + 2e-4 * 1000, rel=1e-6)


def _feed_prefills_after_prefixes(clock: Clock, perf: NodePerf):  # type: ignore[no-untyped-def]
    """Prefills of n new tokens after h cached, each alone, timed exactly by the returned ``took(n, h)``."""
    took = lambda n, h: 0.01 + 2e-4 * n + 1e-7 * n * (n + 2 * h)  # noqa: E731
    for n, h in [(n, h) for n in range(50, 1000, 90) for h in (0, 512, 1536)]:
        with perf.prefill(n + h) as run:
            clock.t += took(n, h)
            run.uncached_tokens = n
    return took


def test_a_prefill_after_a_cached_prefix_is_a_sample_of_its_new_tokens_after_it() -> None:
    # A prompt of ``tokens`` the engine found ``tokens - uncached`` of cached: the sample is the
    # uncached tokens after that many (their attention to the cached ones costs)
    clock = Clock()
    perf = NodePerf(clock)
    took = _feed_prefills_after_prefixes(clock, perf)
    assert perf.model.prefill_s(100, 1000) == pytest.approx(took(100, 1000), rel=1e-6)
    assert perf.model.prefill_s(100) == pytest.approx(took(100, 0), rel=1e-6)


def test_decode_gaps_are_steps_of_the_batch_running_then() -> None:
    clock = Clock()
    perf = NodePerf(clock)
    step = lambda batch, ctx: 0.005 + 0.001 * batch + 1e-6 * ctx  # noqa: E731
    perf.decode_started("a", 100)
    perf.decode_output("a", 1)  # its first token: no gap yet
    for _ in range(3):
        clock.t += step(1, 101)
        perf.decode_output("a", 1)
    assert perf.model.decode.samples == 3
    perf.decode_started("b", 1000)  # waiting for its KV: not in the batch yet
    clock.t += step(1, 104)
    perf.decode_output("a", 1)
    assert perf.model.decode.samples == 4
    perf.decode_output("b", 1)  # b joins: the batch is now 2 streams, 105 + 1001 context tokens
    for _ in range(40):  # each step gives both streams a token
        clock.t += step(2, perf._batch_context)
        perf.decode_output("a", 1)
        perf.decode_output("b", 1)
    perf.decode_ended("b")
    for _ in range(40):
        clock.t += step(1, perf._batch_context)
        perf.decode_output("a", 1)
    # What was fitted is the step time at the batch and context that ran, not some other count.
    assert perf.model.step_s(2, 1200) == pytest.approx(step(2, 1200), rel=1e-3)
    assert perf.model.step_s(1, 200) == pytest.approx(step(1, 200), rel=1e-3)
    perf.decode_ended("a")
    assert perf._streams == {} and perf._batch == 0 and perf._batch_context == 0


def test_the_load_message_shows_the_work_here_now_and_wakes_its_watchers() -> None:
    import asyncio

    async def go() -> None:
        clock = Clock()
        perf = NodePerf(clock)
        changed = perf.changed()
        a = perf.prefill(700)
        a.__enter__()
        assert changed.is_set()  # a prefill started: the stream sends at once
        with perf.prefill(300):
            assert list(perf.load().prefill_queue) == [700, 300]  # oldest first
        assert list(perf.load().prefill_queue) == [700]
        a.__exit__(None, None, None)
        assert list(perf.load("n", "e").prefill_queue) == []
        # Decode: a stream waits for its KV until its first token, then is in the batch; the wait
        # is a transfer sample of its KV bytes.
        changed = perf.changed()
        perf.decode_started("x", 200, kv_bytes=1 << 20)
        assert changed.is_set()
        msg = perf.load()
        assert (msg.decode_batch, msg.decode_waiting) == (0, 1)
        clock.t += 0.03
        perf.decode_output("x", 1)
        msg = perf.load()
        assert (msg.decode_batch, msg.decode_waiting, msg.decode_context) == (1, 0, 201)
        assert perf.model.transfer.samples == 1
        fits = {f.name: f for f in msg.fits}
        assert fits["transfer"].samples == 1 and fits["prefill"].samples == 0
        perf.decode_ended("x")
        assert perf.load().decode_batch == 0

    asyncio.run(go())


def test_the_decode_steps_a_local_prefill_shares_are_not_samples() -> None:
    clock = Clock()
    perf = NodePerf(clock)
    perf.decode_started("a", 100)
    perf.decode_output("a", 1)
    clock.t += 0.01
    perf.decode_output("a", 1)
    assert perf.model.decode.samples == 1
    # A prefill on this node while "a" decodes: a's gaps meanwhile hold its chunks.
    with perf.prefill(500) as run:
        clock.t += 0.3
        perf.decode_output("a", 1)
        run.uncached_tokens = 500
    clock.t += 0.01
    perf.decode_output("a", 1)  # this gap began during the prefill
    assert perf.model.decode.samples == 1
    clock.t += 0.01
    perf.decode_output("a", 1)  # a clean step again
    assert perf.model.decode.samples == 2
    perf.decode_ended("a")


def test_a_local_prefill_beside_a_batch_is_a_sample_less_what_the_batch_added() -> None:
    """A decode node's prefill fit must learn at load too (its local prefills there overran the
    idle profile up to 2x): the prefill's time less its steps' batch share is a sample."""
    clock = Clock()
    perf = NodePerf(clock, step_tokens=256)
    for b in (1, 4, 16, 32):  # step = 5 ms + 1 ms a stream + 1 us a context token, exactly
        for ctx in (100, 5000, 20_000):
            perf.model.saw_decode_step(b, ctx, 0.005 + 0.001 * b + 1e-6 * ctx)
    seen: list[tuple[int, float]] = []
    perf.model.saw_prefill = lambda tokens, seconds, cached=0: seen.append((tokens, seconds))  # type: ignore[method-assign]
    for i in range(10):
        perf.decode_started(f"s{i}", 999)
        perf.decode_output(f"s{i}", 1)  # 10 streams of 1,000 context tokens decoding
    with perf.prefill(500) as run:
        clock.t += 1.0
        run.uncached_tokens = 500
    # 500 tokens beside 10 streams: 246 a step, 3 steps, each 10 ms + 10 ms of context over an empty one.
    assert seen[0][0] == 500 and seen[0][1] == pytest.approx(1.0 - 3 * (0.010 + 0.010), rel=1e-3)
    # Not alone among prefills: no sample (their steps are shared).
    with perf.prefill(100) as first, perf.prefill(100) as second:
        clock.t += 0.5
        first.uncached_tokens = second.uncached_tokens = 100
    assert len(seen) == 1
    # With no decode fit yet the batch's share is unknown: no sample either.
    fresh = NodePerf(clock, step_tokens=256)
    fresh.decode_started("x", 999)
    fresh.decode_output("x", 1)
    with fresh.prefill(500) as run:
        clock.t += 1.0
        run.uncached_tokens = 500
    assert fresh.model.prefill.samples == 0


def test_a_prefill_that_loaded_from_the_kv_store_teaches_the_load_fit_not_the_prefill_fit() -> None:
    """Its time holds the load: as a prefill sample it would inflate the prefill fit, and admission
    adds the load again. Past what the prefill fit says its computed part takes, it is a load sample."""
    clock = Clock()
    perf = NodePerf(clock)
    took = _feed_prefills_after_prefixes(clock, perf)
    prefill_before = perf.model.prefill.samples
    load = lambda t, u: 0.012 + 2e-5 * t + 5e-5 * u  # noqa: E731  (a step sat out, the copy, a disk read)
    for i in range(120):
        n, h = 96 + (i * 37) % 200, 512 + (i * 256) % 1536
        loaded = min(h, 256 * (1 + i % 4))
        disk = 256 * (i % 3 == 0)  # chunks promoted from disk meanwhile: (loaded, of them from disk)
        with perf.prefill(n + h) as run:
            perf.saw_store_loads(loaded, disk)  # the engine's step stats, while it runs
            clock.t += took(n, h) + load(loaded, disk)
            run.uncached_tokens = n
    assert perf.model.prefill.samples == prefill_before
    assert perf.model.load.samples == 120
    # (its prior, the per-token constants, weighs a tenth of a load: a trace of it stays)
    assert perf.model.store_load_s(600) == pytest.approx(load(600, 0), rel=0.05)
    assert perf.model.store_load_s(600, 256) == pytest.approx(load(600, 256), rel=0.05)
    assert {f.name: f.samples for f in perf.load().fits}["load"] == 120
    # On a decode node, beside a batch: its own share, past the computed part, is a load sample...
    for b in (1, 4, 16):
        for ctx in (100, 5000):
            perf.model.saw_decode_step(b, ctx, 0.005)

    def loaded_prefill_beside(stream: str) -> None:  # 388 of 900 computed, 512 loaded, while ``stream`` decodes
        with perf.prefill(900) as run:
            perf.saw_store_loads(512, 0)
            clock.t += 0.5
            perf.decode_output(stream, 1)
            run.uncached_tokens = 388

    perf.decode_started("x", 100)
    perf.decode_output("x", 1)
    loaded_prefill_beside("x")
    assert (perf.model.prefill.samples, perf.model.load.samples) == (prefill_before, 121)
    # ... unless a stream joined meanwhile (its KV may have loaded from the store beside its
    # transfer): whose load it was is not known, no sample of either fit.
    perf.decode_started("y", 100)
    loaded_prefill_beside("y")
    assert (perf.model.prefill.samples, perf.model.load.samples) == (prefill_before, 121)


def test_the_kv_stores_step_counts_reach_the_load_sinks() -> None:
    from tandem.kvtransfer import stats

    seen: list[tuple[int, int]] = []
    metrics = stats.TandemPromMetrics.__new__(stats.TandemPromMetrics)  # (only its store half runs here)
    for name in ("_st_hits", "_st_misses", "_st_tokens", "_st_bytes", "_st_evict", "_st_dropped", "_st_corrupt",
                 "_st_saves", "_st_save_step", "_st_held", "_st_load"):
        setattr(metrics, name, _Any())
    stats.STORE_LOAD_SINKS.append(lambda t, d: seen.append((t, d)))
    try:
        metrics._observe_store({"store": {"hits.ram": 2, "hit_tokens": 512}}, [])
        metrics._observe_store({"store": {"hits.disk": 1, "misses": 3}}, [])
        metrics._observe_store({"store": {"misses": 1}}, [])  # nothing loaded: not called
    finally:
        stats.STORE_LOAD_SINKS.pop()
    assert seen == [(512, 0), (0, 1)]


class _Any:
    def __getattr__(self, name: str) -> _Any:
        return self

    def __call__(self, *a: object, **k: object) -> _Any:
        return self


def test_prefill_busy_is_the_share_of_recent_time_with_a_prefill_running() -> None:
    clock = Clock()
    perf = NodePerf(clock)
    assert perf.prefill_busy() == 0.0
    with perf.prefill(100):
        clock.t += 2.0
        with perf.prefill(100):  # overlapping ones count once
            clock.t += 1.0
    clock.t += 2.0
    assert perf.prefill_busy(window_s=10.0) == pytest.approx(0.3)
    with perf.prefill(100):
        clock.t += 1.0
        assert perf.load().prefill_busy == pytest.approx(0.4)  # the running one counts so far
    clock.t += 20.0
    assert perf.prefill_busy(window_s=10.0) == 0.0  # all of it out of the window


def test_the_decode_batch_is_also_reported_as_a_moving_average() -> None:
    import math

    from tandem.node import perf as perf_mod

    clock = Clock()
    perf = NodePerf(clock)
    clock.t += 30.0  # idle: the average stays 0
    assert perf.decode_means() == (0.0, 0.0)
    for rid in ("a", "b"):
        perf.decode_started(rid, 100)
        perf.decode_output(rid, 1)  # both join the batch: 2 streams, 202 context tokens
    clock.t += perf_mod.BATCH_MEAN_S  # one time constant later
    batch, context = perf.decode_means()
    assert batch == pytest.approx(2 * (1 - math.exp(-1)))
    assert context == pytest.approx(202 * (1 - math.exp(-1)))
    load = perf.load()
    assert load.decode_batch == 2 and load.decode_batch_mean == pytest.approx(batch)
    perf.decode_ended("a")
    perf.decode_ended("b")
    clock.t += 100 * perf_mod.BATCH_MEAN_S  # long idle again: back to about 0
    assert perf.decode_means()[0] == pytest.approx(0.0, abs=1e-6)


def test_a_stream_interval_group_is_a_sample_of_its_steps() -> None:
    clock = Clock()
    perf = NodePerf(clock)
    perf.decode_started("a", 100, interval=4)
    perf.decode_output("a", 1)  # the first at once
    clock.t += 0.08
    perf.decode_output("a", 4)  # four steps of 20 ms
    assert perf.model.decode.samples == 1
    assert perf.model.step_s(1, 101) == pytest.approx(0.02, rel=0.05)
    clock.t += 0.05
    perf.decode_output("a", 3)  # the last, short group: not a whole interval, not a sample
    assert perf.model.decode.samples == 1
    perf.decode_ended("a")


def test_steps_are_timed_on_the_engines_clock_when_it_gives_one() -> None:
    """Outputs that reach the node late and in a burst (its core busy with the steps) read short
    gaps here; the engine's own timestamps give the steps as they ran, coalesced outputs too."""
    from tandem.node.perf import EngineClock

    clock = Clock()
    perf = NodePerf(clock)
    perf.decode_started("a", 100)
    perf.decode_output("a", 1, EngineClock(10.0, 1))  # its first token
    clock.t += 0.001  # the next output is read 1 ms later here, but came 50 ms later there
    perf.decode_output("a", 1, EngineClock(10.05, 2))
    assert perf.model.decode.samples == 1
    assert perf.model.step_s(1, 101) == pytest.approx(0.05, rel=0.05)
    clock.t += 0.2
    perf.decode_output("a", 2, EngineClock(10.15, 4))  # two steps in one output: 50 ms each
    assert perf.model.decode.samples == 2
    assert perf.model.step_s(1, 102) == pytest.approx(0.05, rel=0.05)
    perf.decode_ended("a")


def test_a_span_of_steps_that_a_stream_joined_or_left_midway_is_no_sample() -> None:
    from tandem.node.perf import EngineClock

    clock = Clock()
    perf = NodePerf(clock)
    perf.decode_started("a", 100)
    perf.decode_started("b", 100)
    perf.decode_output("a", 1, EngineClock(1.00, 1))
    perf.decode_output("a", 1, EngineClock(1.05, 2))  # a alone in that step: a sample
    assert perf.model.decode.samples == 1
    perf.decode_output("b", 1, EngineClock(1.10, 1))  # b joins (its first token) in the step at 1.10
    perf.decode_output("a", 1, EngineClock(1.10, 3))  # a's step at 1.10 had b in it, and b is counted: a sample
    assert perf.model.decode.samples == 2
    perf.decode_output("a", 2, EngineClock(1.30, 5))  # two steps from 1.10, b was in both: a sample
    assert perf.model.decode.samples == 3
    perf.decode_output("b", 2, EngineClock(1.30, 3))  # the same two steps, sampled already
    assert perf.model.decode.samples == 3
    perf.decode_started("c", 100)
    perf.decode_output("c", 1, EngineClock(1.40, 1))  # c joins at 1.40
    perf.decode_output("a", 2, EngineClock(1.50, 7))  # a's two steps from 1.30: c was in only one
    assert perf.model.decode.samples == 3
    perf.decode_output("c", 1, EngineClock(1.50, 2))  # one step: a sample
    assert perf.model.decode.samples == 4
    perf.decode_ended("c")  # c's last token came at 1.50
    perf.decode_output("b", 2, EngineClock(1.50, 5))  # b's span 1.30..1.50 held c: no sample
    perf.decode_output("a", 1, EngineClock(1.55, 8))  # after c left: a sample
    assert perf.model.decode.samples == 5


def test_a_step_is_one_sample_however_many_streams_it_carried() -> None:
    """Every stream in a step reports the step's end: the fit sees the step once, so a step of
    many streams weighs no more than one of few, and the fit's half-life is steps, not tokens."""
    from tandem.node.perf import EngineClock

    perf = NodePerf(Clock())
    for rid in "abcd":
        perf.decode_started(rid, 100)
        perf.decode_output(rid, 1, EngineClock(1.00, 1))  # all four join in one step
    for k in range(1, 6):
        for rid in "abcd":  # each step's end, reported by each of its four streams
            perf.decode_output(rid, 1, EngineClock(1.00 + 0.04 * k, 1 + k))
        assert perf.model.decode.samples == k


def test_a_step_that_a_stream_since_ended_took_part_in_is_no_sample() -> None:
    from tandem.node.perf import EngineClock

    perf = NodePerf(Clock())
    for rid in "ac":
        perf.decode_started(rid, 100)
        perf.decode_output(rid, 1, EngineClock(1.40, 1))  # both join in one step
    perf.decode_output("a", 1, EngineClock(1.50, 2))  # a and c: a sample
    perf.decode_started("d", 100)
    perf.decode_output("d", 1, EngineClock(1.60, 1))  # d joins at 1.60
    perf.decode_output("a", 1, EngineClock(1.60, 3))  # a's step 1.50..1.60: a sample
    assert perf.model.decode.samples == 2
    perf.decode_output("c", 2, EngineClock(1.70, 3))  # c's two steps from 1.50: d joined midway, none
    perf.decode_ended("c")  # c's last token came at 1.70
    perf.decode_output("a", 1, EngineClock(1.70, 4))  # a's step to 1.70 held c, which the batch no longer counts
    assert perf.model.decode.samples == 2
    perf.decode_output("a", 1, EngineClock(1.80, 5))  # after c left: a sample
    assert perf.model.decode.samples == 3


def test_the_engines_kv_room_comes_from_vllms_scheduler_stats_and_goes_out_in_the_load() -> None:
    from types import SimpleNamespace

    from vllm.v1.metrics.stats import SchedulerStats

    from tandem.node.engine import KvRoom

    room = KvRoom()
    perf = NodePerf()
    perf.kv_room = room.tokens
    assert room.tokens() is None and perf.load().kv_tokens == 0  # before the engine's first step
    cache = SimpleNamespace(num_gpu_blocks=0, block_size=16)
    logger = room.factory()(SimpleNamespace(cache_config=cache), 0)
    cache.num_gpu_blocks = 101  # set once the engine has sized its cache (one is vLLM's null block)
    logger.record(None, None)  # a step without scheduler stats changes nothing
    assert room.tokens() is None
    logger.record(SchedulerStats(kv_cache_usage=0.25, num_waiting_reqs=2, num_skipped_waiting_reqs=1), None)
    assert room.tokens() == (1600, 1200, 3)
    load = perf.load()
    assert (load.kv_tokens, load.kv_free_tokens, load.engine_waiting) == (1600, 1200, 3)
