"""The decode worker's block fetcher: pulls held blocks from prefill workers into its own paged cache.

Fetches run on one background thread so the engine keeps decoding other
requests meanwhile; the worker connector collects finished and failed request
ids with ``take_results()`` every step. A failed fetch fails that request only.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

from .handle import TransferHandle
from .layout import KVLayout
from .paged import PagedKV, Staging, as_bytes_array, runs
from .transport import DataPlane, TransferError
from .wire import ChannelClosed, parse_address, recv_msg, send_msg

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
# No control reply or data piece may take longer: a vanished peer must not stall every load.
IO_TIMEOUT_S = 30.0
# Past this many runs of consecutive blocks, one staged message per layer beats many small ones.
MAX_DIRECT_RUNS = 32


def _nothing(i: int) -> None:
    return None


@dataclass
class LoadJob:
    """Blocks of one request to pull: remote ids on the prefill side, local ids here."""

    req_id: str
    address: str
    remote_req_id: str
    remote_block_ids: list[int]
    local_block_ids: list[int] = field(default_factory=list)
    engine_id: str = ""  # the holder's engine; a restarted holder on the same address refuses the fetch


@dataclass
class TransferStats:
    bytes: int = 0
    failures: int = 0
    fetch_seconds: list[float] = field(default_factory=list)


class _Conn:
    def __init__(self, address: str, kv: PagedKV, planes: dict[str, DataPlane]) -> None:
        host, port = parse_address(address)
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(IO_TIMEOUT_S)
        hello = {"op": "hello", "layout": kv.layout.to_json(), "planes": list(planes)}
        for p in planes.values():
            hello.update(p.local_info())
        send_msg(self.sock, hello)
        reply = recv_msg(self.sock)
        if not reply.get("ok"):
            raise TransferError(f"prefill worker {address} refused the handshake: {reply.get('error')}")
        KVLayout.from_json(reply["layout"]).check_compatible(kv.layout)
        self.plane = planes[reply["plane"]]
        self.peer = self.plane.connect(reply)

    def call(self, msg: dict) -> dict:
        send_msg(self.sock, msg)
        reply = recv_msg(self.sock)
        if not reply.get("ok"):
            raise TransferError(str(reply.get("error")))
        return reply

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class BlockFetcher:
    """Queue of loads served by one thread; results are taken by the engine step."""

    def __init__(self, kv: PagedKV, planes: dict[str, DataPlane]) -> None:
        self.kv = kv
        self._planes = planes
        self._conns: dict[str, _Conn] = {}
        self._jobs: queue.Queue[LoadJob | TransferHandle | None] = queue.Queue()
        self._lock = threading.Lock()
        self._finished: set[str] = set()
        self._failed: set[str] = set()
        self.stats = TransferStats()
        self._tags = itertools.count(1)
        self._staging = Staging(kv)
        self._thread = threading.Thread(target=self._run, name="tandem-kv-fetch", daemon=True)
        self._thread.start()

    def submit(self, job: LoadJob) -> None:
        self._jobs.put(job)

    def submit_release(self, handle: TransferHandle) -> None:
        self._jobs.put(handle)

    def fail(self, req_id: str) -> None:
        """Report a load as failed without trying it (it could not even start)."""
        with self._lock:
            self._failed.add(req_id)
            self.stats.failures += 1

    def take_results(self) -> tuple[set[str], set[str]]:
        """(finished, failed); every failed id is in finished too, as vLLM expects."""
        with self._lock:
            done, failed = self._finished, self._failed
            self._finished, self._failed = set(), set()
        return done | failed, failed

    def take_stats(self) -> TransferStats:
        with self._lock:
            s, self.stats = self.stats, TransferStats()
        return s

    def close(self) -> None:
        self._jobs.put(None)
        for c in self._conns.values():
            c.close()

    def _conn(self, address: str) -> _Conn:
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = _Conn(address, self.kv, self._planes)
        return conn

    def _drop(self, address: str) -> None:
        conn = self._conns.pop(address, None)
        if conn is not None:
            conn.close()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, TransferHandle):
                try:
                    self._conn(job.address).call({"op": "release", "req": job.remote_request_id,
                                                  "engine": job.engine_id})
                except (OSError, ChannelClosed, TransferError, ValueError) as exc:
                    self._drop(job.address)
                    logger.warning("release of remote request %s at %s failed: %s", job.remote_request_id,
                                   job.address, exc)
                continue
            self._load(job)

    def _load(self, job: LoadJob) -> None:
        t0 = time.perf_counter()
        try:
            conn = self._conn(job.address)
            tag = next(self._tags)
            # free_after: the prefill side frees the hold when its send completes; no ack round trip.
            msg = {"op": "fetch", "req": job.remote_req_id, "engine": job.engine_id, "blocks": job.remote_block_ids,
                   "tag": tag, "free_after": True}
            segs = runs(job.remote_block_ids, job.local_block_ids)
            direct = self.kv.direct_ok and len(segs) <= MAX_DIRECT_RUNS
            if direct:
                # Blocks land straight in the cache, run by run; no staging copy on either side.
                msg["runs"] = [n for _, _, n in segs]
                bufs = self.kv.run_views([d for _, d, _ in segs], [n for _, _, n in segs])
                on_chunk = _nothing
            else:
                layers = self._staging.layers(len(job.remote_block_ids))
                bufs = [as_bytes_array(t) for t in layers]
                idx = self.kv.index(job.local_block_ids)

                def on_chunk(i: int) -> None:
                    self.kv.scatter_layer(i, idx, layers[i])
            nbytes = sum(b.nbytes for b in bufs)
            reply = conn.call(msg)
            if int(reply["nbytes"]) != nbytes or int(reply.get("chunks", 0)) != len(bufs):
                raise TransferError(f"prefill side offers {reply['nbytes']} bytes in {reply.get('chunks')} "
                                    f"chunks, expected {nbytes} in {len(bufs)}")
            conn.plane.recv_chunks(conn.peer, conn.sock, bufs, tag, on_chunk)
        except (OSError, ChannelClosed, TransferError, ValueError, KeyError) as exc:
            self._drop(job.address)
            logger.error("request %s: KV fetch from %s failed: %s", job.req_id, job.address, exc)
            with self._lock:
                self._failed.add(job.req_id)
                self.stats.failures += 1
            return
        dt = time.perf_counter() - t0
        logger.info("request %s: fetched %d blocks (%d bytes) in %.4f s over %s",
                     job.req_id, len(job.remote_block_ids), nbytes, dt, conn.plane.name)
        with self._lock:
            self._finished.add(job.req_id)
            self.stats.bytes += nbytes
            self.stats.fetch_seconds.append(dt)


def release_remote(address: str, remote_req_id: str, engine_id: str = "", timeout_s: float = 5.0) -> None:
    """Tell a prefill worker that nobody will fetch a request's blocks (client cancel)."""
    host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        send_msg(sock, {"op": "release", "req": remote_req_id, "engine": engine_id})
        reply = recv_msg(sock)
        if not reply.get("ok"):
            raise TransferError(str(reply.get("error")))
