"""Open-loop load generator: sends a trace's requests at their arrival times, never waiting for replies.

Targets: an OpenAI-compatible server (``http://host:port``; /v1/completions,
streaming, token-id prompts, ``ignore_eos`` so outputs have their planned
length) or Tandem's coordinator over gRPC (``tandem-grpc://host:port``).
One asyncio process (uvloop); its own CPU use is reported with the results so
a saturated client is visible.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from dataclasses import dataclass, field

from tandem.tls import TlsConfig

from .metrics import RequestTiming
from .workloads import TraceEntry


@dataclass(frozen=True)
class Dial:
    """How the load generator reaches a secured target: TLS (https:// or a TLS coordinator's gRPC
    port; a CA alone verifies a front door that asks for no certificate) and an API key (default
    TANDEM_API_KEY), sent as ``authorization: Bearer``."""

    tls: TlsConfig = field(default_factory=TlsConfig)
    api_key: str = field(default_factory=lambda: os.environ.get("TANDEM_API_KEY", ""))

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def ssl_context(self, url: str) -> object:
        """For an https URL: verified with the CA, showing the certificate; None for http."""
        return self.tls.client_ssl_context() if url.startswith("https://") else None


@dataclass
class RunResult:
    timings: list[RequestTiming]
    duration_s: float
    client_cpu_s: float


def _ms(v: str | None) -> float | None:
    return float(v) / 1000.0 if v else None


async def _openai_one(session: object, url: str, model: str, e: TraceEntry, t0: float,
                      timeout_s: float, slo_headers: dict[str, str]) -> RequestTiming:
    """``slo_headers``: also the API key's (they all go with the request)."""
    import aiohttp

    rt = RequestTiming(sent=time.perf_counter() - t0, prompt_tokens=e.input_len)
    if e.ttft_scale is not None and "x-slo-ttft-ms" in slo_headers:  # an SLO tier of its own
        rt.slo_ttft = float(slo_headers["x-slo-ttft-ms"]) / 1000 * e.ttft_scale
        slo_headers = {**slo_headers, "x-slo-ttft-ms": f"{rt.slo_ttft * 1000:.3f}"}
    body = {"model": model, "prompt": e.input_ids, "max_tokens": e.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with session.post(url, json=body, headers=slo_headers,  # type: ignore[attr-defined]
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                rt.ok, rt.error = False, f"HTTP {resp.status}: {(await resp.text())[:200]}"
                rt.rejected = resp.status == 429
                # Tandem leaves Retry-After out when not even an idle node could meet the SLO.
                rt.hopeless = rt.rejected and "retry-after" not in resp.headers
                return rt
            # Tandem says what its admission predicted and where the prompt was prefilled.
            rt.predicted_ttft = _ms(resp.headers.get("x-tandem-predicted-ttft-ms"))
            rt.predicted_tpot = _ms(resp.headers.get("x-tandem-predicted-tpot-ms"))
            if "x-tandem-prefill" in resp.headers:
                rt.local_prefill = resp.headers["x-tandem-prefill"] == "local"
                rt.colocated = resp.headers["x-tandem-prefill"] == "colocated"
            rt.prefill_node = resp.headers.get("x-tandem-prefill-node", "")
            rt.decode_node = resp.headers.get("x-tandem-decode-node", "")
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    rt.ok, rt.error = False, str(msg["error"])[:200]
                    break
                now = time.perf_counter() - t0
                if msg.get("choices"):
                    if msg["choices"][0].get("text") or rt.first_token is None:
                        if rt.first_token is None:
                            rt.first_token = now
                        rt.token_times.append(now)
                elif msg.get("usage"):
                    rt.output_tokens = int(msg["usage"].get("completion_tokens") or 0)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        rt.ok, rt.error = False, f"{type(exc).__name__}: {exc}"
    if rt.ok and rt.output_tokens == 0:
        rt.output_tokens = len(rt.token_times)
    return rt


async def _grpc_one(stub: object, e: TraceEntry, t0: float, timeout_s: float,
                    slo: tuple[float | None, float | None], metadata: tuple[tuple[str, str], ...] = ()) -> RequestTiming:
    import grpc

    from tandem.proto import tandem_pb2 as pb

    rt = RequestTiming(sent=time.perf_counter() - t0, prompt_tokens=e.input_len)
    if e.ttft_scale is not None and slo[0] is not None:  # an SLO tier of its own
        rt.slo_ttft = slo[0] * e.ttft_scale
        slo = (rt.slo_ttft, slo[1])
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=e.input_ids or []), sampling=pb.SamplingParams(
        max_tokens=e.output_len, temperature=0.0, ignore_eos=True))
    if slo[0] is not None:
        req.slo.ttft_ms = slo[0] * 1000
    if slo[1] is not None:
        req.slo.tpot_ms = slo[1] * 1000
    try:
        async for msg in stub.Generate(req, timeout=timeout_s, metadata=metadata):  # type: ignore[attr-defined]
            if msg.token_ids:
                now = time.perf_counter() - t0
                if rt.first_token is None:
                    rt.first_token = now
                rt.token_times.extend([now] * len(msg.token_ids))
                rt.output_tokens += len(msg.token_ids)
            if msg.HasField("finish"):
                t = msg.finish.timings
                rt.predicted_ttft = t.predicted_ttft_s or None
                rt.predicted_tpot = t.predicted_tpot_s or None
                rt.local_prefill, rt.colocated = t.local_prefill and not t.colocated, t.colocated
                rt.prefill_node, rt.decode_node = t.prefill_node, t.decode_node
                rt.server = {"ttft_s": t.ttft_s, "dispatch_s": t.dispatch_s, "prefill_call_s": t.prefill_call_s,
                             "prefill_s": t.prefill_s}
    except grpc.aio.AioRpcError as exc:
        rt.ok, rt.error = False, f"{exc.code().name}: {exc.details()}"
        rt.rejected = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(exc.trailing_metadata() or ())
        rt.hopeless = rt.rejected and "retry-after" not in trailers
    return rt


async def run_trace(target: str, entries: list[TraceEntry], *, model: str = "", timeout_s: float = 600.0,
                    on_done: object = None, slo: tuple[float | None, float | None] = (None, None),
                    dial: Dial | None = None) -> RunResult:
    """Send every entry at its arrival time (relative to now); wait for all to finish. ``slo``
    (seconds) goes with each request (x-slo-* headers, or GenerateRequest.slo), its TTFT
    objective scaled by the entry's ``ttft_scale`` where it has one: Tandem admits and orders by
    it, other servers ignore it. ``dial``: TLS and the API key (default: TANDEM_API_KEY, no TLS)."""
    dial = dial or Dial()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[RequestTiming]] = []
    if target.startswith("tandem-grpc://"):
        from tandem.proto import tandem_pb2_grpc as pb_grpc

        channel = dial.tls.aio_channel(target.removeprefix("tandem-grpc://"))
        stub = pb_grpc.CoordinatorStub(channel)
        metadata = tuple(dial.headers.items())

        def start(e: TraceEntry) -> asyncio.Task[RequestTiming]:
            return asyncio.create_task(_grpc_one(stub, e, t0, timeout_s, slo, metadata))
        closer = channel.close
    elif target.startswith(("http://", "https://")):
        import aiohttp

        ctx = dial.ssl_context(target)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=ctx if ctx else True))
        url = target.rstrip("/") + "/v1/completions"
        slo_headers = {f"x-slo-{k}-ms": f"{v * 1000:.3f}" for k, v in zip(("ttft", "tpot"), slo) if v is not None}
        slo_headers.update(dial.headers)

        def start(e: TraceEntry) -> asyncio.Task[RequestTiming]:
            return asyncio.create_task(_openai_one(session, url, model, e, t0, timeout_s, slo_headers))
        closer = session.close
    else:
        raise ValueError(f"unknown target {target!r}; use http://HOST:PORT or tandem-grpc://HOST:PORT")
    try:
        for e in entries:
            delay = e.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            task = start(e)
            if callable(on_done):
                task.add_done_callback(lambda _t: on_done())  # type: ignore[misc]
            tasks.append(task)
        timings = list(await asyncio.gather(*tasks))
    finally:
        await closer()
    duration = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return RunResult(timings, duration, cpu)
