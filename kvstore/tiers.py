"""The KV store's disk tier (a directory, byte cap, least recently used first out), checksummed,
and the store's event counts. The RAM tier is kvstore/arena.py; the two are joined, for a node,
by kvstore/nodestore.py.

Disk files are written whole to a temporary name and renamed into place, and
carry a header with the key, the payload's length and its SHA-256: a torn
write (a temporary file left by a crash), a flipped byte or a truncated file
is a miss that is counted and removed, never wrong data. The directory is
scanned at start, so the disk tier survives a restart.

Files are written and read with O_DIRECT where the filesystem allows it (else
through the page cache, said once in the log): the header fills the file's
first 4 KiB page and the payload is padded to whole pages, so both move
between the device and a page-aligned buffer. A buffered write of a 4 MiB chunk
cost ~14 ms of the node's CPU on the twenty-fifth sitting's VM (the kernel's
page cache work), an O_DIRECT one 0.4-0.7 ms; the node's one core ran its
prefills 1.37x slower than its profile while its store wrote each saved chunk
through (docs/PERFORMANCE.md). The page cache would also have held the disk
tier's chunks a second time in RAM that no cap counts.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import itertools
import logging
import mmap
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
# 2: the header fills the first page and the payload is padded to whole pages (O_DIRECT); version 1
# files (the header, then the payload) are still read
VERSION = 2
_HEADER = struct.Struct(f"<4sHH{KEY_BYTES}sQ32s")  # magic, version, reserved, key, payload length, sha256
PAGE = 4096  # O_DIRECT's alignment of buffers, lengths and offsets (a device's logical block divides it)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def chunk_file_bytes(payload: int) -> int:
    """The size of the file that holds a chunk of ``payload`` bytes (what the cap counts)."""
    return PAGE + _pages(payload)


class _Buffers(threading.local):
    """One page-aligned buffer per thread, grown as needed: what O_DIRECT moves to and from."""

    def __init__(self) -> None:
        self.mm: mmap.mmap | None = None

    def get(self, n: int) -> mmap.mmap:
        if self.mm is None or len(self.mm) < n:
            # (the old one is unmapped once no view of it is left)
            self.mm = mmap.mmap(-1, _pages(max(n, 1)))  # anonymous: page-aligned, zero-filled
        return self.mm
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
        self.direct = bool(_O_DIRECT)  # O_DIRECT until the filesystem refuses it (then buffered)
        self._buffers = _Buffers()
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

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a chunk key is {KEY_BYTES} bytes, got {len(key)}")
        payload = len(data)
        size = chunk_file_bytes(payload)
        if size > self.cap:
            return
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        buf = self._buffers.get(size)
        _HEADER.pack_into(buf, 0, MAGIC, VERSION, 0, key, payload, hashlib.sha256(data).digest())
        buf[_HEADER.size:PAGE] = bytes(PAGE - _HEADER.size)
        buf[PAGE:PAGE + payload] = data
        buf[PAGE + payload:size] = bytes(size - PAGE - payload)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)  # unique across processes
        try:
            try:
                self._write(fd, memoryview(buf)[:size])
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
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
        COUNTS.add("bytes.disk.stored", payload)

    def _write(self, fd: int, view: memoryview) -> None:
        """All of ``view`` (page-aligned, whole pages) to ``fd``: O_DIRECT while the filesystem takes it."""
        if self.direct and self._set_direct(fd, True):
            try:
                _pwrite_all(fd, view)
                return
            except OSError as exc:  # the flag taken, aligned I/O refused all the same
                if exc.errno != errno.EINVAL:
                    raise
                self._no_direct(exc)
                self._set_direct(fd, False)
        _pwrite_all(fd, view)

    def _set_direct(self, fd: int, on: bool) -> bool:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
            return True
        except OSError as exc:
            if on:
                self._no_direct(exc)
            return False

    def _no_direct(self, exc: OSError) -> None:
        if self.direct:
            self.direct = False
            logger.info("KV store: %s refuses O_DIRECT (%s); its chunks go through the page cache", self.root, exc)

    def _read(self, path: Path) -> memoryview:
        """The whole file, in this thread's buffer (valid until its next read)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            view = memoryview(self._buffers.get(_pages(size)))[:_pages(size)]
            if self.direct and self._set_direct(fd, True):
                try:
                    return view[:_pread_all(fd, view, size)]
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._no_direct(exc)
                    self._set_direct(fd, False)
            return view[:_pread_all(fd, view, size)]
        finally:
            os.close(fd)

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
            raw = self._read(path)
        except OSError as exc:  # gone (evicted meanwhile, cleared by hand) or unreadable: a miss
            if not isinstance(exc, FileNotFoundError):
                logger.warning("KV store: could not read chunk %s: %s", key.hex()[:16], exc)
            self._forget(key, gen, path)
            return None
        why, at, length = _check(raw, key)
        if why:
            if self._forget(key, gen, path):
                COUNTS.add("corrupt_chunks")
                logger.warning("KV store: chunk %s on disk failed its check (%s); removed", key.hex()[:16], why)
            return None
        data = bytes(raw[at:at + length])
        COUNTS.add("bytes.disk.loaded", length)
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


def _pwrite_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], done)


def _pread_all(fd: int, view: memoryview, size: int) -> int:
    """Read the file's ``size`` bytes into ``view`` (whole pages long); how many came."""
    got = 0
    while got < size:
        n = os.preadv(fd, [view[got:]], got)
        if n <= 0:
            break
        got += n
    return got


def _check(raw: bytes | memoryview, key: bytes) -> tuple[str, int, int]:
    """(why ``raw`` is not a good chunk file for ``key``, '' when it is; where its payload starts;
    the payload's length)."""
    if len(raw) < _HEADER.size:
        return "shorter than its header", 0, 0
    magic, version, _, k, length, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC or version not in (1, VERSION):
        return "not a chunk file of a known version", 0, 0
    if k != key:
        return "holds another key", 0, 0
    at, size = (_HEADER.size, _HEADER.size + length) if version == 1 else (PAGE, chunk_file_bytes(length))
    if len(raw) != size:
        return f"{len(raw)} bytes, its header says {size}", 0, 0
    if hashlib.sha256(memoryview(raw)[at:at + length]).digest() != digest:
        return "checksum mismatch", 0, 0
    return "", at, length
