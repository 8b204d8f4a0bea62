"""A synthetic OpenAI-compatible server with a known capacity, for checking the benchmark itself.

Requests queue for one server that spends ``1 / capacity`` seconds on each
(its "prefill"), then stream ``max_tokens`` tokens ``itl_s`` apart without
holding the server. Below ``capacity`` req/s queues stay short; above it they
grow without bound, so a goodput search must land at or under ``capacity``.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web


class SyntheticServer:
    def __init__(self, capacity_rps: float, itl_s: float = 0.001, model: str = "synthetic") -> None:
        self.service_s = 1.0 / capacity_rps
        self.itl_s = itl_s
        self.model = model
        self._lock = asyncio.Lock()
        self.app = web.Application()
        self.app.add_routes([web.post("/v1/completions", self.completions), web.get("/v1/models", self.models)])
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(body.get("max_tokens", 16))
        async with self._lock:  # one request at a time in "prefill"
            await asyncio.sleep(self.service_s)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            if i:
                await asyncio.sleep(self.itl_s)
            chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": "length" if i == n - 1 else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp


def main(argv: list[str] | None = None) -> int:
    """Serve until killed; prints ``SYNTHETIC_READY <url>`` once listening."""
    import argparse

    import uvloop

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--capacity", type=float, required=True, help="requests per second the server can take")
    ap.add_argument("--itl", type=float, default=0.001, help="seconds between streamed tokens")
    args = ap.parse_args(argv)

    async def serve() -> None:
        server = SyntheticServer(args.capacity, args.itl)
        print(f"SYNTHETIC_READY {await server.start()}", flush=True)
        await asyncio.Event().wait()

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
