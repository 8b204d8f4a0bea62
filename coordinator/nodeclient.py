"""A node as the coordinator sees it (``NodeClient``): its channel and call stream, its latest
load message and fitted model, the requests this coordinator has there (``Tally``), the recent
arrivals admission's forward view counts (``Arrivals``), and how its predictions turn out
(calibration.py). router.py keeps the membership view and picks among them."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2_grpc

from tandem.kvstore.held import ChunkIndex
from tandem.membership import NodeRecord
from tandem.perfmodel import FITS, FitView, ModelView
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc

from . import metrics as m
from .calibration import Calibration
from .callstream import NodeStream, call_mode_of

LOAD_STALE_S = 5.0  # a load message older than this no longer counts (the stream broke)
PACES = ("on", "off")
# How much of a node's pace now (its load message's ``paces``: tandem/nodespeed.py, Pace) a TTFT
# prediction takes: PACE_GAIN of the reading's log deviation, fading with its age over PACE_HOLD_S.
# On this host a core's speed over one second correlates 0.6-0.7 with the next second's, 0.5 two
# seconds on and 0.4 five seconds on (the forty-seventh sitting: fixed work pinned on each core;
# across the two cores 0.3-0.4 at any lag, so each node reads its own).
PACE_GAIN = 0.6
PACE_HOLD_S = 4.0
PACE_KINDS = ("ttft", "ttft_local")  # a stream's TPOT spans many seconds: the pace now says little of it
# Only a prefill node's TTFT predictions take it (its prefill calls, and the streams it serves whole),
# and only its prefills' pace: a decode node's freshest pace is its decode steps', which did not
# foretell its local prefills (replayed on two 1:1 chat runs, their TTFT error p90 went 32 -> 34 %
# and 24 -> 30 %, where the prefill node's went 39 -> 30 % and 44 -> 29 % on one and held on the
# other). Decode steps are bandwidth-bound, prefills compute-bound.
PACE_ROLES = ("prefill",)
PACE_OF = "prefill"
ARRIVAL_WINDOW_S = 20.0  # the recent requests to a decode node that admission's forward view counts


class Arrivals:
    """The requests sent to a node over the last ``window_s`` seconds: their rate, and the mean
    of the output tokens each asked for.

    After a window without any, arrivals are counted over the time since they began coming again
    (at least ``least_s``), not the whole window: load that starts after an idle spell is not
    averaged with the idle time. (Counted over the whole window, a 2 req/s chat probe read about a
    quarter of its rate over its first 5 s and half over its first 10: admission's TPOT forecasts
    there ran 26 % short, and its TPOT error p90 over the probe was 31.7 % against 19.5 % without
    its first 20 s. Counted since they began, 19 % short, and the p90 over the requests decoded
    while requests kept arriving 23.5 % against 28.5 %, over all its requests no better, 32.0 %
    against 31.7 %: one run each, and neutral in the simulator; the thirty-fifth sitting's runs.
    There the bench's warm-up requests came 5 s before the probe, so the count ran from them.)
    A beginning is only a window without arrivals: one request in the window before load resumes
    keeps the count over the whole window. The count includes the arrival that began it, so it
    reads about one request over the span high."""

    def __init__(self, window_s: float = ARRIVAL_WINDOW_S, least_s: float | None = None) -> None:
        self.window_s = window_s
        self.least_s = window_s / 4 if least_s is None else least_s
        if not 0 < self.least_s <= window_s:
            raise ValueError(f"least_s must be in (0, window_s], got {self.least_s}")
        self._seen: deque[tuple[float, int]] = deque()
        self._tokens = 0
        self._since = 0.0  # when the arrivals in the window began, after a window without any

    def add(self, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._forget(now)
        if not self._seen:
            self._since = now
        self._seen.append((now, tokens))
        self._tokens += tokens

    def rate(self, now: float | None = None) -> tuple[float, float]:
        """(requests a second, their mean output tokens) over the window up to ``now``, or since
        the arrivals began coming again where that is shorter (but ``least_s`` at least)."""
        now = time.monotonic() if now is None else now
        self._forget(now)
        n = len(self._seen)
        if not n:
            return 0.0, 0.0
        span = min(self.window_s, max(self.least_s, now - self._since))
        return n / span, self._tokens / n

    def _forget(self, now: float) -> None:
        while self._seen and self._seen[0][0] <= now - self.window_s:
            self._tokens -= self._seen.popleft()[1]


class Tally(dict[int, int]):
    """Requests -> tokens, with the tokens' sum kept as they come and go (``total``): admission
    reads it for every candidate node of every request, and a sum over a node's whole batch each
    time would cost the coordinator O(batch) a node a request. Entries change by ``[k] = v`` and
    ``del`` only."""

    total: int = 0

    def __setitem__(self, key: int, tokens: int) -> None:
        self.total += tokens - self.get(key, 0)
        super().__setitem__(key, tokens)

    def __delitem__(self, key: int) -> None:
        self.total -= self[key]
        super().__delitem__(key)


class _PrefillStub(pb_grpc.PrefillNodeStub):
    """A prefill node's calls, one gRPC call each: its Prefill and Release, and the Decode of a
    request it serves whole (--colocate)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel)
        self.Decode = pb_grpc.DecodeNodeStub(channel).Decode


@dataclass
class NodeClient:
    record: NodeRecord
    channel: grpc.aio.Channel
    outstanding: int = 0
    served: int = 0
    down_since: float | None = None  # monotonic; set while the node failed and has not answered since
    load: pb.NodeLoad | None = None  # its latest NodeMonitor message
    load_at: float = -1e9  # monotonic time it came
    model: ModelView = field(default_factory=ModelView)
    # This coordinator's requests there -> tokens: on a decode node, its streams (their context);
    # on a prefill node, the streams it serves whole (--colocate), its prefill calls being in ``prefills``.
    inflight: Tally = field(default_factory=lambda: Tally())
    prefills: Tally = field(default_factory=lambda: Tally())  # a prefill node's prefill calls -> tokens to compute
    sent: Tally = field(default_factory=lambda: Tally())  # of those, the ones sent to its engine (past their turn)
    prefilling: Tally = field(default_factory=lambda: Tally())  # of those, local prefills not done yet -> tokens
    prefilling_since: dict[int, float] = field(default_factory=dict)  # -> when each was sent (perf_counter)
    # -> the model's time for each one's prefill alone, as admission predicted it (its held prefix's
    # attention and its store load in it); absent: not predicted (its tokens say)
    prefilling_run_s: dict[int, float] = field(default_factory=dict)
    prefilled_at: float = 0.0  # when the last local prefill there ended (perf_counter)
    # Of those, streams reserved there whose KV is being prefilled elsewhere -> prompt tokens: the
    # node has not seen them yet, and their blocks come out of its free KV room when they arrive.
    awaiting: Tally = field(default_factory=lambda: Tally())
    # On a decode node: of this coordinator's requests there, those whose tokens to come it knows
    # (-> a callable saying how many), and the requests it sent there lately (admission's forward view).
    left: dict[int, Callable[[], int]] = field(default_factory=dict)
    # Of those with a TPOT objective: (seconds it has left within it, tokens it has left to make),
    # asked with the time now (perf_counter); None once nothing is left to protect (admission's
    # check that a newcomer pushes no running stream past its objective, pace.pushed).
    budgets: dict[int, Callable[[float], tuple[float, int] | None]] = field(default_factory=dict)
    arrivals: Arrivals = field(default_factory=lambda: Arrivals())
    # How this node's predictions turn out, per kind (ttft, ttft_local, tpot), learned online from
    # its finished requests (calibration.py).
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    chunks: ChunkIndex = field(default_factory=ChunkIndex)  # what its KV store holds (prefix routing)
    blocks: ChunkIndex = field(default_factory=ChunkIndex)  # what its engine's prefix cache holds
    call_mode: str = "stream"  # its Prefill / Decode calls: on one NodeCalls stream, or a gRPC call each
    pace_on: bool = True  # TTFT predictions take its pace now (--pace)
    stub: object = field(init=False)
    stream: NodeStream | None = field(init=False, default=None)  # with call_mode "stream"
    health: object = field(init=False)
    monitor: object = field(init=False)
    watcher: asyncio.Task[None] | None = None
    _fits: object = None  # the fits the model was last built from (NodeLoad.fits)
    # its latest load message's prefills' pace (``PACE_OF``): (log deviation, age in seconds when
    # sent); None without a valid reading
    _pace: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self._bind()

    def redial(self, channel: grpc.aio.Channel) -> grpc.aio.Channel:
        """New calls go on ``channel``; the old one is returned (calls on it run on until it closes)."""
        old, self.channel = self.channel, channel
        self.retire()
        self._bind()
        return old

    def retire(self) -> None:
        """No new calls on its call stream; the calls on it run to their end (a node that left,
        a channel replaced)."""
        if self.stream is not None:
            self.stream.retire()

    @property
    def calls(self) -> object:
        """What its Prefill and Decode calls are made on: its call stream, or its stub."""
        return self.stream if self.stream is not None else self.stub

    def _bind(self) -> None:
        if self.record.role == "prefill":
            self.stub = _PrefillStub(self.channel)
        else:
            self.stub = pb_grpc.DecodeNodeStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.monitor = pb_grpc.NodeMonitorStub(self.channel)
        self.stream = (NodeStream(self.channel, f"{self.record.role} node {self.record.node_id}")
                       if call_mode_of(self.call_mode) == "stream" else None)

    def fresh_load(self) -> pb.NodeLoad | None:
        """Its latest load message, unless the stream went quiet."""
        return self.load if time.monotonic() - self.load_at < LOAD_STALE_S else None

    def saw_load(self, msg: pb.NodeLoad) -> None:
        self.load, self.load_at = msg, time.monotonic()
        # (a reading that is not three finite numbers, age at least 0, is no reading: one bad message
        # must not make every prediction here NaN)
        paces = [f.coefficients for f in msg.paces if f.name == PACE_OF and len(f.coefficients) == 3
                 and all(math.isfinite(c) for c in f.coefficients) and f.coefficients[2] >= 0]
        self._pace = (paces[0][0], paces[0][2]) if paces else None
        if msg.eng_whole or msg.eng_held or msg.eng_gone or msg.eng_namespace:
            self.blocks.update(msg.eng_whole, msg.eng_held, (), msg.eng_gone, msg.eng_namespace, msg.eng_block_tokens)
        if msg.kv_whole or msg.kv_ram or msg.kv_disk or msg.kv_gone or msg.kv_namespace:
            self.chunks.update(msg.kv_whole, msg.kv_ram, msg.kv_disk, msg.kv_gone, msg.kv_namespace,
                               msg.kv_chunk_tokens)
        if msg.fits != self._fits:  # most load messages carry the fits unchanged: rebuilt only when not
            self._fits = msg.fits
            fits = {f.name: FitView(tuple(f.terms), tuple(f.coefficients), int(f.samples)) for f in msg.fits}
            empty = FitView((), (), 0)
            self.model = ModelView(**{name: fits.get(name, empty) for name in FITS})

    def calibrated(self, kind: str, raw_s: float) -> float:
        """A raw ``kind`` prediction for this node (the fitted model's), as its finished requests
        say such predictions turn out (itself until one has finished), and for a TTFT as fast as
        the node runs now (``pace``; with --pace on)."""
        c = self.calibrations.get(kind)
        out = c(raw_s) if c is not None else raw_s
        return out * self.pace()[0] if self.paced and kind in PACE_KINDS else out

    @property
    def paced(self) -> bool:
        """Its TTFT predictions take its pace (--pace on, and a role whose pace foretells them)."""
        return self.pace_on and self.record.role in PACE_ROLES

    def pace(self) -> tuple[float, float, float]:
        """(what a TTFT prediction here is scaled by, the log deviation it stood on, its age in
        seconds): the node's prefills' pace (``PACE_OF``), faded with its age; (1, 0, inf) without
        one."""
        if self._pace is None or self.fresh_load() is None:
            return 1.0, 0.0, math.inf
        deviation, age = self._pace
        age += max(0.0, time.monotonic() - self.load_at)
        return math.exp(PACE_GAIN * deviation * math.exp(-age / PACE_HOLD_S)), deviation, age

    def factor(self, kind: str, raw_s: float) -> float:
        """``calibrated(kind, raw_s)`` over ``raw_s``: what the log calls the learned factor."""
        return self.calibrated(kind, raw_s) / raw_s if raw_s > 0 else 1.0

    def calibrate(self, kind: str, model_s: float, actual_s: float) -> None:
        """One finished request: what the fitted model alone predicted for it against what it took."""
        c = self.calibrations.get(kind)
        if c is None:
            c = self.calibrations[kind] = Calibration.of(kind)
        c.learn(model_s, actual_s)
        m.export_calibration(self.node_id, kind, *(c.line() or (0.0, c(1.0))))

    @property
    def node_id(self) -> str:
        return self.record.node_id

    @property
    def up(self) -> bool:
        return self.down_since is None
