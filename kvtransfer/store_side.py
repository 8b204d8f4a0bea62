"""TandemConnector's use of the node's KV store (tandem.kvstore), both halves.

Scheduler half (StoreScheduler): a request's prompt is cut into chunks of whole
blocks keyed by a chained hash (kvstore/keys.py). Before vLLM computes it, the
longest run of chunks ready in the shared RAM tier after what the engine's own
prefix cache holds is reported as external tokens, loaded asynchronously; a
run that continues on disk is first promoted to RAM (the request waits a step
or two). When a request finishes, the whole prompt chunks the store lacks are
saved: vLLM keeps their blocks until the worker has copied them out.

Worker half (StoreCopier): one thread copies between the engine's KV blocks
and the arena's slots, off the forward path; loads end as finished receives,
saves as finished sends (with a producer's hold: whichever ends last).

Left out, on purpose: requests with images or LoRA adapters (their KV depends
on more than the token ids; a cache salt is bound into the keys) and prompts
given as embeddings.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tandem.kvstore.keys import chunk_keys
from tandem.kvstore.tiers import COUNTS

from .handle import NO_STORE

if TYPE_CHECKING:
    from tandem.kvstore.arena import Arena
    from tandem.kvstore.nodestore import NodeStore
    from vllm.v1.request import Request

    from .paged import PagedKV

logger = logging.getLogger(__name__)

PROMOTE_WAIT_S = 2.0  # a request waits at most this long for its chunks to come up from disk
DEFAULT_PROMOTE_INLINE_S = 0.02  # how long a lookup waits in the step for them (--kvstore-promote-wait-ms)


@dataclass
class StoreConfig:
    """What both halves derive from the node's kv_connector_extra_config (kvstore_* keys) and the
    engine's KV cache config; None from ``parse`` when the store is off."""

    arena_path: str
    num_slots: int
    slot_bytes: int
    chunk_blocks: int
    namespace: bytes
    disk_dir: str
    disk_bytes: int
    save: bool
    eviction: str = "tail-first"
    sync_loads: bool = False  # --kvstore-load sync: a lookup's hit is copied in before the step (StoreJob.sync)
    promote_inline_s: float = DEFAULT_PROMOTE_INLINE_S  # --kvstore-promote-wait-ms, in seconds

    @classmethod
    def parse(cls, extra: dict[str, Any], kv_cache_config: Any) -> StoreConfig | None:
        from tandem.kvstore.keys import namespace

        ram = int(extra.get("kvstore_ram_bytes", 0))
        if ram <= 0:
            return None
        if kv_cache_config is None:
            raise ValueError("TandemConnector: the KV store needs the KV cache config")
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"the KV store handles models with one KV cache group; this one has {len(groups)} "
                             "(turn the store off: --kvstore-ram-gib 0)")
        spec, layers = groups[0].kv_cache_spec, len(groups[0].layer_names)
        from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

        if not isinstance(spec, FullAttentionSpec) or isinstance(spec, MLAAttentionSpec):
            # Sliding-window or chunked-local layers drop a prompt's early blocks; MLA lays KV out
            # otherwise. Neither is handled yet.
            raise ValueError(f"the KV store handles full-attention KV caches only, not {type(spec).__name__} "
                             "(turn the store off: --kvstore-ram-gib 0)")
        chunk_blocks = int(extra.get("kvstore_chunk_blocks", 8))
        slot_bytes = spec.page_size_bytes * layers * chunk_blocks
        if ram < slot_bytes:
            raise ValueError(f"--kvstore-ram-gib holds not even one chunk ({slot_bytes / 2**20:.1f} MiB: "
                             f"{chunk_blocks} blocks of {layers} layers)")
        layout = {"layers": layers, "block_size": spec.block_size, "page_bytes": spec.page_size_bytes,
                  "kv_heads": spec.num_kv_heads, "head_size": spec.head_size, "dtype": str(spec.dtype)}
        return cls(arena_path=str(extra["kvstore_arena"]), num_slots=ram // slot_bytes, slot_bytes=slot_bytes,
                   chunk_blocks=chunk_blocks,
                   namespace=namespace(str(extra["kvstore_model_id"]), layout, spec.block_size * chunk_blocks),
                   disk_dir=str(extra.get("kvstore_dir") or ""), disk_bytes=int(extra.get("kvstore_disk_bytes", 0)),
                   save=bool(extra.get("kvstore_save", True)),
                   eviction=str(extra.get("kvstore_eviction", "tail-first")),
                   sync_loads=str(extra.get("kvstore_load", "async")) == "sync",
                   promote_inline_s=float(extra.get("kvstore_promote_wait_ms", DEFAULT_PROMOTE_INLINE_S * 1000)) / 1000)


def open_store_scheduler(cfg: StoreConfig, block_size: int) -> StoreScheduler:
    """The scheduler half's store: opens the arena the worker half created (and drops its name),
    and the disk tier (this process holds its directory's lock)."""
    from pathlib import Path

    from tandem.kvstore.arena import Arena, lock_dir
    from tandem.kvstore.nodestore import NodeStore
    from tandem.kvstore.tiers import DiskTier

    arena = Arena(cfg.arena_path, cfg.num_slots, cfg.slot_bytes, create=False)
    arena.unlink()
    disk = None
    if cfg.disk_dir:
        lock_dir(Path(cfg.disk_dir))
        disk = DiskTier(cfg.disk_dir, cfg.disk_bytes)
    logger.info("KV store: RAM tier %d chunks of %.1f MiB (%d tokens each, %s eviction)%s", cfg.num_slots,
                cfg.slot_bytes / 2**20, block_size * cfg.chunk_blocks, cfg.eviction,
                f", disk tier {cfg.disk_dir} ({cfg.disk_bytes / 2**30:.1f} GiB)" if disk else "")
    return StoreScheduler(NodeStore(arena, disk, eviction=cfg.eviction), cfg.namespace, block_size,
                          cfg.chunk_blocks, cfg.save, sync_loads=cfg.sync_loads, promote_inline_s=cfg.promote_inline_s)


@dataclass
class StoreJob:
    """Copy between engine blocks and arena slots: ``pieces`` are (slot, first block in the slot,
    blocks), in order; ``block_ids`` the engine blocks, as many, in the same order."""

    req_id: str
    pieces: list[tuple[int, int, int]]
    block_ids: list[int]
    # A load the worker copies before the step's forward (a lookup's hit, with StoreConfig.sync_loads):
    # vLLM counts its tokens computed at once and runs the rest of the prompt in the same step. Else
    # the copier thread copies it and the request waits for it to be reported (a step at least).
    sync: bool = False
    broken: bool = False  # a sync load that could not be planned: its blocks are reported failed

    @property
    def num_blocks(self) -> int:
        return sum(n for _, _, n in self.pieces)


@dataclass
class _Req:
    keys: list[bytes]
    waiting_since: float | None = None  # for chunks coming up from disk
    hit_end: int = 0  # tokens covered once the planned load is done
    local: int = 0  # tokens the engine's own prefix cache had, at the last lookup
    allocated: bool = False
    off: bool = False  # its load failed once: no more store loads for it


def store_eligible(request: Request) -> bool:
    return (request.prompt_token_ids is not None and not request.mm_features
            and request.lora_request is None and not (request.kv_transfer_params or {}).get(NO_STORE))


class StoreScheduler:
    def __init__(self, store: NodeStore, namespace: bytes, block_size: int, chunk_blocks: int,
                 save: bool, sync_loads: bool = False, promote_inline_s: float = DEFAULT_PROMOTE_INLINE_S) -> None:
        self.store = store
        # With sync_loads a lookup's hit (its chunks in RAM) loads before the step that computes the
        # prompt's rest (StoreJob.sync), not beside it: an async load keeps the request out of the
        # step it was scheduled in, and a prompt that arrived after it and started its prefill
        # meanwhile runs whole before it (the engine serves running prefills first). On the
        # nineteenth sitting's 0:2 multi-turn runs that cut the prompts overtaken so by a third,
        # but attainment at 4-4.5 req/s came out 79 % against 86 % over six probes, with twice the
        # TPOT misses (docs/PERFORMANCE.md; not understood yet): off by default.
        self.sync_loads = sync_loads
        # A lookup that starts chunks up from disk waits for them in the step this long at most: in
        # time, the hit loads now; else the request is skipped and asked again each step (a step or
        # more of its TTFT: on the twentieth sitting's 0:2 multi-turn run at 4.5-5.5 req/s, a quarter
        # of the local prefills waited so, and took 60 ms (about a step) more than predicted in the
        # median). The step's other requests wait with it: at most this, once per such lookup.
        self.promote_inline_s = promote_inline_s
        self.ns = namespace
        self.block_size = block_size
        self.chunk_blocks = chunk_blocks
        self.chunk_tokens = block_size * chunk_blocks
        self.save = save
        self._reqs: dict[str, _Req] = {}
        self._loading: dict[str, list[bytes]] = {}
        self._saving: dict[str, tuple[list[bytes], list[bytes]]] = {}  # (chunks saved, the prompt's run)
        self._counted: dict[str, int] = {}  # the store's counts at the last stats()
        self._held: dict[str, int] | None = None  # its bytes held per tier at the last stats()
        self._named = False  # the key space sent (the first stats())

    def _keys(self, request: Request) -> list[bytes]:
        salt = (request.cache_salt or "").encode()
        assert request.prompt_token_ids is not None
        return chunk_keys(self.ns, request.prompt_token_ids, self.chunk_tokens, extra=salt)

    def lookup(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not store_eligible(request) or request.skip_reading_prefix_cache:
            return 0, False
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _Req(self._keys(request))
        if st.off:
            return 0, False
        st.allocated = False  # a lookup starts a new allocation (after a preemption too)
        st.local = num_computed_tokens
        start = num_computed_tokens // self.chunk_tokens
        n = self.store.count_ready(st.keys, start)
        if self.store.disk is not None:
            rest = st.keys[start + n:]
            now = time.monotonic()
            if st.waiting_since is None:
                coming = self.store.promote(st.keys, start + n) if rest else 0
                if coming and self.promote_inline_s > 0 and self.store.wait_promoted(rest[:coming],
                                                                                    self.promote_inline_s):
                    n = self.store.count_ready(st.keys, start)
                    logger.info("request %s: %d chunk(s) of its prefix came up from the KV store's disk tier in "
                                "%.1f ms, in its step", request.request_id, coming, (time.monotonic() - now) * 1000)
                elif coming:
                    st.waiting_since = now
                    logger.info("request %s: waiting for %d chunk(s) of its prefix to come up from the KV store's "
                                "disk tier (%d ready in RAM)", request.request_id, coming, n)
                    return None, False  # ask again once they are in RAM
            elif now - st.waiting_since < PROMOTE_WAIT_S and self.store.promoting(rest[:1]):
                return None, False
        end = (start + n) * self.chunk_tokens
        if self.sync_loads:
            # The engine computes at least the prompt's last token: a hit of a whole prompt (its
            # length a multiple of the chunk's) leaves it out (its block is loaded whole, as vLLM
            # does after an async load; the step writes that token's KV over it).
            end = min(end, len(request.prompt_token_ids) - 1)
        if end <= num_computed_tokens:
            return 0, False
        st.hit_end = end
        return end - num_computed_tokens, not self.sync_loads

    def after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int
                    ) -> tuple[StoreJob | None, bool]:
        """The load of a lookup's hit into the blocks vLLM allocated: (job, failed)."""
        st = self._reqs.get(request.request_id)
        if st is None or st.allocated:
            return None, False
        st.allocated = True
        st.waiting_since = None  # a later lookup (after a preemption) may promote again
        covered = st.local + num_external_tokens
        COUNTS.add("misses", max(0, len(st.keys) - covered // self.chunk_tokens))
        if num_external_tokens == 0:
            return None, False
        bs = self.block_size
        first, last = (st.hit_end - num_external_tokens) // bs, -(-st.hit_end // bs)
        job = self._pin_job(request.request_id, st, block_ids, first, last)
        if job is None:
            # Cannot happen while one thread schedules (nothing evicts between the lookup and here);
            # if it does, this request's load fails, never the engine.
            logger.error("request %s: its stored prefix went away before its load; failing the load",
                         request.request_id)
            if self.sync_loads:  # its tokens count as computed already: its blocks are reported failed
                st.off = True
                return StoreJob(request.request_id, [], list(block_ids[first:last]), sync=True, broken=True), False
            return None, True
        job.sync = self.sync_loads
        logger.info("request %s: %d prompt tokens from the KV store's RAM tier (%s), %d from the engine's cache",
                    request.request_id, num_external_tokens, "before its step" if job.sync else "beside the step",
                    st.local)
        return job, False

    def load_beside(self, request: Request, block_ids: list[int], start: int, end: int) -> StoreJob | None:
        """For a request whose prompt KV arrives by transfer (a decode node's): a load of the chunks
        ready in the RAM tier from token ``start`` (block aligned) on, up to ``end`` at most, so the
        transfer brings only the rest. A local copy never loses to a fetch over the network; chunks
        on disk are not waited for (the transfer is already there). None when nothing is ready."""
        if not store_eligible(request) or request.skip_reading_prefix_cache:
            return None
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _Req(self._keys(request))
        first_c = start // self.chunk_tokens
        n = self.store.count_ready(st.keys, first_c)
        stop = min(first_c + n, end // self.chunk_tokens) * self.chunk_tokens
        COUNTS.add("misses", max(0, len(st.keys) - max(start, stop) // self.chunk_tokens))
        if stop <= start:
            return None
        return self._pin_job(request.request_id, st, block_ids, start // self.block_size, stop // self.block_size)

    def _pin_job(self, req_id: str, st: _Req, block_ids: list[int], first_b: int, last_b: int) -> StoreJob | None:
        """Pin the chunks that hold blocks first_b..last_b and plan their copy into ``block_ids``
        (None if a chunk is gone or the blocks are not all there)."""
        cb = self.chunk_blocks
        c0, c1 = first_b // cb, -(-last_b // cb)
        keys = st.keys[c0:c1]
        if last_b > len(block_ids):
            return None
        slots = self.store.pin_for_load(keys)
        if slots is None:
            return None
        pieces = []
        for c, slot in zip(range(c0, c1), slots):
            lo = max(first_b, c * cb)
            pieces.append((slot, lo - c * cb, min(last_b, (c + 1) * cb) - lo))
        self._loading[req_id] = keys
        COUNTS.add("hits.ram", len(keys))
        COUNTS.add("hit_tokens", (last_b - first_b) * self.block_size)
        return StoreJob(req_id, pieces, list(block_ids[first_b:last_b]))

    def loads_done(self, req_ids: set[str], failed: set[str] | None = None) -> None:
        for rid in req_ids:
            keys = self._loading.pop(rid, None)
            if keys is not None:
                self.store.unpin(keys)
                if failed and rid in failed:
                    # Only a bug gets here (bad chunks never reach RAM). vLLM's kv_load_failure_policy
                    # ends the request (fail) or recomputes it (recompute): then without the store,
                    # so the same failure cannot repeat.
                    st = self._reqs.get(rid)
                    if st is not None:
                        st.off = True

    def on_finished(self, request: Request, block_ids: list[int], ended_early: bool) -> StoreJob | None:
        """A save of the prompt's whole chunks the store lacks, or None."""
        st = self._reqs.pop(request.request_id, None)
        if not self.save or ended_early or not store_eligible(request):
            return None
        keys = st.keys if st is not None else self._keys(request)
        n = min(request.num_computed_tokens, request.num_prompt_tokens, len(block_ids) * self.block_size)
        cb = self.chunk_blocks
        pieces, bids, saving = [], [], []
        for c in range(min(n // self.chunk_tokens, len(keys))):
            slot = self.store.reserve_for_save(keys[c])
            if slot is None:
                continue
            pieces.append((slot, 0, cb))
            bids += block_ids[c * cb:(c + 1) * cb]
            saving.append(keys[c])
        if not pieces:
            return None
        self._saving[request.request_id] = (saving, keys[:n // self.chunk_tokens])
        return StoreJob(request.request_id, pieces, bids)

    @property
    def saving(self) -> bool:
        return bool(self._saving)

    def saves_done(self, results: dict[str, bool]) -> None:
        for rid, ok in results.items():
            saving = self._saving.pop(rid, None)
            if saving is not None:
                self.store.saved(saving[0], ok, run=saving[1])

    def stats(self) -> dict[str, Any] | None:
        """Counts since the last call and bytes held now (None when nothing changed)."""
        held = self.store.held_bytes()
        counts = COUNTS.snapshot()
        delta = {k: v - self._counted.get(k, 0) for k, v in counts.items() if v != self._counted.get(k, 0)}
        self._counted = counts
        events = self.store.take_events()
        if not self._named:  # the key space, once, before any key
            events.insert(0, ("ns", self.ns.hex(), str(self.chunk_tokens)))
            self._named = True
        if not delta and not events and held == self._held:
            return None
        self._held = held
        return {"counts": delta, "held": held, "events": events}


@dataclass
class _Copied:
    loads: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    saves: dict[str, bool] = field(default_factory=dict)


@dataclass
class _CopyStats:
    load_seconds: list[float] = field(default_factory=list)
    load_bytes: int = 0
    save_seconds: list[float] = field(default_factory=list)


class StoreCopier:
    """The worker half: copies between engine blocks and arena slots on one thread."""

    def __init__(self, kv: PagedKV, arena: Arena, chunk_blocks: int) -> None:
        layout = kv.layout
        itemsize = torch.tensor([], dtype=kv.dtype).element_size()
        want = layout.num_layers * chunk_blocks * layout.block_numel * itemsize
        if want != arena.slot_bytes:
            raise RuntimeError(f"KV store: a chunk of this engine's KV is {want} bytes, the arena's slots "
                               f"{arena.slot_bytes} (the connector's halves disagree on the layout)")
        flat = torch.from_numpy(np.frombuffer(arena.buffer(), dtype=np.uint8))
        self.slots = flat.view(kv.dtype).view(arena.num_slots, layout.num_layers, chunk_blocks,
                                              *layout.block_shape)
        self.kv = kv
        self.block_bytes = layout.num_layers * layout.block_numel * itemsize
        self._jobs: queue.Queue[tuple[str, StoreJob] | None] = queue.Queue()
        self._done = _Copied()
        self._stats = _CopyStats()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kvstore-copier", daemon=True)
        self._thread.start()

    def submit(self, kind: str, job: StoreJob) -> None:
        self._jobs.put((kind, job))

    def take(self) -> _Copied:
        """The loads and saves that ended since the last call."""
        with self._lock:
            done, self._done = self._done, _Copied()
        return done

    def take_stats(self) -> _CopyStats:
        """Copy times and bytes since the last call (read with the connector's stats, not each step)."""
        with self._lock:
            stats, self._stats = self._stats, _CopyStats()
        return stats

    def load_now(self, job: StoreJob) -> bool:
        """Copy a sync load (StoreJob.sync) on the calling thread, the worker's, before the step's
        forward; whether it was copied (a broken one never is). Counted in the stats, not in
        ``take``: the worker reports it itself."""
        if job.broken:
            return False
        return self._do("load", job, report=False)

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            self._do(*item)

    def _do(self, kind: str, job: StoreJob, report: bool = True) -> bool:
        t0 = time.perf_counter()
        ok = True
        try:
            self._copy(kind, job)
        except Exception:
            ok = False
            logger.exception("KV store: %s of request %s failed", kind, job.req_id)
        secs = time.perf_counter() - t0
        with self._lock:
            if kind == "load":
                self._stats.load_seconds.append(secs)
                self._stats.load_bytes += job.num_blocks * self.block_bytes if ok else 0
                if report:
                    # A failed copy is a bug, not a bad chunk (those never reach RAM); it is a failed
                    # load all the same, which vLLM's kv_load_failure_policy handles.
                    (self._done.loads if ok else self._done.failed).add(job.req_id)
            else:
                self._done.saves[job.req_id] = ok
                self._stats.save_seconds.append(secs)
        return ok

    def _copy(self, kind: str, job: StoreJob) -> None:
        views = self.kv.views
        at = 0
        for slot, first, n in job.pieces:
            idx = self.kv.index(job.block_ids[at:at + n])
            at += n
            for layer, view in enumerate(views):
                part = self.slots[slot, layer, first:first + n]
                if kind == "load":
                    view.index_copy_(0, idx, part)
                else:
                    torch.index_select(view, 0, idx, out=part)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)
