"""OpenAI-compatible HTTP API on the coordinator (aiohttp).

/v1/completions and /v1/chat/completions (SSE streaming or one JSON body),
/v1/models and /v1/models/{id}, vLLM's /tokenize, /detokenize and /version,
/health (liveness: the process serves), /ready (a request can be served: both pools have a node,
or the decode pool alone when it prefills too), /metrics.
Request bodies are the pydantic models of ``openai_protocol``; errors use
OpenAI's error body.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import aclosing
from json.encoder import encode_basestring_ascii  # what json.dumps makes of a str
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import tandem
from tandem.errors import InvalidRequest, TandemError, openai_error_body

from . import openai_protocol as proto

from .admission import Slo
from .auth import ApiKeys
from .pipeline import Pipeline
from .request import FinishEvent, TokenEvent
from .workers import metrics_page

logger = logging.getLogger(__name__)

def slo_from_headers(request: web.Request) -> Slo:
    """x-slo-ttft-ms / x-slo-tpot-ms, milliseconds; a bad value is a 400 naming the header."""
    def one(name: str) -> float | None:
        raw = request.headers.get(name)
        if raw is None:
            return None
        try:
            return float(raw)
        except ValueError:
            raise InvalidRequest(f"header {name} must be a number of milliseconds, got {raw[:40]!r}") from None

    return Slo.from_ms(one("x-slo-ttft-ms"), one("x-slo-tpot-ms"), where="header x-slo-")


# What an API key guards (with keys on); probes, metrics and the version stay open, as in vLLM.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/version"})


class OpenAIHttp:
    def __init__(self, pipeline: Pipeline, keys: ApiKeys | None = None) -> None:
        self.pipeline = pipeline
        self.keys = keys or ApiKeys(env="")
        self.app = web.Application(client_max_size=8 << 20, middlewares=[self._errors])
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model_id:.+}", self.model),
            web.post("/tokenize", self.tokenize),
            web.post("/detokenize", self.detokenize),
            web.get("/version", self.version),
            web.get("/health", self.health),
            web.get("/ready", self.ready),
            web.get("/metrics", self.metrics),
        ])

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if request.path not in OPEN_PATHS:
                request["tenant"] = self.keys.tenant(request.headers.get("Authorization"),
                                                     request.headers.get("x-tenant", ""))
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = {"error": {"message": exc.reason, "type": "invalid_request_error", "param": None,
                              "code": exc.status}}
            return web.json_response(body, status=exc.status)
        except Exception as exc:
            if not isinstance(exc, TandemError):
                logger.exception("HTTP %s failed", request.path)
            status, body = openai_error_body(exc)
            headers = exc.details() if isinstance(exc, TandemError) else {}
            return web.json_response(body, status=status, headers=headers)

    async def _json(self, request: web.Request) -> object:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"malformed JSON body: {exc}") from exc

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body: proto.CompletionRequest = proto.parse(proto.CompletionRequest, await self._json(request))
        text, ids = body.text_or_ids()
        return await self._serve(request, body, text, ids, body.sampling(proto.COMPLETION_DEFAULT_MAX_TOKENS),
                                 chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: proto.ChatRequest = proto.parse(proto.ChatRequest, await self._json(request))
        self.pipeline.check_model(body.model or "")
        ids = await self.pipeline.codec.encode_chat_async(body.plain_messages())
        # as vLLM's chat API: with no limit given, the output may fill the rest of the context
        sampling = body.sampling(max(1, self.pipeline.max_model_len() - len(ids)))
        return await self._serve(request, body, None, ids, sampling, chat=True)

    async def _serve(self, request: web.Request, body: proto.ChatRequest | proto.CompletionRequest, text: str | None,
                     ids: list[int] | None, sampling: Any, chat: bool) -> web.StreamResponse:
        rid = body.request_id or request.headers.get("X-Request-Id") or ""
        prepared = await self.pipeline.prepare_async(request_id=rid, text=text, token_ids=ids,
                                         sampling=sampling, model=body.model or "", slo=slo_from_headers(request),
                                         priority=request.headers.get("x-priority", ""),
                                         tenant=request["tenant"])
        prefix = "chatcmpl" if chat else "cmpl"
        oid = f"{prefix}-{prepared.public_id}"
        created = int(time.time())
        served = self.pipeline.served_model
        obj = "chat.completion.chunk" if chat else "text_completion"

        if body.stream:
            include_usage, continuous = body.usage_options()
            events = self.pipeline.run(prepared)
            # The first event (the first token) comes before the headers, so that a
            # request that fails in routing or prefill still gets a proper HTTP error.
            head = await events.__anext__()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **prepared.plan_headers()})
            try:
                await resp.prepare(request)
            except BaseException:  # (the client went away): the request's work ends now, not when collected
                await events.aclose()
                raise
            sse = SseChunks({"id": oid, "object": obj, "created": created, "model": served}, chat, include_usage,
                            len(prepared.prompt_ids) if continuous else None)
            try:
                async with aclosing(events):
                    await resp.write(sse.event(head))
                    async for ev in events:
                        await resp.write(sse.event(ev))
            except Exception as exc:
                status, err = openai_error_body(exc)
                logger.warning("request %s: stream ended by error: %s", prepared.request_id, err["error"])
                await resp.write(f"data: {json.dumps(err)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

        parts: list[str] = []
        finish: FinishEvent | None = None
        async with aclosing(self.pipeline.run(prepared)) as events:
            async for ev in events:
                if isinstance(ev, TokenEvent):
                    parts.append(ev.text)
                elif isinstance(ev, FinishEvent):
                    finish = ev
        assert finish is not None
        full = "".join(parts)
        if chat:
            ch: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": full},
                                  "logprobs": None, "finish_reason": finish.reason}
            obj_name = "chat.completion"
        else:
            ch = {"index": 0, "text": full, "logprobs": None, "finish_reason": finish.reason}
            obj_name = "text_completion"
        return web.json_response({"id": oid, "object": obj_name, "created": created, "model": served,
                                  "choices": [ch], "usage": _usage(finish)}, headers=prepared.plan_headers())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.pipeline.served_model, "object": "model", "created": 0, "owned_by": "tandem",
                "root": self.pipeline.served_model, "parent": None, "max_model_len": self.pipeline.max_model_len()}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        wanted = request.match_info["model_id"]
        if wanted != self.pipeline.served_model:
            return web.json_response({"error": {"message": f"The model `{wanted}` does not exist.",
                                                "type": "NotFoundError", "param": "model", "code": 404}},
                                     status=404)
        return web.json_response(self._model_card())

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: a prompt, or chat messages as the chat API renders them."""
        raw = await self._json(request)
        codec = self.pipeline.codec
        body: proto.TokenizeChat | proto.TokenizeCompletion
        if isinstance(raw, dict) and "messages" in raw:
            body = proto.parse(proto.TokenizeChat, raw)
            self.pipeline.check_model(body.model or "")
            ids = await codec.encode_chat_async(body.plain_messages())
        else:
            body = proto.parse(proto.TokenizeCompletion, raw)
            self.pipeline.check_model(body.model or "")
            ids = await codec.encode_async(body.prompt, add_special_tokens=body.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.pipeline.max_model_len(), "tokens": ids,
                               "token_strs": codec.token_strs(ids) if body.return_token_strs else None}
        return web.json_response(out)

    async def detokenize(self, request: web.Request) -> web.Response:
        body: proto.DetokenizeRequest = proto.parse(proto.DetokenizeRequest, await self._json(request))
        self.pipeline.check_model(body.model or "")
        self.pipeline.codec.check_ids(body.tokens)
        # special tokens kept, as vLLM's /detokenize
        return web.json_response({"prompt": self.pipeline.codec.tok.decode(body.tokens, skip_special_tokens=False)})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": tandem.__version__})

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: this process answers. An empty pool is not a reason to restart it (see /ready)."""
        return web.json_response({"status": "ok", "nodes": self._pools()})

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness: both pools have a node, so a request can be served; or, with no prefill pool
        (P:D 0:N) and conditional disaggregation on, the decode pool alone (its nodes prefill)."""
        router = self.pipeline.router
        pools = {r: len(router.routable_nodes(r)) for r in ("prefill", "decode")}
        ok = pools["decode"] > 0 and (pools["prefill"] > 0 or (self.pipeline.admission.local and
                                                              router.pool_absent("prefill")))
        return web.json_response({"status": "ready" if ok else "not ready", "nodes": pools},
                                 status=200 if ok else 503)

    def _pools(self) -> dict[str, int]:
        return {r: len(self.pipeline.router.nodes(r)) for r in ("prefill", "decode")}

    async def metrics(self, request: web.Request) -> web.Response:
        # several workers behind this port (--workers): the sum over all of them
        body = metrics_page() or generate_latest()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _usage(ev: FinishEvent) -> dict[str, int]:
    return _counts(ev.prompt_tokens, ev.completion_tokens)


def _counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


_MARK = "\x00tandem-text\x00"  # stands for a chunk's text while its two parts around it are made


class SseChunks:
    """One streamed response's server-sent events, each chunk's JSON what ``json.dumps`` gives of its
    dict (OpenAI's chunk: id, object, created, model, choices, then usage when asked for on every
    chunk). A token chunk after the first, the common case, is its text's JSON string between two
    parts made once; the rest are made whole."""

    def __init__(self, head: dict[str, Any], chat: bool, include_usage: bool, running_from: int | None) -> None:
        self.head = head
        self.chat = chat
        self.include_usage = include_usage
        self.prompt_tokens = running_from  # usage so far on every chunk (continuous_usage_stats) when set
        self.completion_tokens = 0
        self.first = True
        self.around: tuple[str, str] | None = None
        if running_from is None:
            parts = f"data: {self._whole(_MARK, None, first=False)}\n\n".split(json.dumps(_MARK))
            if len(parts) == 2:  # (else the id or model held the mark: every chunk made whole)
                self.around = parts[0], parts[1]

    def _whole(self, text: str, finish: str | None, first: bool) -> str:
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        chunk = {**self.head, "choices": [choice]}
        if self.prompt_tokens is not None:
            chunk["usage"] = _counts(self.prompt_tokens, self.completion_tokens)
        return json.dumps(chunk)

    def event(self, ev: object) -> bytes:
        """What to write for a pipeline event: its chunk (a finish: and the usage chunk when asked)."""
        if isinstance(ev, TokenEvent):
            self.completion_tokens += len(ev.token_ids)
            if self.around is not None and not self.first:
                return f"{self.around[0]}{encode_basestring_ascii(ev.text)}{self.around[1]}".encode()
            out = f"data: {self._whole(ev.text, None, self.first)}\n\n"
        elif isinstance(ev, FinishEvent):
            out = f"data: {self._whole('', ev.reason, self.first)}\n\n"
            if self.include_usage:
                out += f"data: {json.dumps({**self.head, 'choices': [], 'usage': _usage(ev)})}\n\n"
        else:
            raise TypeError(f"no server-sent event for a {type(ev).__name__}")
        self.first = False
        return out.encode()
