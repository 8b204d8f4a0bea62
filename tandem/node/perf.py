"""This node's own timings, as its requests run, fitted into a ``NodeModel`` and exported.

Prefill: a prefill that ran alone (no other prefill on this node started or
was running meanwhile) is one sample of (uncached prompt tokens, seconds).
Overlapping prefills share the engine's steps, so their times say little about
either one; a node kept busy still gets samples whenever the queue runs dry,
and the forgetting fit keeps the last ones. Decode: each gap between two
outputs of one stream is one step of the batch running then (the streams that
have begun producing tokens, and their context tokens in all).

The fitted coefficients and sample counts are Prometheus gauges
(``tandem_perf_coefficient{model,term}``, ``tandem_perf_samples{model}``),
refreshed at most once a second. The coordinator's use of them (predicting
TTFT and TPOT per candidate node, admitting or rejecting) comes with issue 8.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import Gauge

from tandem.perfmodel import NodeModel, OnlineFit

COEFFICIENT = Gauge("tandem_perf_coefficient", "A fitted coefficient of this node's performance model "
                    "(seconds per unit of the term)", ["model", "term"])
SAMPLES = Gauge("tandem_perf_samples", "Timings the node's performance model was fitted from", ["model"])
EXPORT_EVERY_S = 1.0


@dataclass
class PrefillRun:
    uncached_tokens: int | None = None


@dataclass
class _Stream:
    context: int  # prompt plus tokens produced so far
    last_output: float | None = None  # monotonic; None until its first token


class NodePerf:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = NodeModel()
        self._clock = clock
        self._prefills_running = 0
        self._prefill_starts = 0
        self._streams: dict[str, _Stream] = {}
        # The batch: streams that have produced a token, and their context tokens in all
        # (kept as running totals: a pass over every stream on every token would cost B² a step).
        self._batch = 0
        self._batch_context = 0
        self._exported_at = -float("inf")

    # prefill -------------------------------------------------------------------
    @contextmanager
    def prefill(self) -> Iterator[PrefillRun]:
        """Around one prefill; the caller sets ``run.uncached_tokens`` once the engine said how many
        prompt tokens it found cached. A sample is taken if it completes having run alone."""
        alone = self._prefills_running == 0
        self._prefills_running += 1
        self._prefill_starts += 1
        starts, t0 = self._prefill_starts, self._clock()
        run = PrefillRun()
        ok = False
        try:
            yield run
            ok = True
        finally:
            self._prefills_running -= 1
            if ok and alone and self._prefill_starts == starts and run.uncached_tokens is not None:
                self.model.saw_prefill(run.uncached_tokens, self._clock() - t0)
            self._export(force=self._prefills_running == 0)  # idle now: show the last samples too

    # decode --------------------------------------------------------------------
    def decode_started(self, rid: str, context_tokens: int) -> None:
        self._streams[rid] = _Stream(context_tokens)

    def decode_output(self, rid: str, new_tokens: int) -> None:
        s = self._streams.get(rid)
        if s is None or new_tokens <= 0:
            return
        now = self._clock()
        if s.last_output is None:  # its first token: it joins the batch
            self._batch += 1
            self._batch_context += s.context
        elif new_tokens == 1:  # one step since its last output (several: coalesced, no sample)
            self.model.saw_decode_step(self._batch, self._batch_context, now - s.last_output)
            self._export()
        s.last_output = now
        s.context += new_tokens
        self._batch_context += new_tokens

    def decode_ended(self, rid: str) -> None:
        s = self._streams.pop(rid, None)
        if s is not None and s.last_output is not None:
            self._batch -= 1
            self._batch_context -= s.context
        if not self._streams:
            self._export(force=True)  # idle now: show the last samples too

    # export --------------------------------------------------------------------
    def _export(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._exported_at < EXPORT_EVERY_S:
            return
        self._exported_at = now
        for name, fit in (("prefill", self.model.prefill), ("decode", self.model.decode),
                          ("transfer", self.model.transfer)):
            _export_fit(name, fit)


def _export_fit(name: str, fit: OnlineFit) -> None:
    SAMPLES.labels(name).set(fit.samples)
    if fit.samples:
        for term, c in zip(fit.names, fit.coefficients()):
            COEFFICIENT.labels(name, term).set(c)
