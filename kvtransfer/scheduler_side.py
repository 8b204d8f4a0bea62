"""The scheduler half of TandemConnector (runs in vLLM's engine-core process).

Producer (prefill engine): a request marked ``produce`` that finishes normally
keeps its blocks (delayed free) and returns a transfer handle in its output.
Consumer (decode engine): a request carrying a ``consume`` handle reports the
handle's prompt tokens as external and loaded asynchronously; the blocks they
land in are sent to the worker half as a load job; with the node's KV store on,
the chunks it has ready in RAM are copied from there and only the rest is pulled.
Any other request, with the node's KV store on: its stored prefix is loaded
from the store, and its prompt saved there when it finishes (store_side.py).
Producer and consumer alike, with ``own_steps`` (``PromptSteps``): a prompt the engine computes
starts in a step of its own, after the one before it has had its last chunk.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from tandem.kvstore.tiers import COUNTS

from .capability import sign
from .fetcher import LoadJob
from .handle import CONSUME, HANDLE, PRODUCE, TransferHandle
from .metadata import TandemConnectorMetadata, TandemWorkerMetadata
from .stats import TandemKVStats, empty_stats
from .store_side import StoreScheduler

if TYPE_CHECKING:
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PromptSteps:
    """Prompts in steps of their own: a prompt the engine would compute does not start in a step
    that already carries another prompt's chunk (one still prefilling, or one this step starts).

    vLLM's scheduler fills each step's token budget: it runs the running requests first (decodes,
    and a prompt's next chunk), then starts waiting prompts in whatever budget is left. A prompt
    that arrives while another's last chunk is being scheduled joins that step, and the first
    prompt's first token waits for the second prompt's compute too: on the forty-fourth sitting's
    burst run, a prompt predicted at 39 ms took 145 ms when a 119 ms one, sent 3 ms later, shared
    its step; a decode node's 97-token local prefill predicted at 33 ms took 82 ms beside the
    first chunk of the next. Held back a step instead, the second starts right after (the engine
    never idles: the gate only ever holds a prompt while another is in the step), each prompt's
    TTFT is its own compute plus that of the prompts ahead of it, and that is what the
    coordinator predicts (coordinator/estimates.py: the queue ahead on the node). What it costs:
    the step's spare budget, and on a decode node one more step per held prompt, which its
    decodes use.

    Requests whose prompt arrives as KV (a decode node's transfers) are not held and do not
    hold others: they compute at most their last token. The scheduler asks again each step
    (the connector's ``None``: "not known yet"); a held request keeps its place in the queue."""

    def __init__(self) -> None:
        self._prompts: dict[str, Request] = {}  # started and maybe still prefilling (the engine's objects)
        self._started = False  # a prompt started in the step being scheduled
        self._asked: dict[str, int] = {}  # asked about in the step being scheduled: its cached tokens
        self.held = 0  # how many times a prompt was held back a step
        self._reported = 0  # of them, handed to the node's metric (take_held)

    @staticmethod
    def computes(request: Request, num_computed_tokens: int) -> bool:
        """Whether the engine would compute more of the prompt than its last token."""
        return request.num_tokens - num_computed_tokens > 1

    def hold(self, request: Request, num_computed_tokens: int) -> bool:
        """Whether ``request``, a prompt the engine would compute, waits for a later step."""
        self._asked[request.request_id] = num_computed_tokens
        if self._started:
            self.held += 1
            return True
        from vllm.v1.request import RequestStatus

        for rid, other in self._prompts.items():  # (a finished one is not RUNNING; step_built drops it)
            if rid != request.request_id and other.status == RequestStatus.RUNNING \
                    and other.num_computed_tokens < other.num_prompt_tokens:
                self.held += 1
                return True  # its next chunk is in this step (running requests are scheduled first)
        return False

    def started(self, request: Request, num_external_tokens: int) -> None:
        """``request`` was given its first blocks and tokens in this step: a prompt, unless the
        engine's cache and the connector's load hold all of it but its last token."""
        cached = self._asked.pop(request.request_id, None)
        if cached is not None and self.computes(request, cached + num_external_tokens):
            self._prompts[request.request_id] = request
            self._started = True

    def step_built(self) -> None:
        self._started = False
        self._asked.clear()
        for rid, r in list(self._prompts.items()):
            if r.is_finished() or r.num_computed_tokens >= r.num_prompt_tokens:
                del self._prompts[rid]

    def finished(self, request: Request) -> None:
        self._prompts.pop(request.request_id, None)

    def take_held(self) -> int:
        """Prompts held back a step since the last call (tandem_engine_prompts_held_total)."""
        n, self._reported = self.held - self._reported, self.held
        return n


class SchedulerSide:
    def __init__(self, engine_id: str, block_size: int, address: str, lease_s: float,
                 store: StoreScheduler | None = None, secret: bytes | None = None,
                 own_steps: bool = False) -> None:
        self.engine_id = engine_id
        self.steps = PromptSteps() if own_steps else None
        self.secret = secret  # signs each handle (capability.py)
        self.store = store
        self.block_size = block_size
        self.address = address
        self.lease_s = lease_s
        self._meta = TandemConnectorMetadata(lease_s=lease_s)

    # consumer -----------------------------------------------------------
    @staticmethod
    def _consume_params(request: Request) -> dict[str, Any] | None:
        p = request.kv_transfer_params
        if not p or p.get("tandem") != CONSUME or p.get("_tandem_done"):
            return None
        return p

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        p = self._consume_params(request)
        if p is None:
            if self.steps is not None and self.steps.computes(request, num_computed_tokens) \
                    and self.steps.hold(request, num_computed_tokens):
                return None, False  # (before the store's lookup, which pins what it finds)
            if self.store is not None and not self._is_consumer(request):
                return self.store.lookup(request, num_computed_tokens)
            return 0, False
        try:
            count = TransferHandle.from_params(p).num_tokens - num_computed_tokens
        except ValueError as exc:
            # Never raise here: this runs inside vLLM's scheduler, and an exception ends the engine.
            # (The decode node's edge refuses such handles; this is the last line.)
            logger.error("request %s: %s; computing its prompt here instead", request.request_id, exc)
            p["_tandem_done"] = True
            return 0, False
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        p = self._consume_params(request)
        if p is None:
            if self.steps is not None:
                self.steps.started(request, num_external_tokens)
            if self.store is not None and not self._is_consumer(request):
                job, failed = self.store.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)
                if job is not None:
                    self._meta.store_loads.append(job)
                if failed:
                    self._meta.store_failures.append(request.request_id)
            return
        p["_tandem_done"] = True  # one transfer per request
        handle = TransferHandle.from_params(p)  # parsed once already in get_num_new_matched_tokens
        if num_external_tokens == 0:
            # Everything was already cached here: nothing to pull, free the remote hold.
            self._meta.releases.append(handle)
            return
        local_computed = handle.num_tokens - num_external_tokens
        first, last = local_computed // self.block_size, _cdiv(handle.num_tokens, self.block_size)
        local_ids = blocks.get_block_ids()[0]
        if last > len(local_ids) or last > len(handle.block_ids):
            # Not an exception: it would end the engine and every request in it. This one
            # request fails its load instead (vLLM's kv_load_failure_policy decides the rest).
            logger.error("request %s: KV handle covers blocks %d..%d but %d local and %d remote blocks exist; "
                         "failing its load", request.request_id, first, last, len(local_ids),
                         len(handle.block_ids))
            self._meta.failures.append(request.request_id)
            self._meta.releases.append(handle)
            return
        if self.store is not None:
            # The chunks this node's own store has ready come from there; the transfer brings the rest.
            job = self.store.load_beside(request, local_ids, first * self.block_size, handle.num_tokens)
            if job is not None:
                self._meta.store_loads.append(job)
                first += job.num_blocks
        if first >= last:
            self._meta.releases.append(handle)  # all of it was here
            return
        self._meta.loads.append(LoadJob(request.request_id, handle, remote_block_ids=handle.block_ids[first:last],
                                        local_block_ids=list(local_ids[first:last])))

    @staticmethod
    def _is_consumer(request: Request) -> bool:
        p = request.kv_transfer_params
        return bool(p) and p.get("tandem") == CONSUME

    # producer -----------------------------------------------------------
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Whether vLLM must keep the blocks until the worker reports the request as sent (a
        producer's hold, a store save, or both), and the params to put in its output."""
        from vllm.v1.request import RequestStatus

        ended_early = request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)
        if self.steps is not None:
            self.steps.finished(request)
        delay, params = self._finished(request, block_ids, ended_early)
        if self.store is not None:
            t0 = time.perf_counter()
            job = self.store.on_finished(request, block_ids, ended_early)
            if job is not None:
                self._meta.store_saves.append(job)
                delay = True
                COUNTS.add("saves")
                # What saves cost the engine's step: planning them here, committing them in
                # update_connector_output (the copies run on the worker's copier thread, beside the step).
                COUNTS.add("save_step_ns", int((time.perf_counter() - t0) * 1e9))
        return delay, params

    def _finished(self, request: Request, block_ids: list[int], ended_early: bool
                  ) -> tuple[bool, dict[str, Any] | None]:
        p = request.kv_transfer_params
        if not p:
            return False, None
        if p.get("tandem") == CONSUME and not p.get("_tandem_done"):
            # Aborted before its blocks were allocated: free the remote hold now.
            p["_tandem_done"] = True
            try:
                self._meta.releases.append(TransferHandle.from_params(p))
            except ValueError as exc:  # never raise inside vLLM's scheduler
                logger.error("request %s: %s; nothing to release", request.request_id, exc)
            return False, None
        if p.get("tandem") == CONSUME:
            if ended_early:
                # Its load may still be in flight: stop it now. vLLM keeps the blocks it fills
                # until the worker reports the load finished, which an abort does at once.
                self._meta.aborts.append(request.request_id)
            return False, None
        if p.get("tandem") != PRODUCE:
            return False, None
        if ended_early:
            return False, None  # aborted or failed: nothing to hand over
        num_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
        held = list(block_ids[: _cdiv(num_tokens, self.block_size)])
        if not held:
            return False, None
        self._meta.holds[request.request_id] = held
        deadline = time.time() + self.lease_s
        handle = TransferHandle(
            engine_id=self.engine_id,
            address=self.address,
            remote_request_id=request.request_id,
            block_ids=held,
            num_tokens=num_tokens,
            lease_deadline=deadline,
            capability=sign(self.secret, self.engine_id, request.request_id, num_tokens, deadline)
            if self.secret is not None else "",
        )
        return True, handle.to_params(HANDLE)

    # both ---------------------------------------------------------------
    def update_connector_output(self, out: KVConnectorOutput) -> None:
        if self.store is None:
            return
        self.store.loads_done(set(out.finished_recving or ()) | set(out.failed_recving or ()),
                              failed=set(out.failed_recving or ()))
        meta = out.kv_connector_worker_meta
        if isinstance(meta, TandemWorkerMetadata) and meta.loads:  # sync loads copied: their chunks unpinned
            self.store.loads_done(set(meta.loads), failed={rid for rid, ok in meta.loads.items() if not ok})
        if isinstance(meta, TandemWorkerMetadata) and meta.saves:
            t0 = time.perf_counter()
            self.store.saves_done(meta.saves)  # (committing them: on the step's path too)
            COUNTS.add("save_step_ns", int((time.perf_counter() - t0) * 1e9))

    def take_stats(self) -> TandemKVStats | None:
        """The KV store's counts since the last call (the store lives in this process), and the
        prompts held back a step since then (``PromptSteps``)."""
        data = self.store.stats() if self.store is not None else None
        held = self.steps.take_held() if self.steps is not None else 0
        if data is None and not held:
            return None
        stats = TandemKVStats(data=empty_stats())
        if data is not None:
            stats.data["store"] = data["counts"]
            stats.data["store_held"] = data["held"]
            stats.data["store_events"] = data["events"]
        if held:
            stats.data["prompts_held"] = held
        return stats

    def build_connector_meta(self) -> TandemConnectorMetadata:
        if self.steps is not None:
            self.steps.step_built()
        meta, self._meta = self._meta, TandemConnectorMetadata(lease_s=self.lease_s)
        return meta
