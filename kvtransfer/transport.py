"""Data planes that carry block bytes: UCX (through ucxx) first, plain TCP as the fallback.

Both sides of a transfer speak over a TCP control channel (``wire``); the data
plane only moves the one contiguous buffer of blocks per fetch.

UCX notes (measured on the CPU hosts this grew on): the context asks for the
TAG feature only, because the WAKEUP feature that ucxx asks for by default
leaves the shared-memory transports out; endpoints are made from worker
addresses swapped over the control channel, without UCX's peer error handling
(which also rules out shared memory), so a dead peer is noticed by the control
channel and by the progress timeout instead. ``worker.progress()`` is polled
only while a transfer is in flight: an idle spin would steal a core.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from .wire import recv_exact_into

logger = logging.getLogger(__name__)

# posix shared memory rather than all of "sm": with sm, UCX moves large messages by CMA
# (process_vm_readv), which ran at ~4.5 GB/s between two processes here against ~7.5-9 GB/s
# for posix's pipelined copies (make bench-kv, 64-256 MiB). tcp stays for other hosts.
DEFAULT_CPU_UCX_TLS = "tcp,posix,self"


class TransferError(RuntimeError):
    """A block transfer failed; the request it served cannot use those blocks."""


class DataPlane(Protocol):
    """Moves one fetch as a sequence of chunks (one per layer), so that packing,
    moving and unpacking overlap instead of running one after another."""

    name: str

    def local_info(self) -> dict[str, Any]: ...

    def connect(self, peer_info: dict[str, Any]) -> object: ...

    def send_chunks(self, peer: object, sock: socket.socket, chunks: Iterator[np.ndarray], tag: int) -> None: ...

    def recv_chunks(self, peer: object, sock: socket.socket, bufs: list[np.ndarray], tag: int,
                    on_chunk: Callable[[int], None]) -> None: ...


class TcpDataPlane:
    """Block bytes follow the control header on the same TCP socket."""

    name = "tcp"

    def local_info(self) -> dict[str, Any]:
        return {}

    def connect(self, peer_info: dict[str, Any]) -> object:
        return None

    def send_chunks(self, peer: object, sock: socket.socket, chunks: Iterator[np.ndarray], tag: int) -> None:
        for buf in chunks:
            sock.sendall(memoryview(buf).cast("B"))

    def recv_chunks(self, peer: object, sock: socket.socket, bufs: list[np.ndarray], tag: int,
                    on_chunk: Callable[[int], None]) -> None:
        for i, buf in enumerate(bufs):
            recv_exact_into(sock, memoryview(buf).cast("B"))
            on_chunk(i)


class UcxDataPlane:
    """One UCX worker per process; tagged messages; progress polled only while busy."""

    name = "ucx"

    def __init__(self, timeout_s: float = 60.0) -> None:
        os.environ.setdefault("UCX_TLS", DEFAULT_CPU_UCX_TLS)
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        try:
            import ucxx._lib.libucxx as ucx_api
            from ucxx._lib.arr import Array
        except Exception as exc:  # ImportError, or the library failing to load
            raise TransferError(f"UCX (ucxx) cannot be loaded: {exc}") from exc
        self._api = ucx_api
        self._array = Array
        self._ctx = ucx_api.UCXContext({}, (ucx_api.Feature.TAG,))
        self._worker = ucx_api.UCXWorker(self._ctx)
        self._lock = threading.Lock()
        self._timeout_s = timeout_s

    def local_info(self) -> dict[str, Any]:
        return {"ucx_address": bytes(self._worker.address.tobytes()).hex()}

    def connect(self, peer_info: dict[str, Any]) -> object:
        hexaddr = peer_info.get("ucx_address")
        if not hexaddr:
            raise TransferError("peer offered no UCX worker address")
        addr = self._api.UCXAddress.create_from_buffer(bytes.fromhex(hexaddr))
        with self._lock:
            return self._api.UCXEndpoint.create_from_worker_address(self._worker, addr, False)

    def _progress_until(self, done: Callable[[], bool], what: str) -> None:
        """Poll UCX until ``done()``; spin briefly, then back off with short sleeps so a
        wait on a slow peer does not take the core (and the GIL) from the engine."""
        deadline = time.monotonic() + self._timeout_s
        spins, pause = 0, 20e-6
        while not done():
            if self._worker.progress_once():
                spins = 0
                continue
            spins += 1
            if spins > 100:
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
            if time.monotonic() > deadline:
                raise TransferError(f"UCX {what} did not complete in {self._timeout_s:.0f} s")

    def _tag(self, tag: int, i: int) -> Any:
        return self._api.UCXXTag((tag << 16) | i)

    def send_chunks(self, peer: object, sock: socket.socket, chunks: Iterator[np.ndarray], tag: int) -> None:
        with self._lock:
            reqs = []
            for i, buf in enumerate(chunks):
                reqs.append(peer.tag_send(self._array(buf), self._tag(tag, i)))  # type: ignore[attr-defined]
                self._worker.progress()
            self._progress_until(lambda: all(r.completed for r in reqs), "send")
            for r in reqs:
                r.check_error()

    def recv_chunks(self, peer: object, sock: socket.socket, bufs: list[np.ndarray], tag: int,
                    on_chunk: Callable[[int], None]) -> None:
        with self._lock:
            reqs = [self._worker.tag_recv(self._array(b), self._tag(tag, i)) for i, b in enumerate(bufs)]
            for i, r in enumerate(reqs):
                self._progress_until(lambda r=r: r.completed, "receive")
                r.check_error()
                on_chunk(i)


def make_data_planes(transport: str) -> dict[str, DataPlane]:
    """The data planes this process offers, in order of preference.

    ``ucx``: UCX only (an error if it cannot load). ``tcp``: TCP only.
    ``auto``: UCX and TCP; if UCX cannot load, TCP alone, with a warning.
    """
    if transport not in ("auto", "ucx", "tcp"):
        raise ValueError(f"unknown KV transport {transport!r}; expected auto, ucx or tcp")
    planes: dict[str, DataPlane] = {}
    if transport in ("auto", "ucx"):
        try:
            planes["ucx"] = UcxDataPlane()
        except TransferError as exc:
            if transport == "ucx":
                raise
            logger.warning("KV transport falls back to TCP: %s", exc)
    if transport in ("auto", "tcp"):
        planes["tcp"] = TcpDataPlane()
    return planes


def choose_plane(mine: dict[str, DataPlane], theirs: list[str]) -> DataPlane:
    """The first of my planes (in my order) that the peer also offers."""
    for name, plane in mine.items():
        if name in theirs:
            return plane
    raise TransferError(f"no common KV transport: this end offers {list(mine)}, the peer {theirs}")
