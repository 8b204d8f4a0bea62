"""The RAM tier a node's processes share: fixed-size chunk slots in one shared-memory file.

vLLM runs a connector twice, in two processes: the scheduler half (engine core)
decides what is stored where, the worker half (beside the KV cache) copies
blocks into and out of the slots. Both map the same file. The worker creates
it (it starts first); the scheduler opens it, then unlinks its name, so the
memory goes back to the system when the last of them exits, crash or not.

SlotIndex, used by the scheduler half alone, says which key is in which slot:
least recently used first out, and never a slot still being filled, read by
a load or written to disk (pinned).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .tiers import COUNTS


class Arena:
    """``num_slots`` slots of ``slot_bytes`` in a shared file, mapped into this process."""

    def __init__(self, path: str | Path, num_slots: int, slot_bytes: int, create: bool) -> None:
        if num_slots <= 0 or slot_bytes <= 0:
            raise ValueError(f"an arena needs slots and bytes per slot, got {num_slots} x {slot_bytes}")
        self.path = Path(path)
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        size = num_slots * slot_bytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError:
            raise RuntimeError(f"KV store: {self.path} exists already (another node with this engine id?)") from None
        except FileNotFoundError:
            raise RuntimeError(f"KV store: {self.path} is missing; the worker half creates it before the "
                               "scheduler half opens it") from None
        try:
            if create:
                try:
                    os.posix_fallocate(fd, 0, size)  # the RAM now, or a clear error (not SIGBUS later)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                        raise RuntimeError(
                            f"KV store: no room for a {size / 2**30:.2f} GiB RAM tier in {self.path.parent} "
                            f"(free: {_free_bytes(self.path.parent) / 2**30:.2f} GiB); lower --kvstore-ram-gib "
                            "or give the container more shared memory (docker: --shm-size)") from None
                    raise
            else:
                have = os.fstat(fd).st_size
                if have != size:
                    raise RuntimeError(f"KV store: {self.path} holds {have} bytes, expected {size} "
                                       "(the two halves disagree on the layout)")
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            if create:
                self.path.unlink(missing_ok=True)
            raise
        os.close(fd)  # the mapping keeps the memory

    def buffer(self) -> mmap.mmap:
        """The whole arena (for a numpy or torch view over it)."""
        return self._mm

    def read(self, slot: int) -> bytes:
        off = self._offset(slot)
        return self._mm[off:off + self.slot_bytes]

    def view(self, slot: int) -> memoryview:
        """The slot itself, no copy (release it, ``with``, before the arena closes)."""
        off = self._offset(slot)
        return memoryview(self._mm)[off:off + self.slot_bytes]

    def write(self, slot: int, data: bytes | memoryview) -> None:
        if len(data) != self.slot_bytes:
            raise ValueError(f"a slot holds {self.slot_bytes} bytes, got {len(data)}")
        off = self._offset(slot)
        self._mm[off:off + self.slot_bytes] = data

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside 0..{self.num_slots - 1}")
        return slot * self.slot_bytes

    def unlink(self) -> None:
        """Drop the file's name; the memory lives on while a process maps it."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # a view still points into it; the process is ending anyway
            pass


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def lock_dir(path: Path) -> int:
    """Hold ``path``/.lock for this process's life: one node per disk tier directory."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"KV store: {path} is in use by another node; give each node its own "
                           "--kvstore-dir") from None
    return fd


@dataclass
class _Entry:
    slot: int
    ready: bool = False  # filled (by a save or a promotion from disk): a load may read it
    pins: int = 0  # a fill, loads or a disk write in flight: not evictable


# The RAM tier's eviction policies (`--kvstore-eviction`; `tandem bench kvstore` replays workloads
# through each and reports its hit rate):
#   tail-first  least recently used first; of one prompt's chunks, the later ones before the earlier
#               (a chunk is no use without the ones before it, and the early ones are what other
#               prompts share)
#   lru         least recently used first, a prompt's chunks in prompt order (so its first goes first)
#   fifo        first stored, first evicted; use does not count
EVICTIONS = ("tail-first", "lru", "fifo")


class SlotIndex:
    """Which chunk key is in which slot, in eviction order (see EVICTIONS). Not thread-safe: the
    caller (the scheduler half's store) holds its lock around every call."""

    def __init__(self, num_slots: int, on_drop: Callable[[bytes], None] | None = None,
                 policy: str = "tail-first") -> None:
        if policy not in EVICTIONS:
            raise ValueError(f"unknown eviction policy {policy!r} (one of {', '.join(EVICTIONS)})")
        self.num_slots = num_slots
        self.policy = policy
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._free = list(range(num_slots - 1, -1, -1))
        self.evictions = 0
        self.on_drop = on_drop  # a ready chunk left (evicted or dropped)

    def __len__(self) -> int:
        return len(self._entries)

    def ready(self, key: bytes) -> bool:
        e = self._entries.get(key)
        return e is not None and e.ready

    def num_ready(self) -> int:
        return sum(1 for e in self._entries.values() if e.ready)

    def has(self, key: bytes) -> bool:
        """Ready or being filled."""
        return key in self._entries

    def slot(self, key: bytes) -> int:
        return self._entries[key].slot

    def used(self, keys: list[bytes]) -> None:
        """One prompt used (or stored) these chunks, given in prompt order."""
        if self.policy == "fifo":
            return
        for k in reversed(keys) if self.policy == "tail-first" else keys:
            if k in self._entries:
                self._entries.move_to_end(k)

    def reserve(self, key: bytes) -> int | None:
        """A slot for ``key`` to be filled (pinned, not ready), evicting the first unpinned
        chunk in eviction order when none is free; None when every slot is pinned."""
        if key in self._entries:
            raise ValueError("this key has a slot already")
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                return None
            slot = self._entries.pop(victim).slot
            self.evictions += 1
            COUNTS.add("evictions.ram")
            if self.on_drop is not None:
                self.on_drop(victim)
        self._entries[key] = _Entry(slot, ready=False, pins=1)
        return slot

    def fill_done(self, key: bytes, ok: bool) -> None:
        """A reserved slot was filled (ready now) or could not be (freed)."""
        e = self._entries[key]
        e.pins -= 1
        if ok:
            e.ready = True
        else:
            self._drop(key)

    def pin(self, key: bytes) -> int:
        e = self._entries[key]
        e.pins += 1
        return e.slot

    def unpin(self, key: bytes) -> None:
        e = self._entries.get(key)
        if e is not None:
            e.pins -= 1

    def drop_unpinned(self) -> int:
        """Free every slot not pinned; how many stayed."""
        for k in [k for k, e in self._entries.items() if e.pins == 0]:
            ready = self._entries[k].ready
            self._drop(k)
            if ready and self.on_drop is not None:
                self.on_drop(k)
        return len(self._entries)

    def _drop(self, key: bytes) -> None:
        e = self._entries.pop(key)
        self._free.append(e.slot)
