"""A small proxy in front of vLLM's own P/D pair (NixlConnector), the baseline for
`tandem bench compare`.

It does what vLLM's toy proxy for NIXL does: each completion goes to the
prefill server with max_tokens=1 and ``do_remote_decode``; the prefill's
answer carries ``kv_transfer_params`` (its engine id, block ids, side-channel
address), which go with the original request to the decode server, whose
answer (streamed or not) is passed through. The decode server pulls the KV
over NIXL and generates every output token itself, the first one included.

    python -m tandem.bench.pd_proxy --prefill URL --decode URL --port N
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg: one token, not streamed, KV kept for the decode server."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "min_tokens")}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["kv_transfer_params"] = dict(REMOTE_DECODE)
    return out


class Proxy:
    def __init__(self, prefill: str, decode: str) -> None:
        self.prefill, self.decode = prefill.rstrip("/"), decode.rstrip("/")
        self.session: aiohttp.ClientSession | None = None
        self.healthy = False

    async def start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                             connector=aiohttp.TCPConnector(limit=0))

    async def close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def completion(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return web.json_response({"error": {"message": f"malformed JSON: {exc}", "type": "BadRequestError"}},
                                     status=400)
        async with self.session.post(self.prefill + request.path, json=prefill_body(body)) as r:
            if r.status != 200:
                return web.Response(status=r.status, body=await r.read(), content_type="application/json")
            kv = (await r.json()).get("kv_transfer_params")
        if not kv:
            return web.json_response({"error": {"message": "the prefill server returned no kv_transfer_params "
                                                           "(is its NixlConnector a kv_producer?)",
                                                "type": "InternalServerError"}}, status=502)
        async with self.session.post(self.decode + request.path, json={**body, "kv_transfer_params": kv}) as r:
            out = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers.get("Content-Type",
                                                                                          "application/json")})
            await out.prepare(request)
            async for chunk in r.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def passthrough(self, request: web.Request) -> web.Response:
        assert self.session is not None
        async with self.session.get(self.decode + request.path) as r:
            return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)

    async def health(self, request: web.Request) -> web.Response:
        assert self.session is not None
        for base in (self.prefill, self.decode):
            try:
                # (both within `tandem bench compare`'s 2 s wait for an answer, so it hears which)
                async with self.session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=0.8)) as r:
                    if r.status != 200:
                        return web.Response(status=503, text=f"{base} answers {r.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return web.Response(status=503, text=f"{base}: {exc!r}")
        if not self.healthy:
            self.healthy = True
            print(f"both servers answer /health: {self.prefill}, {self.decode}", flush=True)
        return web.Response(text="ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", required=True, help="the prefill vLLM server's base URL")
    ap.add_argument("--decode", required=True, help="the decode vLLM server's base URL")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    proxy = Proxy(args.prefill, args.decode)
    app = web.Application(client_max_size=64 << 20)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.close)
    app.router.add_post("/v1/completions", proxy.completion)
    app.router.add_post("/v1/chat/completions", proxy.completion)
    app.router.add_get("/v1/models", proxy.passthrough)
    app.router.add_get("/health", proxy.health)
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    print(f"pd_proxy starting on {args.host}:{args.port} (prefill {args.prefill}, decode {args.decode})", flush=True)
    # reuse_port: `tandem bench compare` holds the port (tandem.netutil.reserve_port) until it answers
    web.run_app(app, host=args.host, port=args.port, print=None, reuse_port=True)


if __name__ == "__main__":
    main()
