"""A workload's mix of prompt and output lengths as a coordinator measured it.

The coordinator counts each finished request's prompt and output tokens in
two histograms (``tandem_request_prompt_tokens``, ``tandem_request_generation_tokens``:
vLLM's series of the same meaning, with its coarser 1-2-5 buckets, are beside them) and how each request that ended there fared
against its objectives (``tandem_requests_slo{met}``: yes; no, refused and
failed too; none, when it had no objective). Two scrapes some time apart give a window:
its arrival rate, its lengths, its measured attainment. `tandem plan --live`
simulates traces drawn from that window.

The histograms do not pair a request's prompt with its output, so a drawn
request takes each independently (what the simulator then misses: a
correlation between the two, if the workload has one).
"""

from __future__ import annotations

import bisect
import math
import random
import ssl
import urllib.request
from dataclasses import dataclass
from typing import Any

PROMPT = "tandem_request_prompt_tokens"  # finer buckets than vLLM's series of the same meaning
OUTPUT = "tandem_request_generation_tokens"
SLO = "tandem_requests_slo_total"


@dataclass(frozen=True)
class Scrape:
    """What one read of a coordinator's /metrics says, cumulative since it started."""

    at: float  # time.monotonic() of the read
    prompt: tuple[tuple[float, float], ...]  # (le, cumulative count), le ascending, +Inf last
    output: tuple[tuple[float, float], ...]
    prompt_sum: float
    output_sum: float
    met: float  # requests that ended meeting both their objectives
    missed: float  # ... missing one, refused or failed
    unjudged: float = 0.0  # ... with no objective to meet (neither the request nor the coordinator set one)
    started: float = 0.0  # the coordinator process's start time (0: not on the page)


def parse(text: str, at: float) -> Scrape:
    """A Scrape of a /metrics page; ValueError when the page lacks the histograms (a coordinator
    older than them, or not a coordinator)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[str, list[tuple[float, float]]] = {PROMPT: [], OUTPUT: []}
    sums = {PROMPT: 0.0, OUTPUT: 0.0}
    slo = {"yes": 0.0, "no": 0.0, "none": 0.0}
    started = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for name in (PROMPT, OUTPUT):
                if s.name == name + "_bucket":
                    buckets[name].append((float(s.labels["le"]), s.value))
                elif s.name == name + "_sum":
                    sums[name] = s.value
            if s.name == SLO and s.labels.get("met") in slo:
                slo[s.labels["met"]] += s.value
            elif s.name == "process_start_time_seconds":
                started = s.value
    if not buckets[PROMPT] or not buckets[OUTPUT]:
        raise ValueError(f"no {PROMPT} / {OUTPUT} histograms on that page: is it a Tandem coordinator's /metrics?")
    return Scrape(at, tuple(sorted(buckets[PROMPT])), tuple(sorted(buckets[OUTPUT])), sums[PROMPT], sums[OUTPUT],
                  slo["yes"], slo["no"], slo["none"], started)


def scrape(url: str, at: float, timeout_s: float = 5.0, context: ssl.SSLContext | None = None) -> Scrape:
    """``context``: how an https URL is verified (and the client certificate it shows)."""
    with urllib.request.urlopen(url, timeout=timeout_s, context=context) as r:
        return parse(r.read().decode(), at)


@dataclass(frozen=True)
class Mix:
    """One window: requests that ended in it (served, refused or failed), their rate, the lengths
    of those served as (lo, hi, count] buckets, and the share that met their objectives."""

    window_s: float
    requests: int  # ended in the window: the rate's numerator
    served: int  # of them, served to the end: the lengths' count
    prompt: tuple[tuple[float, float, float], ...]
    output: tuple[tuple[float, float, float], ...]
    mean_prompt: float
    mean_output: float
    attainment: float  # measured, of the requests that had an objective (nan: none had one)

    @property
    def rate(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0

    @classmethod
    def between(cls, a: Scrape, b: Scrape) -> Mix:
        """What ended after ``a`` and by ``b``, two reads of one coordinator; ValueError when it
        restarted in between (its start time changed, or a count went down) or the two reads
        have different buckets."""
        restarted = ValueError("the coordinator restarted between two reads: its counts start again")
        if a.started and b.started and a.started != b.started:
            raise restarted

        def delta(x: tuple[tuple[float, float], ...], y: tuple[tuple[float, float], ...]) -> list[tuple[float, float, float]]:
            if [le for le, _ in x] != [le for le, _ in y] and x:
                raise ValueError("two reads of the coordinator have different histogram buckets")
            before = dict(x)
            out, lo, prev = [], 0.0, 0.0
            for le, cum in y:
                got = cum - before.get(le, 0.0)
                if got < prev - 1e-9 or cum < before.get(le, 0.0):
                    raise restarted
                if got > prev:
                    out.append((lo, le, got - prev))
                lo, prev = le, got
            return out

        prompt, output = delta(a.prompt, b.prompt), delta(a.output, b.output)
        judged = (b.met + b.missed) - (a.met + a.missed)
        ended = judged + b.unjudged - a.unjudged
        n = sum(c for _, _, c in prompt)
        if min(b.met - a.met, b.missed - a.missed, b.unjudged - a.unjudged) < 0:
            raise restarted
        return cls(window_s=b.at - a.at, requests=int(round(max(ended, n))), served=int(round(n)),
                   prompt=tuple(prompt), output=tuple(output),
                   mean_prompt=(b.prompt_sum - a.prompt_sum) / n if n else 0.0,
                   mean_output=(b.output_sum - a.output_sum) / n if n else 0.0,
                   attainment=(b.met - a.met) / judged if judged > 0 else math.nan)

    def _draw(self, buckets: tuple[tuple[float, float, float], ...], rng: random.Random, cum: list[float]) -> int:
        i = bisect.bisect_right(cum, rng.random() * cum[-1])
        lo, hi, _ = buckets[min(i, len(buckets) - 1)]
        if math.isinf(hi):  # past the last finite bound: the bound itself
            return int(lo)
        return max(1, int(lo) + 1 + int(rng.random() * (hi - lo)))  # uniform in (lo, hi]

    def trace(self, rate: float, requests: int, seed: int, max_model_len: int) -> list[Any]:
        """About ``requests`` Poisson arrivals at ``rate`` with lengths drawn from this window."""
        from tandem.bench.workloads import TraceEntry, arrivals

        if not self.prompt or not self.output:
            raise ValueError("an empty window: no request finished in it")
        rng = random.Random(f"mix:{seed}")
        cp = list(_cumsum(c for _, _, c in self.prompt))
        co = list(_cumsum(c for _, _, c in self.output))
        out = []
        for t in arrivals(rng, rate, requests / rate):
            o = min(self._draw(self.output, rng, co), max(1, max_model_len // 4))
            p = min(self._draw(self.prompt, rng, cp), max_model_len - o - 1)
            out.append(TraceEntry(t, max(1, p), o))
        return out

    def shift(self, other: Mix) -> float:
        """How far this window's lengths moved from ``other``'s: the larger |log ratio| of the
        mean prompt and the mean output (0.1: about 10 %)."""
        def lr(x: float, y: float) -> float:
            return abs(math.log(max(x, 1.0) / max(y, 1.0)))

        return max(lr(self.mean_prompt, other.mean_prompt), lr(self.mean_output, other.mean_output))

    def describe(self) -> str:
        return (f"{self.requests} requests in {self.window_s:.0f} s ({self.rate:.2f} req/s), {self.served} served: prompt mean "
                f"{self.mean_prompt:.0f} tokens, output mean {self.mean_output:.0f}")


def _cumsum(xs: Any) -> Any:
    total = 0.0
    for x in xs:
        total += x
        yield total
