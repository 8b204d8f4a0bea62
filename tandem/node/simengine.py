"""A simulated engine for `tandem prefill|decode --simulate PROFILE`: the node's real daemon, gRPC
API, etcd record and metrics, with an engine that only keeps time.

It stands in for ``EngineHost`` (same calls) and imports neither vLLM nor torch. Its times come
from a profile (``tandem.timings.Timings``: a node's cached profile file or plain coefficients): one
prefill at a time takes ``prefill_s(uncached tokens)``; the running requests advance together in
decode steps of ``step_s(batch, context)``; a request that arrives with a KV handle waits
``transfer_s(bytes)`` before it joins (no bytes move: the handles are fake, and only a simulated
node takes them). Tokens are a deterministic function of the prompt and the position, so a
request's output is the same whether it is prefilled and decoded on one node or two.
Prefills and decode steps alternate when both wait.

For load tests of the coordinator and for the simulator's validation only: every correctness
test runs real engines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.errors import InvalidRequest
from tandem.kvtransfer.handle import CONSUME, HANDLE, PRODUCE, TransferHandle
from tandem.perfmodel import kv_bytes_per_token
from tandem.sampling import Sampling
from tandem.timings import Timings

from .config import NodeConfig

logger = logging.getLogger(__name__)

FIRST_TOKEN_ID = 5  # below: special tokens


@dataclass
class _Completion:
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | None = None


@dataclass
class _Output:
    outputs: list[_Completion]
    finished: bool = False
    num_cached_tokens: int | None = None
    kv_transfer_params: dict[str, Any] | None = None


@dataclass
class _Seq:
    rid: str
    prompt: list[int]
    max_tokens: int
    out: asyncio.Queue[_Output | None] = field(default_factory=asyncio.Queue)
    produced: int = 0
    ready_at: float = 0.0  # a consumed request: when its (simulated) KV has arrived
    interval: int = 1  # tokens per output after the first, as vLLM's stream_interval
    pending: list[int] = field(default_factory=list)  # made, not yet put out (interval > 1)
    sent_any: bool = False
    cancelled: bool = False  # aborted (perhaps mid-prefill, out of every list): emit nothing more

    def token(self, vocab_size: int) -> int:
        """A function of the prompt and the position only, inside the vocabulary (it is fed back)."""
        return FIRST_TOKEN_ID + (sum(self.prompt) * 31 + len(self.prompt) + self.produced) % (vocab_size - FIRST_TOKEN_ID)


def model_facts(model_dir: str) -> dict[str, Any]:
    """What a simulated node tells the cluster about its model: from the HF config.json."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        heads = int(cfg["num_attention_heads"])
        return {"vocab_size": int(cfg["vocab_size"]), "num_layers": int(cfg["num_hidden_layers"]),
                "num_kv_heads": int(cfg.get("num_key_value_heads", heads)),
                "head_size": int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                "max_position_embeddings": int(cfg.get("max_position_embeddings", 2048))}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--simulate: cannot read {model_dir}/config.json: {exc}") from exc


class SimEngine:
    def __init__(self, cfg: NodeConfig, kv_address: str, engine_id: str, timings: Timings) -> None:
        self.cfg = cfg
        self.kv_address = kv_address
        self.engine_id = engine_id
        self.timings = timings
        self.events_endpoint = ""  # no engine prefix cache to publish
        self.facts = model_facts(cfg.model)
        self.max_model_len = cfg.max_model_len or self.facts["max_position_embeddings"]
        self.vocab_size = self.facts["vocab_size"]
        self.block_size = cfg.block_size
        self.kv_bytes_per_token = kv_bytes_per_token(self.layout())
        self.dead = False
        self._died = asyncio.Event()
        self._prefills: list[_Seq] = []
        self._incoming: list[_Seq] = []
        self._running: list[_Seq] = []
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._held: dict[str, float] = {}  # asked to hold KV, until its handle is minted: rid -> lease deadline
        self._current: _Seq | None = None  # the prefill running now

    def start(self) -> None:
        logger.info("simulated engine ready (times from %s): model %s, context %d tokens",
                    self.timings.source or "the given coefficients", self.cfg.model, self.max_model_len)

    def layout(self) -> dict[str, object]:
        f = self.facts
        return {"num_layers": f["num_layers"], "block_size": self.block_size, "num_kv_heads": f["num_kv_heads"],
                "head_size": f["head_size"], "dtype": self.cfg.dtype}

    async def wait_until_dead(self) -> None:
        await self._died.wait()  # only if its loop failed (a bug): the node then leaves like a dead engine

    async def reset_cache(self, store_ram: bool) -> bool:
        return True

    async def release_held(self, remote_request_id: str, engine_id: str, handle: object = None) -> None:
        self._held.pop(remote_request_id, None)

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

    # the engine loop --------------------------------------------------------------
    def _kick(self) -> None:
        if self.dead:
            return
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
            self._loop_task.add_done_callback(self._loop_ended)
        assert self._wake is not None
        self._wake.set()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        logger.error("the simulated engine's loop failed: %r; its requests end and the node leaves",
                     task.exception())
        self.dead = True
        self._died.set()
        stranded = [*self._prefills, *self._incoming, *self._running, *([self._current] if self._current else [])]
        for s in stranded:
            s.out.put_nowait(None)  # ends its stream without a finish: the call fails
        for q in (self._prefills, self._incoming, self._running):
            q.clear()
        self._current = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            now = time.monotonic()
            for s in [s for s in self._incoming if s.ready_at <= now]:
                self._incoming.remove(s)
                self._running.append(s)
            if self._prefills:
                s = self._current = self._prefills.pop(0)
                await asyncio.sleep(self.timings.prefill_s(len(s.prompt)))
                self._current = None
                self._emit(s, first=True)
            if self._running:
                batch = self._running[: self.cfg.max_num_seqs]
                context = sum(len(s.prompt) + s.produced for s in batch)
                await asyncio.sleep(self.timings.step_s(len(batch), context))
                for s in batch:
                    self._emit(s)
            if not self._prefills and not self._running:
                self._wake.clear()
                wait = min((s.ready_at for s in self._incoming), default=None)
                try:
                    await asyncio.wait_for(self._wake.wait(), None if wait is None else max(0.0, wait - time.monotonic()))
                except TimeoutError:
                    pass

    def _emit(self, s: _Seq, first: bool = False) -> None:
        if s.cancelled:
            return
        s.pending.append(s.token(self.vocab_size))
        s.produced += 1
        done = s.produced >= s.max_tokens or len(s.prompt) + s.produced >= self.max_model_len
        if s.sent_any and not done and len(s.pending) < s.interval:
            return  # vLLM's stream_interval: the first and the last at once, the rest in groups
        s.sent_any = True
        out = _Output([_Completion(s.pending, "length" if done else None)], finished=done,
                      num_cached_tokens=0 if first else None)
        s.pending = []
        if first and s.rid in self._held:  # nothing is held really: the handle is all there is
            nblocks = -(-len(s.prompt) // self.block_size)
            out.kv_transfer_params = TransferHandle(
                self.engine_id, self.kv_address, s.rid, list(range(nblocks)), len(s.prompt),
                self._held.pop(s.rid)).to_params(HANDLE)
        s.out.put_nowait(out)
        if done:
            if s in self._running:
                self._running.remove(s)
            s.out.put_nowait(None)
        elif first:
            self._running.append(s)

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: Sampling,
                       kv_params: dict[str, Any] | None, priority: int = 0,
                       stream_interval: int = 1) -> AsyncIterator[_Output]:
        if any(t < 0 or t >= self.vocab_size for t in prompt_token_ids):
            raise InvalidRequest(f"the engine refused the request: token ids must be in [0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(f"the engine refused the request: {len(prompt_token_ids)} prompt tokens do not fit "
                                 f"a context of {self.max_model_len}")
        s = _Seq(request_id, list(prompt_token_ids), max(1, sampling.max_tokens), interval=max(1, stream_interval))
        kind = (kv_params or {}).get("tandem")
        if self.dead:
            raise RuntimeError("the simulated engine's loop failed; see the node's log")
        if kind == CONSUME:
            handle = TransferHandle.from_params(kv_params or {})
            if not handle.engine_id.startswith("sim:"):
                raise InvalidRequest("a simulated decode node takes only a simulated prefill node's KV handles")
            nbytes = handle.num_tokens * self.kv_bytes_per_token
            # The prompt ends with the first token, which the prefill produced: count it as produced.
            s.prompt, s.produced, s.max_tokens = s.prompt[:-1], 1, s.max_tokens + 1
            s.ready_at = time.monotonic() + self.timings.transfer_s(nbytes)
            self._incoming.append(s)
        else:
            if kind == PRODUCE:
                self._held[request_id] = time.time() + self.cfg.lease_s
            self._prefills.append(s)
        self._kick()
        finished = False
        try:
            while (out := await s.out.get()) is not None:
                finished = out.finished
                yield out
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._held.pop(request_id, None)
        for q in (self._prefills, self._incoming, self._running):
            for s in [s for s in q if s.rid == request_id]:
                s.cancelled = True  # (one in the step running now is in its batch still)
                q.remove(s)
        if self._current is not None and self._current.rid == request_id:
            self._current.cancelled = True  # in its prefill now: it ends there
