"""A node's KV store as its connector's scheduler half sees it: the shared RAM arena's index over
an optional disk tier, with two background threads for the disk: one promotes (disk -> RAM, a
request waits on it), one writes behind (RAM -> disk, nothing waits on it), so a promotion never
queues behind writes.

  count_ready(keys, start)   leading chunks ready in RAM from chunk ``start``
  promote(keys, start)       read the chunks that follow from disk into RAM slots
                             (verified on the way; a bad file is a counted miss)
  pin_for_load / unpin       slots a worker load reads, kept from eviction meanwhile
  reserve_for_save / saved   slots a worker save fills; once filled, written
                             through to disk in the background (a full queue drops
                             the write and counts it, never blocks)

Only RAM hits are ever promised to vLLM: a disk hit is first promoted (the
request waits a step or two), so a chunk that fails its check costs a
recompute of that chunk, never a failed load or wrong tokens. Every chunk in
RAM is also written to disk, so a restart finds what the node had.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

from .arena import Arena, SlotIndex
from .tiers import COUNTS, DiskTier

logger = logging.getLogger(__name__)


@dataclass
class _Task:
    kind: str  # "promote" (disk -> slot) or "write" (slot -> disk)
    key: bytes
    slot: int


class NodeStore:
    def __init__(self, arena: Arena, disk: DiskTier | None, queue_chunks: int = 64,
                 eviction: str = "tail-first") -> None:
        self.arena = arena
        self.disk = disk
        self.slot_bytes = arena.slot_bytes
        self._events: list[tuple[str, str, str]] = []  # ("+" | "-", key hex, tier): for routing
        self._events_lock = threading.Lock()
        self.index = SlotIndex(arena.num_slots, on_drop=lambda k: self._note("-", k, "ram"), policy=eviction)
        self._lock = threading.Lock()
        self._promoted = threading.Condition(self._lock)  # a promotion ended (wait_promoted)
        if disk is not None:
            for k in disk.keys():  # what an earlier run left
                self._note("+", k, "disk")
            disk.on_change = lambda op, k: self._note(op, k, "disk")
        # Writes behind are bounded (a full queue drops the write, counted); promotions are not: each
        # holds a reserved slot already, so the arena bounds them.
        self._tasks: queue.Queue[_Task | None] = queue.Queue(maxsize=queue_chunks)
        self._promotes: queue.Queue[_Task | None] = queue.Queue()
        self._promoting: set[bytes] = set()
        self._threads: list[tuple[queue.Queue[_Task | None], threading.Thread]] = []
        if disk is not None:
            for q, name in ((self._promotes, "kvstore-promote"), (self._tasks, "kvstore-write")):
                t = threading.Thread(target=self._run, args=(q,), name=name, daemon=True)
                t.start()
                self._threads.append((q, t))

    def _note(self, op: str, key: bytes, tier: str) -> None:
        with self._events_lock:
            self._events.append((op, key.hex(), tier))

    def pending(self) -> bool:
        """Disk work queued or events not yet taken (vLLM keeps stepping until they are out)."""
        with self._events_lock:
            if self._events:
                return True
        return bool(self._tasks.unfinished_tasks or self._promotes.unfinished_tasks)

    def take_events(self) -> list[tuple[str, str, str]]:
        """What entered or left a tier since the last call (kvstore/held.py)."""
        with self._events_lock:
            out, self._events = self._events, []
        return out

    # lookups --------------------------------------------------------------
    def count_ready(self, keys: list[bytes], start: int) -> int:
        """How many of ``keys[start:]`` are ready in RAM, consecutively from ``start``."""
        n = 0
        with self._lock:
            for k in keys[start:]:
                if not self.index.ready(k):
                    break
                n += 1
            self.index.used(keys[:start + n])
        return n

    def promote(self, keys: list[bytes], start: int) -> int:
        """Start reading ``keys[start:]`` (consecutive, while on disk) into RAM; how many started.
        A chunk already on its way counts as started."""
        if self.disk is None:
            return 0
        n = 0
        with self._lock:
            for k in keys[start:]:
                if k in self._promoting:
                    n += 1
                    continue
                if self.index.has(k) or k not in self.disk:
                    break
                slot = self.index.reserve(k)
                if slot is None:
                    break
                self._promotes.put_nowait(_Task("promote", k, slot))
                self._promoting.add(k)
                n += 1
        return n

    def promoting(self, keys: list[bytes]) -> bool:
        with self._lock:
            return any(k in self._promoting for k in keys)

    def wait_promoted(self, keys: list[bytes], timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until none of ``keys`` is on its way up from disk; whether so."""
        with self._promoted:
            return self._promoted.wait_for(lambda: not any(k in self._promoting for k in keys), timeout_s)

    # loads ----------------------------------------------------------------
    def pin_for_load(self, keys: list[bytes]) -> list[int] | None:
        """The slots of ``keys``, pinned until unpin(); None (nothing pinned) if one is not ready."""
        with self._lock:
            if not all(self.index.ready(k) for k in keys):
                return None
            return [self.index.pin(k) for k in keys]

    def unpin(self, keys: list[bytes]) -> None:
        with self._lock:
            for k in keys:
                self.index.unpin(k)

    # saves ----------------------------------------------------------------
    def reserve_for_save(self, key: bytes) -> int | None:
        """A slot for a chunk the worker will copy in; None when it is held already (or on its way)
        or no slot is free of pins (then the save is dropped and counted)."""
        with self._lock:
            if self.index.has(key) or key in self._promoting:
                return None
            slot = self.index.reserve(key)
        if slot is None:
            COUNTS.add("dropped_saves")
        return slot

    def saved(self, keys: list[bytes], ok: bool, run: list[bytes] | None = None) -> None:
        """The worker filled (or failed to fill) these reserved slots; ``run``: the prompt's chunks
        they belong to, in prompt order (all of them used now, for the eviction order)."""
        writes = []
        with self._lock:
            for k in keys:
                if not self.index.has(k):
                    continue
                self.index.fill_done(k, ok)
                if ok:
                    self._note("+", k, "ram")
                if ok and self.disk is not None and k not in self.disk:
                    writes.append((k, self.index.pin(k)))
            self.index.used(run if run is not None else keys)
        if ok:
            COUNTS.add("bytes.ram.stored", len(keys) * self.slot_bytes)
        for k, slot in writes:
            try:
                self._tasks.put_nowait(_Task("write", k, slot))
            except queue.Full:
                COUNTS.add("dropped_saves")
                self.unpin([k])

    # the disk threads -------------------------------------------------------
    def _run(self, tasks: queue.Queue[_Task | None]) -> None:
        assert self.disk is not None
        while True:
            task = tasks.get()
            try:
                if task is None:
                    return
                if task.kind == "promote":
                    self._promote_one(task)
                else:
                    self._write_one(task)
            except Exception as exc:  # the thread must live on; the chunk is a miss or not written
                logger.warning("KV store: %s of chunk %s failed: %s", task.kind if task else "?",
                               task.key.hex()[:16] if task else "?", exc)
            finally:
                tasks.task_done()

    def _promote_one(self, task: _Task) -> None:
        assert self.disk is not None
        data = None
        try:
            data = self.disk.get(task.key)  # verified: a bad file is removed and counted there
            if data is not None and len(data) != self.slot_bytes:
                logger.warning("KV store: chunk %s on disk is %d bytes, a slot %d; ignored",
                               task.key.hex()[:16], len(data), self.slot_bytes)
                data = None
            if data is not None:
                self.arena.write(task.slot, data)
        finally:
            with self._lock:  # the event too: an eviction right after must be noted after it
                self._promoting.discard(task.key)
                self.index.fill_done(task.key, ok=data is not None)
                if data is not None:
                    self._note("+", task.key, "ram")
                self._promoted.notify_all()
        COUNTS.add("hits.disk" if data is not None else "misses.disk")

    def _write_one(self, task: _Task) -> None:
        """Straight from the slot (pinned until the write ends: no copy of the chunk on the way)."""
        assert self.disk is not None
        try:
            with self.arena.view(task.slot) as data:
                self.disk.put(task.key, data)
        except OSError as exc:
            COUNTS.add("dropped_saves")
            logger.warning("KV store: could not write a chunk to %s: %s", self.disk.root, exc)
        finally:
            self.unpin([task.key])

    def drop_ram(self) -> bool:
        """Forget every RAM chunk not in use (the disk keeps its copies, their cached pages dropped, so
        the next hit there reads the disk); False when some were in use and stayed."""
        with self._lock:
            kept = self.index.drop_unpinned()
            keys = list(self.disk.keys()) if self.disk is not None else []
        for k in keys:
            assert self.disk is not None
            self.disk.drop_page_cache(k)
        return kept == 0

    # the rest ---------------------------------------------------------------
    def held_bytes(self) -> dict[str, int]:
        with self._lock:
            ram = self.index.num_ready() * self.slot_bytes
        return {"ram": ram, "disk": self.disk.held if self.disk is not None else 0}

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until the disk threads have nothing left (tests, shutdown)."""
        import time

        deadline = time.monotonic() + timeout_s
        while (self._tasks.unfinished_tasks or self._promotes.unfinished_tasks) and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self, timeout_s: float = 10.0) -> None:
        for q, t in self._threads:
            try:
                q.put(None, timeout=timeout_s)
            except queue.Full:
                logger.warning("KV store: the disk writes did not drain in %.0f s", timeout_s)
        for _, t in self._threads:
            t.join(timeout=timeout_s)
        self._threads = []
