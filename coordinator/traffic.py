"""Who goes first and who is over their share: priority classes and per-tenant token quotas.

Priorities. An ``interactive`` request (the default) is admitted or refused at
once (admission.py). A ``batch`` request never competes with them: it waits in
the coordinator's bounded FIFO queue until the node it would start on has no
prefill queued (the load streams and this coordinator's own requests say so)
and its own SLO, if it has one, is predicted to be met; it is dropped, with
RESOURCE_EXHAUSTED / 429, only when its wait runs out (``--batch-max-wait-s``
or the client's own deadline) or when the queue is full. So under overload
batch work stops first and interactive requests are refused only once no
batch work is left to stop.

Quotas. Each tenant (a request field, or with API keys on the key's tenant) has
a token bucket of ``rate`` tokens a second holding at most ``burst_s`` seconds
of them; a request reserves its prompt tokens plus ``max_tokens`` and is refused
(429, with the Retry-After when the bucket will hold enough) when the bucket
cannot pay; the output tokens it did not produce go back when it ends. Tenants without a quota of their own share none: the default
quota applies to each of them separately; no default means unlimited.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.errors import InvalidRequest, Rejected

from . import metrics as m
from .admission import Admission, Plan, Slo

logger = logging.getLogger(__name__)

PRIORITIES = ("interactive", "batch")
MAX_IDLE_BUCKETS = 10_000  # past this many tenants' buckets, full ones are forgotten
MAX_TENANT_CHARS = 64
POLL_S = 0.05


def check_priority(priority: str) -> str:
    p = priority or "interactive"
    if p not in PRIORITIES:
        raise InvalidRequest(f"priority must be one of {', '.join(PRIORITIES)}, got {priority[:40]!r}")
    return p


def check_tenant(tenant: str) -> str:
    if len(tenant) > MAX_TENANT_CHARS or not tenant.isprintable():
        raise InvalidRequest(f"tenant must be at most {MAX_TENANT_CHARS} printable characters")
    return tenant


# quotas ----------------------------------------------------------------------
@dataclass
class TokenBucket:
    rate: float  # tokens per second
    capacity: float
    tokens: float = field(init=False)
    at: float = field(init=False, default=-1.0)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self, n: float, now: float) -> float:
        """Take ``n`` tokens now (returns 0), or take none and return the seconds until the
        bucket will hold ``n`` (inf when it never will)."""
        if self.at >= 0:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if n <= self.tokens:
            self.tokens -= n
            return 0.0
        if n > self.capacity:
            return math.inf
        return (n - self.tokens) / self.rate


def parse_quotas(spec: str) -> dict[str, float]:
    """'acme=2000,beta=500' -> tokens per second per tenant; ValueError naming the bad part."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, rate = part.partition("=")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not sep or not name or not value > 0 or not math.isfinite(value):
            raise ValueError(f"--tenant-quota: {part!r} is not TENANT=TOKENS_PER_SECOND (a positive number)")
        out[check_tenant(name.strip())] = value
    return out


class Quotas:
    def __init__(self, per_tenant: dict[str, float] | None = None, default_rate: float = 0.0, burst_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_tenant = dict(per_tenant or {})
        self.default_rate = default_rate
        self.burst_s = burst_s
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def refund(self, tenant: str, tokens: int) -> None:
        """Give back what a request that was then refused (or cancelled while waiting) paid."""
        bucket = self._buckets.get(tenant)
        if bucket is not None:
            bucket.tokens = min(bucket.capacity, bucket.tokens + tokens)

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: a new one starts full anyway (bounded memory)."""
        for name, b in list(self._buckets.items()):
            if b.tokens + (now - b.at) * b.rate >= b.capacity:
                del self._buckets[name]

    def charge(self, tenant: str, tokens: int) -> None:
        """Pay for a request or raise Rejected."""
        rate = self.per_tenant.get(tenant, self.default_rate)
        if not rate:
            return
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket(rate, rate * self.burst_s)
        now = self.clock()
        if len(self._buckets) > MAX_IDLE_BUCKETS:
            self._forget_full(now)
            self._buckets[tenant] = bucket  # this one is in use: what it is charged now must stay charged
        wait = bucket.take(tokens, now)
        if not wait:
            return
        m.ADMISSIONS.labels("over_quota").inc()
        who = f"tenant {tenant!r}" if tenant else "requests without a tenant"
        if math.isinf(wait):
            raise Rejected(f"{who} may use {rate:g} tokens/s (bursts up to {bucket.capacity:.0f}); this request "
                           f"needs {tokens} (prompt + max_tokens), more than a full bucket", None, None, None)
        raise Rejected(f"{who} is over its quota of {rate:g} tokens/s; this request needs {tokens} tokens "
                       f"(prompt + max_tokens), available in {wait:.1f} s", None, None, max(1, math.ceil(wait)))


# batch queue -----------------------------------------------------------------
@dataclass
class _Waiting:
    rid: str
    prompt_tokens: int
    max_tokens: int
    slo: Slo
    arrived: float  # monotonic
    deadline: float
    done: asyncio.Future[Plan]


class BatchQueue:
    def __init__(self, admission: Admission, size: int = 256, max_wait_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.admission = admission
        self.size = size
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._queue: deque[_Waiting] = deque()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    async def admit(self, rid: str, prompt_tokens: int, max_tokens: int, slo: Slo,
                    client_deadline_s: float | None = None) -> Plan:
        """Wait for spare capacity; the plan to start on, or Rejected."""
        if len(self._queue) >= self.size:
            m.ADMISSIONS.labels("batch_queue_full").inc()
            raise Rejected(f"the batch queue is full ({self.size} requests wait for spare capacity)", None, None,
                           max(1, math.ceil(self.max_wait_s / 10)))
        wait = self.max_wait_s if client_deadline_s is None else min(self.max_wait_s, client_deadline_s)
        now = self.clock()
        w = _Waiting(rid, prompt_tokens, max_tokens, slo, now, now + wait, asyncio.get_running_loop().create_future())
        self._queue.append(w)
        m.BATCH_QUEUE.set(len(self._queue))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="batch-queue")
        try:
            return await w.done
        finally:
            if w in self._queue:  # cancelled by its client while waiting
                self._queue.remove(w)
            m.BATCH_QUEUE.set(len(self._queue))

    def _spare(self, w: _Waiting) -> Plan | None:
        """The plan for ``w`` if the node it would start on has nothing queued, else None. Its TTFT
        objective counts from its arrival: what it waited is gone from it, and from the prediction.
        Rejected when its objective can no longer be met (never, or not in the time left)."""
        waited = self.clock() - w.arrived
        slo = w.slo.over(self.admission.default_slo)  # the cluster's default counts from arrival too
        if slo.ttft_s is not None:
            if slo.ttft_s <= waited:
                raise Rejected(f"batch request {w.rid} waited {waited:.1f} s for spare capacity, past its TTFT "
                               f"objective of {slo.ttft_s * 1000:.0f} ms", None, None, None)
            slo = Slo(slo.ttft_s - waited, slo.tpot_s)
        try:
            plan = self.admission.plan(w.rid, w.prompt_tokens, w.max_tokens, slo, count=False)
        except Rejected as err:
            if err.retry_after_s is None:  # not even an idle node meets it: waiting cannot help
                raise Rejected(f"batch request {w.rid} (waited {waited:.1f} s): {err}", err.ttft_s, err.tpot_s,
                               None) from None
            return None  # its own SLO cannot be met now: it waits for less load
        if plan.queued_s:
            return None
        if plan.ttft_s is not None:
            plan.ttft_s += waited
            plan.waited_s = waited
        return plan

    async def _dispatch(self) -> None:
        """Release the head of the queue whenever there is spare capacity; expire the others."""
        while self._queue:
            now = self.clock()
            for w in [w for w in self._queue if w.deadline <= now and not w.done.done()]:
                self._queue.remove(w)
                m.ADMISSIONS.labels("batch_expired").inc()
                w.done.set_exception(Rejected(f"batch request {w.rid} found no spare capacity in "
                                              f"{self.max_wait_s:.0f} s (or before its deadline)", None, None, None))
            while self._queue and self._queue[0].done.done():
                self._queue.popleft()
            if self._queue:
                head = self._queue[0]
                try:
                    plan = self._spare(head)
                except Exception as exc:  # refused for good, or a bug: this request ends, the queue goes on
                    self._queue.popleft()
                    if not isinstance(exc, Rejected):
                        logger.exception("batch queue: request %s failed in admission", head.rid)
                    m.ADMISSIONS.labels("rejected").inc()
                    head.done.set_exception(exc)
                    continue
                if plan is not None:
                    self._queue.popleft()
                    m.ADMISSIONS.labels("batch_admitted").inc()
                    head.done.set_result(plan)
                    # The next one waits a poll: by then this one's prefill is in the router's counts.
            await asyncio.sleep(POLL_S)
