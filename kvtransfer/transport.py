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

Isolation: every connection (each decode-side peer lane, each block-server
connection) forks its own plane, and with it its own UCX worker, so a slow or
frozen peer holds up only the transfers on its own connection. ucxx cannot
cancel one posted receive, so a transfer given up mid-way (abort, deadline)
``retire()``s its plane: that worker is never progressed again, and with the
TCP and shared-memory transports no byte lands in a posted buffer without the
receiver's own progress. (RDMA puts into registered memory would; the GPU
path must cancel through UCX before it frees such blocks.)
"""

from __future__ import annotations

import logging
import os
import select
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


class TransferAborted(TransferError):
    """The transfer was given up on purpose (its request was cancelled or migrated)."""


def _keep_going() -> None:
    return None


# Retired UCX workers, each with its endpoint, its abandoned requests and their buffers: kept
# for the life of the process and never progressed again. Letting any of them go could progress
# the worker (ucxx's endpoint and worker destructors do) and land late bytes in blocks that have
# since been given to another request. Past this many, this process stops forking UCX planes
# (its transfers go over TCP) rather than hold more.
MAX_RETIRED_WORKERS = 64
_RETIRED_WORKERS: list[tuple[object, ...]] = []


def _keep_forever(retired: tuple[object, ...]) -> None:
    """Hold ``retired`` past the interpreter's own shutdown too: one reference more than anything
    will ever drop, so its destructors never run. At exit Python clears module globals, and an
    endpoint's destructor (``closeBlocking``) progresses its worker, which retiring promises never
    happens, and cancels its requests in flight. (Once a unit-test run printed its results and
    then kept a core busy for minutes inside such a destructor, ``cancelInflightRequests``; which
    endpoint's was not found, and neither an abandoned send nor receive, retired or not, to a
    live or killed peer, hung at exit in isolation.) The OS takes the memory back at exit."""
    import ctypes

    _RETIRED_WORKERS.append(retired)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(retired))


class DataPlane(Protocol):
    """Moves one fetch as a sequence of chunks (one per layer), so that packing,
    moving and unpacking overlap instead of running one after another."""

    name: str

    def fork(self) -> DataPlane:
        """A plane of the same kind for one connection, independent of every other."""
        ...

    def retire(self, peer: object) -> None:
        """Give this plane (and its connection to ``peer``) up for good after a transfer was
        abandoned mid-way."""
        ...

    def local_info(self) -> dict[str, Any]: ...

    def connect(self, peer_info: dict[str, Any]) -> object: ...

    def send_chunks(self, peer: object, sock: socket.socket, chunks: Iterator[np.ndarray], tag: int,
                    check: Callable[[], None] = _keep_going) -> None: ...

    def recv_chunks(self, peer: object, sock: socket.socket, bufs: list[np.ndarray], tag: int,
                    on_chunk: Callable[[int], None], check: Callable[[], None] = _keep_going) -> None:
        """``check()`` raises to give the transfer up (deadline, abort); it is called between chunks
        and, for UCX, while polling."""
        ...


class TcpDataPlane:
    """Block bytes follow the control header on the same TCP socket."""

    name = "tcp"

    def fork(self) -> TcpDataPlane:
        return TcpDataPlane()

    def retire(self, peer: object) -> None:
        return None  # the caller closes the socket: nothing else points at the buffers

    def local_info(self) -> dict[str, Any]:
        return {}

    def connect(self, peer_info: dict[str, Any]) -> object:
        return None

    def send_chunks(self, peer: object, sock: socket.socket, chunks: Iterator[np.ndarray], tag: int,
                    check: Callable[[], None] = _keep_going) -> None:
        for buf in chunks:
            sock.sendall(memoryview(buf).cast("B"))

    def recv_chunks(self, peer: object, sock: socket.socket, bufs: list[np.ndarray], tag: int,
                    on_chunk: Callable[[int], None], check: Callable[[], None] = _keep_going) -> None:
        # An abort shuts the socket down, which ends a blocked recv at once.
        for i, buf in enumerate(bufs):
            check()
            recv_exact_into(sock, memoryview(buf).cast("B"))
            on_chunk(i)


class UcxDataPlane:
    """One UCX worker per process; tagged messages; progress polled only while busy."""

    name = "ucx"

    def __init__(self, timeout_s: float = 60.0, _parent: UcxDataPlane | None = None) -> None:
        if _parent is None:
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
        else:  # one context per process, one worker per connection
            self._api, self._array, self._ctx = _parent._api, _parent._array, _parent._ctx
        self._worker = self._api.UCXWorker(self._ctx)
        self._lock = threading.Lock()
        self._timeout_s = timeout_s
        self._retired = False
        self._abandoned: list[object] = []  # requests (and their buffers) of a transfer given up

    def fork(self) -> UcxDataPlane:
        if len(_RETIRED_WORKERS) >= MAX_RETIRED_WORKERS:
            raise TransferError(f"{MAX_RETIRED_WORKERS} UCX workers were retired after abandoned transfers; "
                                "this process moves KV over TCP from now on")
        return UcxDataPlane(self._timeout_s, _parent=self)

    def retire(self, peer: object) -> None:
        with self._lock:
            self._retired = True
            _keep_forever((self._worker, peer, self._abandoned))

    def local_info(self) -> dict[str, Any]:
        return {"ucx_address": bytes(self._worker.address.tobytes()).hex()}

    def connect(self, peer_info: dict[str, Any]) -> object:
        hexaddr = peer_info.get("ucx_address")
        if not hexaddr:
            raise TransferError("peer offered no UCX worker address")
        try:
            addr = self._api.UCXAddress.create_from_buffer(bytes.fromhex(hexaddr))
            with self._lock:
                return self._api.UCXEndpoint.create_from_worker_address(self._worker, addr, False)
        except Exception as exc:
            raise _as_transfer_error(exc) from exc

    def _progress_until(self, done: Callable[[], bool], what: str, check: Callable[[], None] = _keep_going) -> None:
        """Poll UCX until ``done()``; spin briefly, then back off with short sleeps so a
        wait on a slow peer does not take the core (and the GIL) from the engine."""
        if self._retired:
            raise TransferError("this UCX worker was retired after an abandoned transfer")
        deadline = time.monotonic() + self._timeout_s
        spins, pause, polls = 0, 20e-6, 0
        while not done():
            polls += 1
            if polls % 64 == 0:
                check()
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

    def send_chunks(self, peer: object, sock: socket.socket, chunks: Iterator[np.ndarray], tag: int,
                    check: Callable[[], None] = _keep_going) -> None:
        with self._lock:
            reqs: list[object] = []
            try:
                for i, buf in enumerate(chunks):
                    arr = self._array(buf)
                    reqs.append((peer.tag_send(arr, self._tag(tag, i)), arr))  # type: ignore[attr-defined]
                    self._worker.progress()
                self._progress_until(lambda: all(r.completed for r, _ in reqs), "send", check)
                for r, _ in reqs:
                    r.check_error()
            except Exception as exc:
                self._abandoned.append(reqs)  # kept with the worker if it is retired
                raise _as_transfer_error(exc) from exc

    def recv_chunks(self, peer: object, sock: socket.socket, bufs: list[np.ndarray], tag: int,
                    on_chunk: Callable[[int], None], check: Callable[[], None] = _keep_going) -> None:
        with self._lock:
            reqs: list[object] = []
            try:
                for i, b in enumerate(bufs):
                    arr = self._array(b)
                    reqs.append((self._worker.tag_recv(arr, self._tag(tag, i)), arr))
                for i, (r, _) in enumerate(reqs):
                    self._progress_until(lambda r=r: r.completed, "receive", check)
                    r.check_error()
                    on_chunk(i)
            except Exception as exc:
                self._abandoned.append(reqs)  # kept with the worker if it is retired
                raise _as_transfer_error(exc) from exc


def _as_transfer_error(exc: Exception) -> TransferError:
    """UCX's own errors (UCXXError and kin derive from Exception only) as TransferError."""
    return exc if isinstance(exc, TransferError) else TransferError(f"UCX: {type(exc).__name__}: {exc}")


def peer_hung_up(sock: socket.socket) -> None:
    """Raise if the peer closed the control channel (a ``check`` for a send in flight)."""
    try:
        # select first: a socket with a timeout waits for data inside recv, whatever the flags.
        readable, _, _ = select.select([sock], [], [], 0)
        # The TCP bytes themselves, under TLS too (an SSL socket takes no flags): only a closed
        # connection reads b"" there.
        if readable and socket.socket.recv(sock, 1, socket.MSG_PEEK) == b"":
            raise TransferError("the peer hung up mid-transfer")
    except (BlockingIOError, InterruptedError):
        return
    except (OSError, ValueError) as exc:
        raise TransferError(f"the peer's connection broke mid-transfer: {exc}") from exc


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
