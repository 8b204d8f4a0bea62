"""The coordinator's Prometheus metrics (vLLM's names where the meaning is the same).

Series with vLLM's names carry its ``model_name`` label and its bucket bounds, so
that dashboards written for vLLM work on Tandem's front door. Until ``bind()``
names the served model (at the coordinator's start) they carry an empty name.
The request-length histograms the live planner replays (``tandem plan --live``)
keep finer buckets under Tandem's own names.
"""

from __future__ import annotations

import contextlib
import os
from bisect import bisect_left

from prometheus_client import Counter, Gauge, Histogram

_LAT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOK = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)

# Per-request lengths, fine enough that `tandem plan --live` can replay the mix in its simulator.
LENGTHS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144,
           8192, 12288, 16384, 32768, 65536, 131072)

# vLLM's bucket bounds (vllm/v1/metrics/buckets.py, 0.32): the coordinator imports no vLLM.
VLLM_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0, 160.0, 640.0, 2560.0)
VLLM_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_REQUEST = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                960.0, 1920.0, 7680.0)
# vLLM's 1-2-5 token buckets (it caps them at the model's context; these go to 10M tokens)
VLLM_TOKENS = tuple(m * 10 ** e for e in range(8) for m in (1, 2, 5))
_MODEL = ["model_name"]

_TTFT = Histogram("vllm:time_to_first_token_seconds", "Request received to first token sent", _MODEL,
                  buckets=VLLM_TTFT)
_TPOT = Histogram("vllm:request_time_per_output_token_seconds", "Mean time per output token after the first",
                  _MODEL, buckets=VLLM_ITL)
_ITL = Histogram("vllm:inter_token_latency_seconds", "Gap between consecutive tokens sent", _MODEL, buckets=VLLM_ITL)
_E2E = Histogram("vllm:e2e_request_latency_seconds", "Request received to last token sent", _MODEL,
                 buckets=VLLM_REQUEST)
_QUEUE = Histogram("vllm:request_queue_time_seconds",
                   "Request received to its prefill call sent (admission, routing, its turn at the prefill node)",
                   _MODEL, buckets=VLLM_REQUEST)
PREFILL = Histogram("tandem_prefill_call_seconds", "Prefill call as the coordinator sees it", buckets=_LAT)
RUNNING = Gauge("tandem_requests_running", "Requests the coordinator is serving now", multiprocess_mode="livesum")
REQUESTS = Counter("tandem_requests", "Requests by how they ended", ["status"])
_PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Prompt tokens of admitted requests", _MODEL)
_GENERATION_TOKENS = Counter("vllm:generation_tokens", "Tokens streamed to clients", _MODEL)
MIGRATIONS = Counter("tandem_requests_migrated", "Requests re-issued to other nodes after a node failed mid-request",
                     ["from_role", "cause"])
RETRIES = Counter("tandem_prefill_retries", "Prefill calls retried on another node after a failure")
NODES_DOWN = Counter("tandem_nodes_marked_down", "Times a node was taken out of routing after a failed call",
                     ["role"])
ADMISSIONS = Counter("tandem_admission_decisions", "New requests by admission's decision: admitted, rejected, "
                     "over_slo_admitted (admission off), trial (a close miss tried on idle nodes), unpredicted (no node "
                     "model yet), over_quota, "
                     "batch_admitted, batch_queue_full, batch_expired", ["decision"])
OVERLOAD_MARGIN = Gauge("tandem_admission_overload_margin", "Share of the TPOT objective admission kept free at its "
                        "last decision, by the recent share of load refusals (coordinator/pressure.py)",
                        multiprocess_mode="livemostrecent")
# A node's predictions of one kind go through a line, learned online from its finished requests
# (coordinator/calibration.py): predicted = intercept + slope x the model's own; until a line can be
# fitted, the intercept is 0 and the slope a plain factor.
CALIBRATION = Gauge("tandem_prediction_calibration", "Slope of the line (a factor: intercept 0) a node's predictions "
                    "go through, learned online from its finished requests (kind: ttft, ttft_local, tpot)",
                    ["node", "kind"], multiprocess_mode="livemostrecent")
CALIBRATION_INTERCEPT = Gauge("tandem_prediction_calibration_intercept_seconds", "Intercept of that line",
                              ["node", "kind"], multiprocess_mode="livemostrecent")


def export_calibration(node_id: str, kind: str, intercept_s: float, slope: float) -> None:
    CALIBRATION.labels(node_id, kind).set(slope)
    CALIBRATION_INTERCEPT.labels(node_id, kind).set(intercept_s)


def forget_calibration(node_id: str, kind: str) -> None:
    """Drop a node's calibration series (it left). With several workers (multiprocess mode, which
    cannot remove a series) it stays until the worker ends."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    for gauge in (CALIBRATION, CALIBRATION_INTERCEPT):
        with contextlib.suppress(KeyError):
            gauge.remove(node_id, kind)


BATCH_QUEUE = Gauge("tandem_batch_queue_depth", "Batch requests waiting at the coordinator for spare capacity",
                    multiprocess_mode="livesum")
PREDICTION_ERROR = Histogram("tandem_prediction_error_ratio",
                             "|actual - predicted| / actual for each request's TTFT and TPOT", ["metric"],
                             buckets=(0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0))
PREFIX_TOKENS = Counter("tandem_routing_cached_tokens", "Prompt tokens the chosen node (a prefill node, or the "
                        "decode node for a local prefill) was known to hold when the request was routed (a prompt's prefix cached or loaded there, not computed), by where: "
                        "engine (its prefix cache), ram or disk (its KV store)", ["tier"])
_REQUEST_PROMPT_TOKENS = Histogram("vllm:request_prompt_tokens", "Prompt tokens of each finished request",
                                   _MODEL, buckets=VLLM_TOKENS)
_REQUEST_GENERATION_TOKENS = Histogram("vllm:request_generation_tokens", "Tokens streamed for each finished request",
                                       _MODEL, buckets=VLLM_TOKENS)
MIX_PROMPT_TOKENS = Histogram("tandem_request_prompt_tokens", "Prompt tokens of each finished request (the "
                              "buckets `tandem plan --live` replays)", buckets=LENGTHS)
MIX_GENERATION_TOKENS = Histogram("tandem_request_generation_tokens", "Tokens streamed for each finished request "
                                  "(the buckets `tandem plan --live` replays)", buckets=LENGTHS)
SLO_MET = Counter("tandem_requests_slo", "Requests that ended (not cancelled by their client) by how they fared "
                  "against their objectives: yes (served, TTFT and, past one token, TPOT met), no (missed one, "
                  "refused or failed), none (no objective: neither the request nor the coordinator set one)",
                  ["met"])

_FAMILIES = {"TTFT": _TTFT, "TPOT": _TPOT, "ITL": _ITL, "E2E": _E2E, "QUEUE": _QUEUE, "PROMPT_TOKENS": _PROMPT_TOKENS,
             "GENERATION_TOKENS": _GENERATION_TOKENS, "REQUEST_PROMPT_TOKENS": _REQUEST_PROMPT_TOKENS,
             "REQUEST_GENERATION_TOKENS": _REQUEST_GENERATION_TOKENS}
_bound = ""


def observe_many(hist: Histogram, value: float, n: int) -> None:
    """What ``n`` calls of ``hist.observe(value)`` record, at the cost of one: a group of tokens
    streamed together (``--stream-interval``), their gap spread over them, as vLLM counts per token.
    A call a token was a tenth of the coordinator's time relaying long outputs (twenty-first
    sitting). prometheus_client has no such call: this adds to the histogram's own parts as its
    ``observe`` does (0.26: ``_sum``, ``_upper_bounds``, ``_buckets``; a bisection for the bucket),
    and makes the calls when they are not there. For one (``n`` 1) it is the same, without
    ``observe``'s checks, which are for a histogram with labels still to give and for exemplars."""
    buckets = getattr(hist, "_buckets", None)
    if buckets is not None and hasattr(hist, "_sum") and hasattr(hist, "_upper_bounds"):
        hist._sum.inc(value * n)
        bounds = hist._upper_bounds
        i = bisect_left(bounds, value)  # the first bound >= value (the last is +Inf)
        buckets[min(i, len(bounds) - 1)].inc(n)
        return
    for _ in range(n):
        hist.observe(value)


def add(counter: Counter, n: float) -> None:
    """``counter.inc(n)`` for a counter with its labels given, without the checks of ``inc``
    (labels still to give, a negative ``n``): a call a streamed message (prometheus_client 0.26:
    ``_value``), ``inc`` when it is not there."""
    value = getattr(counter, "_value", None)
    if value is not None and n >= 0:
        value.inc(n)
    else:
        counter.inc(n)


def bind(model_name: str) -> None:
    """Name the served model on every vLLM-named series (once, before the first request)."""
    global _bound
    for attr, family in _FAMILIES.items():
        if _bound != model_name:
            with contextlib.suppress(KeyError):
                family.remove(_bound)
        globals()[attr] = family.labels(model_name)
    _bound = model_name


TTFT = _TTFT.labels("")
TPOT = _TPOT.labels("")
ITL = _ITL.labels("")
E2E = _E2E.labels("")
QUEUE = _QUEUE.labels("")
PROMPT_TOKENS = _PROMPT_TOKENS.labels("")
GENERATION_TOKENS = _GENERATION_TOKENS.labels("")
REQUEST_PROMPT_TOKENS = _REQUEST_PROMPT_TOKENS.labels("")
REQUEST_GENERATION_TOKENS = _REQUEST_GENERATION_TOKENS.labels("")
