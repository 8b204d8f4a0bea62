"""The KV store's disk tier (a directory, byte cap, least recently used first out), checksummed,
and the store's event counts. The RAM tier is kvstore/arena.py; the two are joined, for a node,
by kvstore/nodestore.py.

Disk files are written whole to a temporary name and renamed into place, and
carry a header with the key, the payload's length and its SHA-256: a torn
write (a temporary file left by a crash), a flipped byte or a truncated file
is a miss that is counted and removed, never wrong data. The directory is
scanned at start, so the disk tier survives a restart.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import logging
import os
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .keys import KEY_BYTES

logger = logging.getLogger(__name__)


class Counts:
    """The store's event counts, plain numbers. The node exports them through vLLM's stat loggers
    (kvtransfer/stats.py: the store lives in vLLM's engine-core process, not the node's), as
    tandem_kvstore_*: hits.<tier>, misses, bytes.<tier>.<stored|loaded>, evictions.<tier>,
    dropped_saves, corrupt_chunks."""

    def __init__(self) -> None:
        self._c: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._c[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._c[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


COUNTS = Counts()
HELD: dict[str, int] = {"ram": 0, "disk": 0}  # bytes held per tier, as last set

MAGIC = b"TKVC"
VERSION = 1
_HEADER = struct.Struct(f"<4sHH{KEY_BYTES}sQ32s")  # magic, version, reserved, key, payload length, sha256
TMP_PREFIX = ".tmp-"
TMP_STALE_S = 600.0  # a temporary file this old is a crash's torn write (younger: another process writing)


class DiskTier:
    """Chunks as files under ``root`` (two-level by key), least recently used first out."""

    def __init__(self, root: str | Path, cap_bytes: int, durable: bool = True) -> None:
        if cap_bytes < 0:
            raise ValueError(f"disk tier cap must be >= 0 bytes, got {cap_bytes}")
        self.root = Path(root)
        self.cap = cap_bytes
        self.durable = durable  # fsync each file before it is renamed into place
        self.held = 0
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, least recent first
        # key -> the write that made its file (one counter for all keys, so a key evicted and written
        # again never gets an old number back): a stale reader's check.
        self._gen: dict[bytes, int] = {}
        self._write_no = itertools.count(1)
        self._lock = threading.Lock()
        self.on_change: Callable[[str, bytes], None] | None = None  # ("+" | "-", key), under the lock
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / h

    def _scan(self) -> None:
        """Index what an earlier process left (oldest first); remove its torn writes."""
        found = []
        now = time.time()
        for p in self.root.glob("*/*"):
            try:
                st = p.stat()
            except OSError:
                continue
            if p.name.startswith(TMP_PREFIX):
                if now - st.st_mtime > TMP_STALE_S:
                    p.unlink(missing_ok=True)
                continue
            try:
                key = bytes.fromhex(p.name)
            except ValueError:
                continue
            # Only files exactly where _path puts them (lowercase hex, in their two-letter folder).
            if len(key) == KEY_BYTES and p.is_file() and p.name == key.hex() and p.parent.name == p.name[:2]:
                found.append((st.st_mtime, key, st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self.held += size
        self._evict_over_cap()
        HELD["disk"] = self.held
        if found:
            logger.info("KV store: disk tier %s holds %d chunks, %d MiB", self.root, len(self._index),
                        self.held >> 20)

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    def put(self, key: bytes, data: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a chunk key is {KEY_BYTES} bytes, got {len(key)}")
        size = _HEADER.size + len(data)
        if size > self.cap:
            return
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        header = _HEADER.pack(MAGIC, VERSION, 0, key, len(data), hashlib.sha256(data).digest())
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)  # unique across processes
        try:
            with open(fd, "wb") as f:
                f.write(header)
                f.write(data)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            with self._lock:  # the rename and the index change together: a stale reader sees a new generation
                os.replace(tmp, path)
                old = self._index.pop(key, None)
                if old is not None:
                    self.held -= old
                self._index[key] = size
                self._gen[key] = next(self._write_no)
                self.held += size
                if self.on_change is not None and old is None:
                    self.on_change("+", key)
                self._evict_over_cap()
                HELD["disk"] = self.held
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        COUNTS.add("bytes.disk.stored", len(data))

    def _evict_over_cap(self) -> None:
        n = 0
        while self.held > self.cap and self._index:
            key, size = self._index.popitem(last=False)
            self._gen.pop(key, None)
            self.held -= size
            if self.on_change is not None:
                self.on_change("-", key)
            self._path(key).unlink(missing_ok=True)
            n += 1
        if n:
            COUNTS.add("evictions.disk", n)

    def get(self, key: bytes) -> bytes | None:
        """The chunk, verified; None when absent or when it fails its check (then removed)."""
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
            gen = self._gen.get(key, 0)
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:  # gone (evicted meanwhile, cleared by hand) or unreadable: a miss
            if not isinstance(exc, FileNotFoundError):
                logger.warning("KV store: could not read chunk %s: %s", key.hex()[:16], exc)
            self._forget(key, gen, path)
            return None
        why = _check(raw, key)
        if why:
            if self._forget(key, gen, path):
                COUNTS.add("corrupt_chunks")
                logger.warning("KV store: chunk %s on disk failed its check (%s); removed", key.hex()[:16], why)
            return None
        data = raw[_HEADER.size:]
        COUNTS.add("bytes.disk.loaded", len(data))
        return data

    def _forget(self, key: bytes, gen: int, path: Path) -> bool:
        """Drop a chunk that failed, unless it was written again since it was read (then the file
        there is the new one); True when it was dropped."""
        with self._lock:
            if key not in self._index or self._gen.get(key, 0) != gen:
                return False
            self.held -= self._index.pop(key)
            self._gen.pop(key, None)
            if self.on_change is not None:
                self.on_change("-", key)
            HELD["disk"] = self.held
            path.unlink(missing_ok=True)
        return True

    def drop_page_cache(self, key: bytes) -> None:
        """Ask the kernel to forget the chunk's cached pages (benchmarks: a hit is then a disk read)."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def clear(self) -> None:
        with self._lock:
            keys = list(self._index)
            self._index.clear()
            self._gen.clear()
            self.held = 0
            HELD["disk"] = 0
        for key in keys:
            self._path(key).unlink(missing_ok=True)


def _check(raw: bytes, key: bytes) -> str:
    """Why ``raw`` is not a good chunk file for ``key`` ('' when it is)."""
    if len(raw) < _HEADER.size:
        return "shorter than its header"
    magic, version, _, k, length, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION:
        return "not a chunk file of this version"
    if k != key:
        return "holds another key"
    if len(raw) - _HEADER.size != length:
        return f"payload {len(raw) - _HEADER.size} bytes, header says {length}"
    if hashlib.sha256(memoryview(raw)[_HEADER.size:]).digest() != digest:
        return "checksum mismatch"
    return ""
