"""The worker half of TandemConnector (runs in vLLM's worker process, beside the model).

Producer: owns the BlockServer that serves held blocks and reports freed holds
as finished sends. Consumer: owns the BlockFetcher that pulls blocks in the
background and reports finished and failed receives. With the KV store on:
creates the shared RAM arena and owns the StoreCopier, whose loads end as
finished receives and whose saves as finished sends (with a producer's hold,
when both have ended). None of it blocks a step.
"""

from __future__ import annotations

import logging

import torch

from tandem.logs import ensure_engine_logging

from .fetcher import BlockFetcher
from .metadata import TandemConnectorMetadata, TandemWorkerMetadata
from .paged import PagedKV
from .block_server import BlockServer
from .secure import ControlSecurity
from .stats import TandemKVStats, empty_stats
from .store_side import StoreConfig, StoreCopier
from .transport import make_data_planes
from .wire import parse_address

logger = logging.getLogger(__name__)


class WorkerSide:
    def __init__(self, *, is_producer: bool, is_consumer: bool, engine_id: str, address: str, transport: str,
                 num_blocks: int, layout_fields: dict[str, object], port_reserved: bool = False,
                 store: StoreConfig | None = None, security: ControlSecurity | None = None) -> None:
        self.engine_id = engine_id
        self.security = security or ControlSecurity()
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self.address = address
        self.port_reserved = port_reserved
        self.transport = transport
        self.num_blocks = num_blocks
        self.layout_fields = layout_fields
        self.server: BlockServer | None = None
        self.fetcher: BlockFetcher | None = None
        self._last_held: int | None = None
        ensure_engine_logging("kv-worker")
        self.store_cfg = store
        self.arena = None
        self.copier: StoreCopier | None = None
        self._held_reqs: set[str] = set()  # held by the block server
        self._saving: set[str] = set()  # a store save in flight
        self._saves_ended: dict[str, bool] = {}  # for the scheduler half, next step
        self._sync_loads_ended: dict[str, bool] = {}  # sync store loads copied this step (-> ok), likewise
        self._load_errors: set[int] = set()  # blocks a sync load failed to fill (vLLM asks each step)
        self._store_failed: set[str] = set()
        self._parts: dict[str, int] = {}  # a load in two parts (store and transfer): parts not yet ended
        self._part_failed: set[str] = set()  # ... and whether one failed
        if store is not None:
            from tandem.kvstore.arena import Arena

            # Created here, before the scheduler half exists (vLLM starts the worker first); it opens it.
            self.arena = Arena(store.arena_path, store.num_slots, store.slot_bytes, create=True)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        kv = PagedKV(list(kv_caches.values()), self.num_blocks, self.layout_fields)
        planes = make_data_planes(self.transport)
        logger.info("Tandem KV layout: %s", kv.layout.to_json())
        if self.is_producer:
            host, port = parse_address(self.address)
            self.server = BlockServer(host, port, kv, planes, engine_id=self.engine_id, reserved=self.port_reserved,
                                      security=self.security)
        if self.is_consumer:
            self.fetcher = BlockFetcher(kv, planes, security=self.security)
        if self.arena is not None and self.store_cfg is not None:
            self.copier = StoreCopier(kv, self.arena, self.store_cfg.chunk_blocks)

    def start_step(self, meta: TandemConnectorMetadata) -> None:
        if self.server is not None:
            for req_id, block_ids in meta.holds.items():
                self.server.holds.hold(req_id, block_ids, meta.lease_s)
                self._held_reqs.add(req_id)
        if self.copier is not None:
            for job in meta.store_loads:
                if job.sync:  # before this step's forward reads its blocks
                    ok = self._sync_loads_ended[job.req_id] = self.copier.load_now(job)
                    if not ok:
                        self._load_errors.update(job.block_ids)
                else:
                    self.copier.submit("load", job)
            for job in meta.store_saves:
                self._saving.add(job.req_id)
                self.copier.submit("save", job)
        self._store_failed.update(meta.store_failures)
        for rid in {j.req_id for j in meta.store_loads if not j.sync} & {j.req_id for j in meta.loads}:
            self._parts[rid] = 2
        if self.fetcher is not None:
            for job in meta.loads:
                self.fetcher.submit(job)
            for handle in meta.releases:
                self.fetcher.submit_release(handle)
            for req_id in meta.failures:
                self.fetcher.fail(req_id)
            for req_id in meta.aborts:
                self.fetcher.abort(req_id)

    def transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving)."""
        freed = self.server.holds.take_freed() if self.server is not None else set()
        recvd, failed = set(), set()
        if self.fetcher is not None:
            self._ended(*self.fetcher.take_results(), recvd, failed)
        # A failed receive is a finished one too (vLLM counts it finished only when it is in both).
        self._ended(self._store_failed, self._store_failed, recvd, failed)
        self._store_failed = set()
        saved: dict[str, bool] = {}
        if self.copier is not None:
            done = self.copier.take()
            self._ended(done.loads | done.failed, done.failed, recvd, failed)
            saved = done.saves
            self._saves_ended.update(saved)
        return self._sent(freed, set(saved)), recvd, failed

    def _ended(self, ended: set[str], bad: set[str], recvd: set[str], failed: set[str]) -> None:
        """Loads that ended in one source (the fetcher, the store): a load in two parts ends with its
        last part, failed if either part failed."""
        for rid in ended:
            if rid in bad:
                self._part_failed.add(rid)
            left = self._parts.get(rid, 1) - 1
            if left > 0:
                self._parts[rid] = left
                continue
            self._parts.pop(rid, None)
            recvd.add(rid)
            if rid in self._part_failed:
                self._part_failed.discard(rid)
                failed.add(rid)

    def _sent(self, freed: set[str], saved: set[str]) -> set[str]:
        """Requests whose blocks vLLM may free: every hold released and every save copied."""
        out = set()
        for rid in freed:
            self._held_reqs.discard(rid)
            if rid not in self._saving:
                out.add(rid)  # (else its save, when done, says so)
        for rid in saved:
            self._saving.discard(rid)
            if rid not in self._held_reqs:
                out.add(rid)  # (else the hold's release says so)
        return out

    def worker_meta(self) -> TandemWorkerMetadata | None:
        if not self._saves_ended and not self._sync_loads_ended:
            return None
        meta = TandemWorkerMetadata(saves=self._saves_ended, loads=self._sync_loads_ended)
        self._saves_ended, self._sync_loads_ended = {}, {}
        return meta

    def take_load_errors(self) -> set[int]:
        """Blocks the sync loads of the step just run failed to fill (vLLM's
        get_block_ids_with_load_errors: its kv_load_failure_policy ends or recomputes them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_stats(self) -> TandemKVStats | None:
        """This step's transfer stats, or None when nothing happened since the last call."""
        data = empty_stats()
        if self.server is not None:
            data["bytes_sent"] = self.server.take_bytes_sent()
            held = self.server.holds.num_blocks_held()
            if held != self._last_held:
                data["blocks_held"] = self._last_held = held
        if self.fetcher is not None:
            s = self.fetcher.take_stats()
            data["bytes_recv"] = s.bytes
            data["fetch_seconds"] = s.fetch_seconds
            data["fetch_failures"] = s.failures
            data["fetch_aborts"] = s.aborts
        if self.copier is not None:
            c = self.copier.take_stats()
            if c.load_seconds or c.save_seconds:
                data["store_load_seconds"], data["store_save_seconds"] = c.load_seconds, c.save_seconds
                data["store_load_bytes"] = c.load_bytes
        stats = TandemKVStats(data=data)
        return None if stats.is_empty() else stats

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.fetcher is not None:
            self.fetcher.close(wait_s=2.0)  # its lanes' UCX endpoints go before the process does
        if self.copier is not None:
            self.copier.close()
