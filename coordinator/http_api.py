"""OpenAI-compatible HTTP API on the coordinator (aiohttp).

/v1/completions and /v1/chat/completions (SSE streaming or one JSON body),
/v1/models, /health, /metrics. Errors use OpenAI's error body. Fields that the
API names but Tandem does not implement are accepted only at their neutral
value; anything else, and any unknown field, is a 400 naming it.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import aclosing
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tandem.errors import InvalidRequest, TandemError, openai_error_body
from tandem.sampling import Sampling

from .admission import Slo
from .pipeline import FinishEvent, Pipeline, TokenEvent

logger = logging.getLogger(__name__)

_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
           "ignore_eos", "min_tokens", "user", "request_id"}
# Named by the API, accepted only at the value that changes nothing.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
    "min_p": (0, 0.0), "suffix": (None, ""), "logit_bias": (None, {}), "max_completion_tokens": (None,),
}
COMPLETION_FIELDS = _COMMON | {"prompt"}
CHAT_FIELDS = _COMMON | {"messages"}


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for k, v in body.items():
        if k in allowed:
            continue
        if k in _NEUTRAL:
            if v not in _NEUTRAL[k]:
                raise InvalidRequest(f"'{k}' is not supported by this server (only {_NEUTRAL[k][0]!r})")
            continue
        raise InvalidRequest(f"unknown field '{k}'")


def _typed(body: dict[str, Any], key: str, kinds: tuple[type, ...], default: object) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds:
        raise InvalidRequest(f"'{key}' must be {' or '.join(k.__name__ for k in kinds)}")
    if not isinstance(v, kinds):
        raise InvalidRequest(f"'{key}' must be {' or '.join(k.__name__ for k in kinds)}")
    return v


def sampling_from_body(body: dict[str, Any]) -> Sampling:
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidRequest("'stop' must be a string or a list of strings")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidRequest("'max_tokens' must be an integer")
    return Sampling(
        max_tokens=max_tokens,
        temperature=float(_typed(body, "temperature", (int, float), 1.0)),
        top_p=float(_typed(body, "top_p", (int, float), 1.0)),
        top_k=int(_typed(body, "top_k", (int,), 0)) if body.get("top_k") != -1 else 0,
        seed=_typed(body, "seed", (int,), None),
        stop=stops,
        ignore_eos=bool(_typed(body, "ignore_eos", (bool,), False)),
        min_tokens=int(_typed(body, "min_tokens", (int,), 0)),
    )


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


class OpenAIHttp:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.app = web.Application(client_max_size=8 << 20, middlewares=[self._errors])
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
        ])

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
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

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"malformed JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("the JSON body must be an object")
        return body

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        _check_fields(body, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        text: str | None = None
        ids: list[int] | None = None
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            text = prompt[0]
        elif prompt in (None, "", []):
            raise InvalidRequest("empty prompt")
        else:
            raise InvalidRequest("'prompt' must be a string or a list of token ids (batches are not supported)")
        return await self._serve(request, body, text, ids, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        _check_fields(body, CHAT_FIELDS)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty list")
        ids = await self.pipeline.codec.encode_chat_async(messages)
        return await self._serve(request, body, None, ids, chat=True)

    async def _serve(self, request: web.Request, body: dict[str, Any], text: str | None, ids: list[int] | None,
                     chat: bool) -> web.StreamResponse:
        model = body.get("model") or ""
        if not isinstance(model, str):
            raise InvalidRequest("'model' must be a string")
        rid = body.get("request_id") or request.headers.get("X-Request-Id") or ""
        prepared = await self.pipeline.prepare_async(request_id=str(rid), text=text, token_ids=ids,
                                         sampling=sampling_from_body(body), model=model, slo=slo_from_headers(request),
                                         priority=request.headers.get("x-priority", ""),
                                         tenant=request.headers.get("x-tenant", ""))
        prefix = "chatcmpl" if chat else "cmpl"
        oid = f"{prefix}-{prepared.public_id}"
        created = int(time.time())
        served = self.pipeline.served_model
        obj = "chat.completion.chunk" if chat else "text_completion"

        def choice(delta_text: str, finish: str | None, first: bool) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"content": delta_text}
                if first:
                    delta["role"] = "assistant"
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": delta_text, "logprobs": None, "finish_reason": finish}

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = self.pipeline.run(prepared)
            # The first event (the first token) comes before the headers, so that a
            # request that fails in routing or prefill still gets a proper HTTP error.
            head = await events.__anext__()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **prepared.plan_headers()})
            await resp.prepare(request)
            first = True
            try:
                async with aclosing(events):
                    async for ev in _chain(head, events):
                        await self._sse(resp, ev, oid, obj, created, served, first, include_usage, choice)
                        first = False
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

    @staticmethod
    async def _sse(resp: web.StreamResponse, ev: object, oid: str, obj: str, created: int, served: str,
                   first: bool, include_usage: bool, choice: Any) -> None:
        if isinstance(ev, TokenEvent):
            chunk = {"id": oid, "object": obj, "created": created, "model": served,
                     "choices": [choice(ev.text, None, first)]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        elif isinstance(ev, FinishEvent):
            chunk = {"id": oid, "object": obj, "created": created, "model": served,
                     "choices": [choice("", ev.reason, first)]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if include_usage:
                usage = {"id": oid, "object": obj, "created": created, "model": served, "choices": [],
                         "usage": _usage(ev)}
                await resp.write(f"data: {json.dumps(usage)}\n\n".encode())

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.pipeline.served_model, "object": "model", "created": 0, "owned_by": "tandem"}]})

    async def health(self, request: web.Request) -> web.Response:
        pools = {r: len(self.pipeline.router.nodes(r)) for r in ("prefill", "decode")}
        ok = all(pools.values())
        return web.json_response({"status": "ok" if ok else "degraded", "nodes": pools}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _usage(ev: FinishEvent) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


async def _chain(head: object, rest: Any) -> Any:
    yield head
    async for ev in rest:
        yield ev
