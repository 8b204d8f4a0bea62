"""This node's own timings, as its requests run, fitted into a ``NodeModel`` and exported.

Prefill: a prefill that ran alone (no other prefill on this node started or
was running meanwhile, and no decode stream was producing tokens: a decode
node prefilling locally shares its steps with its batch) is one sample of
(uncached prompt tokens, seconds).
Overlapping prefills share the engine's steps, so their times say little about
either one; a node kept busy still gets samples whenever the queue runs dry,
and the forgetting fit keeps the last ones. A decode node's local prefill that
ran as its only prefill beside a batch is a sample too, less what the batch
added to its steps (``chunk_steps`` of the batch's mean over the prefill, each
costing the decode fit's step over an empty one): without it a decode node's
prefill fit would stay its idle startup profile, which its local prefills
overrun under load (a 128-token one: 125 ms learned at 2 req/s against 96 ms
profiled idle). Decode: each gap between two
outputs of one stream is one step of the batch running then (the streams that
have begun producing tokens, and their context tokens in all), unless a
prefill ran on the node meanwhile (its chunks were in those steps). The gap is
taken on the engine core's clock when the engine gives one (``EngineClock``):
the outputs reach this process late and in bursts when its core is busy with
the steps, and gaps seen here then read short after a late one (measured: a
batch of 32 whose steps took 57 ms read as 35 ms). Transfer: a
stream that came with a KV handle, from its start to its first token, is one
sample of (KV bytes, seconds): the fetch plus the one step that produces the
token, which is what a request waits for between its first and second token.
Load: a prefill that would be a sample (alone, or its own share beside a
batch) but loaded part of its prompt from the node's KV store
(``saw_store_loads``, the engine's per-step counts) is not a prefill sample but
one of (tokens loaded, of them promoted from disk, its time over what the
prefill fit says its computed part takes); with a stream joining the batch
meanwhile (its KV may have loaded beside its transfer) it is none.

Speed: each prefill and decode step sample, before the fit learns it, is also
a sample of how far the node's time strays from what its fit said
(tandem/nodespeed.py's ``SpeedTracker``): the slow part that lasts about a
second and the jitter, which admission cannot see and the simulator draws.

The fitted coefficients and sample counts are Prometheus gauges
(``tandem_perf_coefficient{model,term}``, ``tandem_perf_samples{model}``),
refreshed at most once a second. ``load()`` is the node's state as the
NodeMonitor stream sends it to coordinators (tandem/node/monitor.py): the
prefills here now, the decode batch, and the fitted coefficients;
``changed()`` wakes that stream when work starts or ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import Gauge

from tandem.nodespeed import Pace, Speed, SpeedTracker
from tandem.perfmodel import VLLM_STEP_TOKENS, ModelView, NodeModel, OnlineFit, beside_s, chunk_steps
from tandem.proto import tandem_pb2 as pb

COEFFICIENT = Gauge("tandem_perf_coefficient", "A fitted coefficient of this node's performance model "
                    "(seconds per unit of the term)", ["model", "term"])
SAMPLES = Gauge("tandem_perf_samples", "Timings the node's performance model was fitted from", ["model"])
SPEED = Gauge("tandem_perf_speed", "How this node's times stray from its fit (tandem/nodespeed.py): the log "
              "time factor's slow part (sd, tau_s in seconds), jitter (jitter_sd) and the log of its mean (bias)",
              ["model", "term"])
PACE = Gauge("tandem_perf_pace", "How far this node's latest work strayed from its fit (tandem/nodespeed.py, Pace): "
             "the log time factor over about the last second less its one-minute mean (what admission scales "
             "a prefill node's TTFT predictions by)", ["model"])
SPEED_TERMS = ("sd", "tau_s", "jitter_sd", "bias")
PACE_TERMS = ("deviation", "weight", "age_s")
EXPORT_EVERY_S = 1.0
BUSY_WINDOW_S = 10.0
BATCH_MEAN_S = 10.0  # time constant of the decode batch's moving average


def busy_share(spans: deque[tuple[float, float]], since: float | None, now: float,
               window_s: float = BUSY_WINDOW_S) -> float:
    """The share of the last ``window_s`` seconds before ``now`` covered by ``spans`` (start, end;
    oldest first; those ended before the window are dropped from it) and by the one running
    since ``since`` (None: none): a node's ``prefill_busy``, and the simulator's."""
    start = now - window_s
    while spans and spans[0][1] <= start:
        spans.popleft()
    running = [(since, now)] if since is not None else []
    return min(1.0, sum(e - max(s, start) for s, e in (*spans, *running) if e > start) / window_s)


@dataclass
class PrefillRun:
    uncached_tokens: int | None = None
    # Its time in the engine, from its first step to its token (``engine_prefill_s``; None: not given)
    engine_s: float | None = None


def engine_prefill_s(out: object) -> float | None:
    """For a vLLM ``RequestOutput`` with its first token: the engine core's time from the request's
    first step to that token (its stats), which leaves out its wait in the engine's queue; None
    without them (a simulated engine)."""
    stats = getattr(out, "metrics", None)
    began, token = getattr(stats, "scheduled_ts", 0.0), getattr(stats, "first_token_ts", 0.0)
    return token - began if began and token > began else None


@dataclass
class _Stream:
    context: int  # prompt plus tokens produced so far
    started: float
    kv_bytes: int = 0  # KV it fetches before its first token (0: none, or not known)
    last_output: float | None = None  # monotonic; None until its first token
    epoch: int = 0  # the node's prefill epoch at its last output
    interval: int = 1  # tokens its outputs group after the first (vLLM's stream_interval)
    engine_at: EngineClock | None = None  # the engine's own clock at its last output, when it gives one


@dataclass(frozen=True)
class EngineClock:
    """The engine core's own time of a stream's latest token and how many it has produced (vLLM's
    per-request stats): steps timed where they ran, not when this process got to their outputs."""

    token_at: float
    tokens: int

    @classmethod
    def of(cls, out: object) -> EngineClock | None:
        """For a vLLM ``RequestOutput``: when the engine core produced its latest token and how many
        the request has produced by then (its stats; None without them, as from a simulated engine)."""
        stats = getattr(out, "metrics", None)
        at, tokens = getattr(stats, "last_token_ts", 0.0), getattr(stats, "num_generation_tokens", 0)
        return cls(at, tokens) if at and tokens else None


class NodePerf:
    def __init__(self, clock: Callable[[], float] = time.monotonic, step_tokens: int = 0,
                 own_steps: bool = False) -> None:
        self.model = NodeModel()
        self.step_tokens = step_tokens  # the engine's per-step token budget (reported; 0: not set)
        self.own_steps = own_steps  # its engine starts each prompt in steps of its own (--prompt-steps own)
        self._clock = clock
        self._prefills_running = 0
        self._prefill_starts = 0
        self._streams: dict[str, _Stream] = {}
        # The batch: streams that have produced a token, and their context tokens in all
        # (kept as running totals: a pass over every stream on every token would cost B² a step).
        self._batch = 0
        self._batch_context = 0
        # Their moving averages over time (exponential, BATCH_MEAN_S), as of _mean_at.
        self._batch_mean = 0.0
        self._context_mean = 0.0
        self._mean_at = clock()
        # ... and their integrals over time, as of _mean_at (a span's mean: difference / duration).
        self._batch_area = 0.0
        self._context_area = 0.0
        self._exported_at = -float("inf")
        # how far prefills and decode steps stray from what the fit said just before (nodespeed.py),
        # and the estimates as last exported (recomputed at most once an EXPORT_EVERY_S)
        self._measure_speed_afresh()
        self._prefill_epoch = 0  # changes whenever a prefill starts or ends
        self._busy: deque[tuple[float, float]] = deque()  # recent spans with a prefill running (start, end)
        self._busy_since: float | None = None  # start of the span running now
        self._joins = 0  # streams that joined the batch, ever
        # On the engine's clock: the last token of the latest stream to end here, and the first
        # token of the latest to join. A span of steps is a sample only when it began after the one
        # (the batch no longer counts a stream that was in it) and, over several steps, after the
        # other (the batch counts a stream that was not in its first steps).
        self._left_at = -math.inf
        self._joined_at = -math.inf
        # The end of the latest step sampled, on the engine's clock. Every stream in a step reports
        # it: one sample a step, not one a stream (a simulated engine has no such clock: its gaps,
        # timed here, are still one sample a stream). (Until the twenty-ninth sitting each stream's
        # report was a sample: a step of 20 streams counted 20 times, so the fit's half-life of 500
        # samples held about a second at load, one batch size, and read across batch sizes from
        # there. Replayed on a chat run's steps at 1:1, the steps 1-10 s ahead came out 5.6 % low at
        # the median, p90 22 %; once a step, 0.7 % and 19 %.)
        self._sampled_to = -math.inf
        # The node's KV store's loads, as its engine reports them (saw_store_loads): prompt tokens
        # loaded in all, and of them promoted from disk. A prefill that loaded is not a sample of the
        # prefill fit (its time holds the load) but of the load fit, past what its computed part takes.
        self._store_tokens = 0
        self._store_disk = 0
        self._queue: dict[int, int] = {}  # prefills here now (insertion order: oldest first) -> tokens
        self._ids = itertools.count()
        self._changed: asyncio.Event | None = None
        # The engine's KV cache: (tokens, of them free, requests waiting in its scheduler), or None
        # while not known (engine.KvRoom.tokens; a simulated engine has none).
        self.kv_room: Callable[[], tuple[int, int, int] | None] = lambda: None

    def seed(self, model: NodeModel) -> None:
        """Start from ``model`` (a cached startup profile); what the node serves refines it."""
        self.model = model
        self.hold_profile()

    def hold_profile(self) -> None:
        """The decode fit's startup profile becomes its lasting prior: its grid of batches and
        contexts tells the two apart, which the steps served cannot (a batch and its context grow
        together), so forgetting must not wash it out (plan --validate, twelfth sitting: a fit
        from serving alone swung its batch term 1.0 → 2.7 → 0 ms between rates)."""
        self.model.decode.hold_as_prior()
        # what the profile's runs strayed from a fit still being learned over a deliberately wide
        # grid says nothing of the node's speed while serving: its speed is measured from here on
        self._measure_speed_afresh()
        self._export(force=True)

    def _measure_speed_afresh(self) -> None:
        self.speed: dict[str, SpeedTracker] = {"prefill": SpeedTracker(), "decode": SpeedTracker()}
        # ... and how far they strayed just now (nodespeed.py's Pace: what admission scales by)
        self.pace: dict[str, Pace] = {"prefill": Pace(), "decode": Pace()}
        self._speeds: list[pb.PerfFit] = []
        self._speeds_at = -float("inf")

    # prefill -------------------------------------------------------------------
    @contextmanager
    def prefill(self, tokens: int = 0) -> Iterator[PrefillRun]:
        """Around one prefill of a ``tokens``-token prompt; the caller sets ``run.uncached_tokens``
        once the engine said how many prompt tokens it found cached. A sample is taken if it
        completes having run alone."""
        sole = self._prefills_running == 0
        alone = sole and self._batch == 0
        no_batch = self._batch == 0
        self._advance_means(self._clock())
        areas = (self._batch_area, self._context_area)
        self._prefills_running += 1
        self._prefill_starts += 1
        self._prefill_epoch += 1
        starts, joins, t0 = self._prefill_starts, self._joins, self._clock()
        stored0 = (self._store_tokens, self._store_disk)
        if self._busy_since is None:
            self._busy_since = t0
        key = next(self._ids)
        self._queue[key] = tokens
        self._touch()
        run = PrefillRun()
        ok = False
        try:
            yield run
            ok = True
        finally:
            self._prefills_running -= 1
            self._prefill_epoch += 1
            del self._queue[key]
            if not self._prefills_running and self._busy_since is not None:
                self._busy.append((self._busy_since, self._clock()))
                self._busy_since = None
            self._touch()
            took = self._clock() - t0
            undisturbed = self._prefill_starts == starts and self._joins == joins and self._batch == 0
            cached = max(0, tokens - (run.uncached_tokens or 0))  # (0 when the prompt's length is not given)
            loaded, disk = self._store_tokens - stored0[0], self._store_disk - stored0[1]
            # A load is this prefill's only when nothing else here could have loaded meanwhile (no
            # other prefill, no stream joining).
            mine = not (loaded or disk) or (self._joins == joins and disk <= loaded <= cached)
            own = None
            if ok and alone and undisturbed and run.uncached_tokens is not None:
                own = took
            elif ok and sole and self._prefill_starts == starts and run.uncached_tokens and took > 0:
                own = self._own_share(run.uncached_tokens, took, areas)
            fit_s = self.model.prefill_s(run.uncached_tokens, cached) if run.uncached_tokens is not None else 0.0
            if own is not None and mine and run.uncached_tokens is not None:
                if loaded:
                    self.model.saw_load(loaded, disk, max(0.0, own - fit_s))
                else:
                    self.speed["prefill"].add(self._clock(), own, fit_s)
                    self.model.saw_prefill(run.uncached_tokens, own, cached)
            # The pace: with prompts in steps of their own and no decode batch here meanwhile, the
            # engine's own time for it (from its first step), so that a prefill that waited behind
            # others counts too; otherwise the sample's, if it is one. (The engine's time leaves out
            # the few ms this daemon adds, which the fit holds: a constant lean, read against the
            # minute's mean, unless the two kinds of sample change their mix.)
            steps_own = self.own_steps and no_batch and self._joins == joins and self._batch == 0
            pace_s = run.engine_s if run.engine_s is not None and steps_own else own
            if ok and pace_s and fit_s and mine and not loaded:
                self.pace["prefill"].add(self._clock(), pace_s, fit_s)
            self._export(force=self._prefills_running == 0)  # idle now: show the last samples too

    def saw_store_loads(self, tokens: int, disk_tokens: int) -> None:
        """The engine's KV store loaded ``tokens`` prompt tokens into its blocks and promoted
        ``disk_tokens`` from disk (kvtransfer/stats.py, once a step that did)."""
        self._store_tokens += tokens
        self._store_disk += disk_tokens

    def _own_share(self, tokens: int, took: float, areas: tuple[float, float]) -> float | None:
        """A prefill of ``tokens`` uncached that shared its steps with a decode batch took ``took``
        seconds; ``areas``: the batch's integrals when it started. Its own share (None: not known)."""
        if not self.model.decode.samples:
            return None  # what the batch added is not known yet
        self._advance_means(self._clock())
        batch = (self._batch_area - areas[0]) / took
        context = (self._context_area - areas[1]) / took
        if batch <= 0:
            return took  # no stream decoded while it ran
        steps = chunk_steps(tokens, self.step_tokens or VLLM_STEP_TOKENS, batch)
        own = took - steps * beside_s(self.model, batch, context)
        return own if own > 0 else None

    # decode --------------------------------------------------------------------
    def decode_started(self, rid: str, context_tokens: int, kv_bytes: int = 0, interval: int = 1) -> None:
        self._streams[rid] = _Stream(context_tokens, self._clock(), kv_bytes, interval=max(1, interval))
        self._touch()

    def decode_output(self, rid: str, new_tokens: int, engine: EngineClock | None = None) -> None:
        """``new_tokens`` came for stream ``rid``; ``engine``: the engine's clock for them, if it has one."""
        s = self._streams.get(rid)
        if s is None or new_tokens <= 0:
            return
        now = self._clock()
        last_engine, s.engine_at = s.engine_at, engine
        if s.last_output is None:  # its first token: it joins the batch
            self._advance_means(now)
            self._batch += 1
            self._joins += 1
            self._batch_context += s.context
            if s.kv_bytes:
                self.model.saw_transfer(s.kv_bytes, now - s.started)
            if engine is not None:
                self._joined_at = max(self._joined_at, engine.token_at)
            self._touch()
        elif s.epoch == self._prefill_epoch and not self._prefills_running:  # no prefill in these steps
            if engine is not None and last_engine is not None:
                steps = engine.tokens - last_engine.tokens
                began = last_engine.token_at
                if (steps > 0 and engine.token_at > began and self._left_at <= began
                        and (steps == 1 or self._joined_at <= began) and began >= self._sampled_to):
                    self._sampled_to = engine.token_at
                    self._saw_step((engine.token_at - last_engine.token_at) / steps, now)
                    self._export()
            elif engine is None and new_tokens == s.interval:
                # Timed here: one step since its last output, or its stream interval's steps (more:
                # coalesced behind a slow reader, no sample).
                self._saw_step((now - s.last_output) / new_tokens, now)
                self._export()
        s.last_output = now
        s.epoch = self._prefill_epoch
        s.context += new_tokens
        self._advance_means(now)
        self._batch_context += new_tokens

    def _saw_step(self, seconds: float, now: float) -> None:
        """One step of the batch running now took ``seconds``: a sample of the fit, and of the speed."""
        fit_s = self.model.step_s(self._batch, self._batch_context)
        self.speed["decode"].add(now, seconds, fit_s)
        self.pace["decode"].add(now, seconds, fit_s)
        self.model.saw_decode_step(self._batch, self._batch_context, seconds)

    def decode_ended(self, rid: str) -> None:
        s = self._streams.pop(rid, None)
        if s is not None and s.engine_at is not None:
            self._left_at = max(self._left_at, s.engine_at.token_at)
        if s is not None and s.last_output is not None:
            self._advance_means(self._clock())
            self._batch -= 1
            self._batch_context -= s.context
        self._touch()
        if not self._streams:
            self._export(force=True)  # idle now: show the last samples too

    # state -----------------------------------------------------------------------
    def _advance_means(self, now: float) -> None:
        """Bring the moving averages up to ``now`` (the batch held its value since the last call)."""
        dt = now - self._mean_at
        if dt <= 0:
            return
        self._batch_area += self._batch * dt
        self._context_area += self._batch_context * dt
        keep = math.exp(-dt / BATCH_MEAN_S)
        self._batch_mean = self._batch + (self._batch_mean - self._batch) * keep
        self._context_mean = self._batch_context + (self._context_mean - self._batch_context) * keep
        self._mean_at = now

    def decode_means(self) -> tuple[float, float]:
        """(batch, context tokens), averaged over about the last ``BATCH_MEAN_S`` seconds."""
        self._advance_means(self._clock())
        return self._batch_mean, self._context_mean

    def forget_busy(self) -> None:
        """Start ``prefill_busy`` afresh (after the startup profile: its prefills are not load)."""
        self._busy.clear()
        if self._busy_since is not None:
            self._busy_since = self._clock()

    def prefill_busy(self, window_s: float = BUSY_WINDOW_S) -> float:
        """The share of the last ``window_s`` seconds during which a prefill ran here (on a decode
        node: the part of its steps its streams shared with local prefills)."""
        return busy_share(self._busy, self._busy_since, self._clock(), window_s)

    def load(self, node_id: str = "", engine_id: str = "") -> pb.NodeLoad:
        """What the node is doing now and how fast it is (the NodeMonitor stream's message)."""
        self._export()  # (rate-limited: an idle node's speeds age out too)
        view = ModelView.of(self.model)
        fits = [pb.PerfFit(name=name, terms=list(f.terms), coefficients=list(f.coefficients), samples=f.samples)
                for name, f in view.named()]
        batch_mean, context_mean = self.decode_means()
        kv_tokens, kv_free, waiting = self.kv_room() or (0, 0, 0)
        return pb.NodeLoad(node_id=node_id, engine_id=engine_id, prefill_queue=list(self._queue.values()),
                           decode_batch=self._batch, decode_context=self._batch_context,
                           decode_waiting=len(self._streams) - self._batch, fits=fits, sent_at=time.time(),
                           step_tokens=self.step_tokens, prefill_busy=self.prefill_busy(),
                           decode_batch_mean=batch_mean, decode_context_mean=context_mean,
                           kv_tokens=kv_tokens, kv_free_tokens=kv_free, engine_waiting=waiting,
                           speeds=self._speeds, paces=self.paces())

    def changed(self) -> asyncio.Event:
        """Set when work started or ended since the event was taken (take a new one after)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def notify(self) -> None:
        """Wake the NodeMonitor streams: something they carry changed (the KV store's chunks)."""
        self._touch()

    def _touch(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # export --------------------------------------------------------------------
    def _export(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._exported_at < EXPORT_EVERY_S:
            return
        self._exported_at = now
        for name, fit in self.model.named():
            _export_fit(name, fit)
        if now - self._speeds_at >= EXPORT_EVERY_S:
            self._speeds_at = now
            for name, pace in self.pace.items():
                if (read := pace.read(now)) is not None:
                    PACE.labels(name).set(read[0])
            self._speeds = []
            for name, tracker in self.speed.items():
                est = tracker.estimate(now)
                if est is None:  # (too little work lately: no figure, rather than an old one)
                    for term in SPEED_TERMS:
                        with contextlib.suppress(KeyError):
                            SPEED.remove(name, term)
                    continue
                coefficients = (est.sd, est.tau_s, est.jitter_sd, est.bias)
                for term, c in zip(SPEED_TERMS, coefficients):
                    SPEED.labels(name, term).set(c)
                self._speeds.append(pb.PerfFit(name=name, terms=list(SPEED_TERMS), coefficients=coefficients,
                                               samples=tracker.samples))

    def paces(self) -> list[pb.PerfFit]:
        """How fast the node runs now, by kind with timed work (``Pace.read``: terms ``PACE_TERMS``)."""
        now = self._clock()
        return [pb.PerfFit(name=name, terms=list(PACE_TERMS), coefficients=list(read))
                for name, pace in self.pace.items() if (read := pace.read(now)) is not None]

    def speeds(self) -> dict[str, Speed]:
        """The speeds as last exported, by kind (a kind without enough samples yet is absent)."""
        self._export()
        return {f.name: Speed(*f.coefficients) for f in self._speeds}


def _export_fit(name: str, fit: OnlineFit) -> None:
    SAMPLES.labels(name).set(fit.samples)
    if fit.samples:
        for term, c in zip(fit.names, fit.coefficients()):
            COEFFICIENT.labels(name, term).set(c)
