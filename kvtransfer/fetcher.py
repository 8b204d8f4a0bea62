"""The decode worker's block fetcher: pulls held blocks from prefill workers into its own paged cache.

Each request's load is a ``Fetch``: a transfer object with its own deadline and
``abort()``. Fetches from one peer (a prefill worker's address) run in order on
that peer's lane: one thread, one bounded queue, one control connection and
its own data plane (its own UCX worker). Lanes of different peers run
concurrently, so a slow, frozen or dead peer delays only its own requests.

The engine keeps decoding meanwhile; the worker connector collects finished and
failed request ids with ``take_results()`` every step. A failed fetch fails its
request only (vLLM's load-failure policy decides what happens to it). An
aborted fetch (its request was cancelled, or migrated away) stops at once: a
queued one is never started, a running one has its connection shut, and either
is reported finished so that vLLM frees the blocks it was filling, while the
holder frees its side (a release, or the send that fails).
"""

from __future__ import annotations

import enum
import itertools
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

from tandem.logs import RateLimitedLog

from .capability import CapabilityRefused
from .capability import fields as cap_fields
from .handle import TransferHandle
from .layout import KVLayout
from .paged import PagedKV, Staging, as_bytes_array, runs
from .secure import ControlSecurity, finish_handshake
from .transport import DataPlane, TransferAborted, TransferError
from .wire import recv_msg, send_msg

logger = logging.getLogger(__name__)
_fork_log = RateLimitedLog(logger, every_s=60.0)

CONNECT_TIMEOUT_S = 10.0
# No control reply or data piece may take longer: a vanished peer must not stall its lane for long.
IO_TIMEOUT_S = 30.0
# A whole fetch, from submit to the last byte (queueing behind the peer's other fetches included).
FETCH_TIMEOUT_S = 60.0
# Fetches waiting for one peer; past this, a new one fails at once instead of queueing without bound.
MAX_QUEUED_PER_PEER = 256
# A lane with nothing to do for this long closes its connection and ends its thread.
LANE_IDLE_S = 60.0
# Past this many runs of consecutive blocks, one staged message per layer beats many small ones.
MAX_DIRECT_RUNS = 32


def _nothing(i: int) -> None:
    return None


@dataclass
class LoadJob:
    """Blocks of one request to pull: ``handle`` says whose and where (its engine: a holder
    restarted on the same address refuses the fetch; its lease: past it the blocks are gone);
    ``remote_block_ids`` are the part of the handle's blocks to pull, into ``local_block_ids``."""

    req_id: str
    handle: TransferHandle
    remote_block_ids: list[int]
    local_block_ids: list[int]

    @property
    def address(self) -> str:
        return self.handle.address


@dataclass
class TransferStats:
    bytes: int = 0
    failures: int = 0
    aborts: int = 0
    fetch_seconds: list[float] = field(default_factory=list)


class FetchState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class Fetch:
    """One request's load: a deadline, a state, and ``abort()`` from any thread.

    Its result is reported exactly once (``claim()``): vLLM asserts on a request id it
    does not know, so a second report of the same id would end the engine."""

    def __init__(self, job: LoadJob, timeout_s: float = FETCH_TIMEOUT_S) -> None:
        self.job = job
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.state = FetchState.QUEUED
        self.aborted = False
        self._reported = False
        self._sock: socket.socket | None = None  # set while running, so abort can shut it
        self._lock = threading.Lock()

    def start(self, sock: socket.socket) -> bool:
        """QUEUED -> RUNNING on ``sock``; False when it was aborted first."""
        with self._lock:
            if self.aborted:
                return False
            self.state, self._sock = FetchState.RUNNING, sock
            return True

    def abort(self) -> bool:
        """Give the fetch up. True when it had not started: the caller reports it now. A running
        one has its socket shut, which ends its wait at once, and its lane reports it."""
        with self._lock:
            self.aborted = True
            if self.state is FetchState.RUNNING and self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if self.state is FetchState.QUEUED and not self._reported:
                self._reported = True
                return True
            return False

    def claim(self) -> bool:
        """Mark the fetch done; True for the one caller that reports its result."""
        with self._lock:
            self.state, self._sock = FetchState.DONE, None
            first, self._reported = not self._reported, True
            return first

    def check(self) -> None:
        """Raise if the fetch must stop now (called between chunks and while polling)."""
        if self.aborted:
            raise TransferAborted(f"request {self.job.req_id}: KV fetch aborted")
        if time.monotonic() > self.deadline:
            raise TransferError(f"request {self.job.req_id}: KV fetch not done within {self.timeout_s:.0f} s")

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


class _Conn:
    """A control connection to one peer, and the lane's own data plane for it."""

    @staticmethod
    def dial(address: str, security: ControlSecurity) -> socket.socket:
        """Connected; its TLS handshake (when TLS is on) is left to ``__init__``."""
        sock = security.dial(address, CONNECT_TIMEOUT_S, handshake=False)
        sock.settimeout(IO_TIMEOUT_S)
        return sock

    def __init__(self, sock: socket.socket, address: str, kv: PagedKV, planes: dict[str, DataPlane],
                 security: ControlSecurity) -> None:
        """The handshakes (TLS, then Tandem's) on a dialled socket (shutting the socket down ends them
        at once)."""
        self.sock = sock
        self.plane: DataPlane | None = None
        self.peer: object = None
        self.planes: dict[str, DataPlane] = {}
        for name, p in planes.items():
            try:
                self.planes[name] = p.fork()
            except TransferError as exc:  # e.g. UCX given up in this process: offer the others
                _fork_log.warning("KV transport %s is not offered: %s", name, exc)
        try:
            if not self.planes:
                raise TransferError("no KV transport left to offer")
            finish_handshake(self.sock)
            hello = {"op": "hello", "layout": kv.layout.to_json(), "planes": list(self.planes)}
            for p in self.planes.values():
                hello.update(p.local_info())
            send_msg(self.sock, security.sign_hello(hello))
            reply = recv_msg(self.sock)
            if not reply.get("ok"):
                raise TransferError(f"prefill worker {address} refused the handshake: {reply.get('error')}")
            KVLayout.from_json(reply["layout"]).check_compatible(kv.layout)
            self.plane = self.planes[reply["plane"]]
            self.peer = self.plane.connect(reply)
        except BaseException:
            self.close(retire=False)
            raise

    def call(self, msg: dict) -> dict:
        send_msg(self.sock, msg)
        reply = recv_msg(self.sock)
        if not reply.get("ok"):
            raise TransferError(str(reply.get("error")))
        return reply

    def close(self, retire: bool) -> None:
        """``retire``: a transfer may have been left half-posted on this connection's plane;
        that plane and its connection to the peer are kept, never progressed again."""
        try:
            self.sock.close()
        except OSError:
            pass
        if retire and self.plane is not None:
            self.plane.retire(self.peer)


class _Lane(threading.Thread):
    """Fetches from one peer, one after another, on this thread."""

    def __init__(self, fetcher: BlockFetcher, address: str) -> None:
        super().__init__(name=f"tandem-kv-fetch-{address}", daemon=True)
        self.fetcher = fetcher
        self.address = address
        self.jobs: queue.Queue[Fetch | TransferHandle | None] = queue.Queue(maxsize=MAX_QUEUED_PER_PEER)
        self._conn: _Conn | None = None
        self._staging_bufs: Staging | None = None

    def offer(self, item: Fetch | TransferHandle) -> bool:
        try:
            self.jobs.put_nowait(item)
            return True
        except queue.Full:
            return False

    def run(self) -> None:
        try:
            while True:
                try:
                    item = self.jobs.get(timeout=LANE_IDLE_S)
                except queue.Empty:
                    if self.fetcher._retire_lane(self):
                        return
                    continue
                if item is None:
                    return
                try:
                    if isinstance(item, TransferHandle):
                        self._release(item)
                    else:
                        self._load(item)
                except Exception:  # a bug here must not strand this lane's other fetches
                    logger.exception("KV fetch lane %s: unexpected error; going on", self.address)
                    self._drop(retire=True)
                    if isinstance(item, Fetch) and item.claim():
                        self.fetcher._report(item.job.req_id, failed=True)
        finally:
            self._drop(retire=False)

    def _connection(self) -> _Conn:
        if self._conn is None:
            f = self.fetcher
            self._conn = _Conn(_Conn.dial(self.address, f.security), self.address, f.kv, f._planes, f.security)
        return self._conn

    def _start(self, fetch: Fetch) -> _Conn:
        """The lane's connection with ``fetch`` running on it; a handshake it needs runs after the
        fetch started, so that an abort cuts the handshake short too."""
        if self._conn is not None:
            if not fetch.start(self._conn.sock):
                raise TransferAborted(f"request {fetch.job.req_id}: KV fetch aborted")
            return self._conn
        f = self.fetcher
        sock = _Conn.dial(self.address, f.security)
        if not fetch.start(sock):
            sock.close()
            raise TransferAborted(f"request {fetch.job.req_id}: KV fetch aborted")
        self._conn = _Conn(sock, self.address, f.kv, f._planes, f.security)
        return self._conn

    def _drop(self, retire: bool) -> None:
        if self._conn is not None:
            self._conn.close(retire)
            self._conn = None

    def _release(self, handle: TransferHandle) -> None:
        try:
            self._connection().call({"op": "release", "req": handle.remote_request_id, "engine": handle.engine_id,
                                     **cap_fields(handle.capability, handle.num_tokens, handle.lease_deadline)})
        except Exception as exc:  # the holder's lease frees it anyway
            self._drop(retire=False)
            logger.warning("release of remote request %s at %s failed: %s", handle.remote_request_id,
                           handle.address, exc)

    def _load(self, fetch: Fetch) -> None:
        job = fetch.job
        t0 = time.perf_counter()
        if fetch.aborted:  # while it queued: abort() reported it; the holder still holds its blocks
            fetch.claim()
            self._release(job.handle)
            return
        if job.handle.lease_deadline and time.time() > job.handle.lease_deadline:
            logger.error("request %s: the KV lease at %s ran out %.1f s before the fetch could start",
                         job.req_id, job.address, time.time() - job.handle.lease_deadline)
            if fetch.claim():
                self.fetcher._report(job.req_id, failed=True)
            return
        try:
            fetch.check()
            conn = self._start(fetch)
            nbytes = self._transfer(fetch, conn)
        except Exception as exc:  # socket, framing, UCX, torch: this fetch fails, the lane goes on
            # Whatever was half-posted on this connection's plane stays unprogressed for good.
            # (fetch.state changes on this thread only, so reading it here needs no lock.)
            self._drop(retire=fetch.state is FetchState.RUNNING)
            first = fetch.claim()
            if fetch.aborted:
                logger.info("request %s: KV fetch from %s aborted", job.req_id, job.address)
                if first:
                    self.fetcher._report(job.req_id, aborted=True)
                self._release(job.handle)  # the holder frees its side now, not at lease end
            else:
                logger.error("request %s: KV fetch from %s failed: %s", job.req_id, job.address, exc)
                if first:
                    self.fetcher._report(job.req_id, failed=True)
            return
        if fetch.aborted:
            # Aborted as it completed: abort() shut the socket, so the next fetch needs a new one.
            self._drop(retire=False)
        if fetch.claim():
            dt = time.perf_counter() - t0
            logger.info("request %s: fetched %d blocks (%d bytes) in %.4f s over %s",
                        job.req_id, len(job.remote_block_ids), nbytes, dt, conn.plane.name)
            self.fetcher._report(job.req_id, nbytes=nbytes, seconds=dt)

    def _transfer(self, fetch: Fetch, conn: _Conn) -> int:
        job, kv = fetch.job, self.fetcher.kv
        tag = next(self.fetcher._tags)
        # free_after: the prefill side frees the hold when its send completes; no ack round trip.
        msg = {"op": "fetch", "req": job.handle.remote_request_id, "engine": job.handle.engine_id,
               "blocks": job.remote_block_ids,
               "tag": tag, "free_after": True,
               **cap_fields(job.handle.capability, job.handle.num_tokens, job.handle.lease_deadline)}
        segs = runs(job.remote_block_ids, job.local_block_ids)
        if kv.direct_ok and len(segs) <= MAX_DIRECT_RUNS:
            # Blocks land straight in the cache, run by run; no staging copy on either side.
            msg["runs"] = [n for _, _, n in segs]
            bufs = kv.run_views([d for _, d, _ in segs], [n for _, _, n in segs])
            on_chunk = _nothing
        else:
            layers = self._staging().layers(len(job.remote_block_ids))
            bufs = [as_bytes_array(t) for t in layers]
            idx = kv.index(job.local_block_ids)

            def on_chunk(i: int) -> None:
                kv.scatter_layer(i, idx, layers[i])
        nbytes = sum(b.nbytes for b in bufs)
        conn.sock.settimeout(max(0.1, min(IO_TIMEOUT_S, fetch.seconds_left())))
        reply = conn.call(msg)
        if int(reply["nbytes"]) != nbytes or int(reply.get("chunks", 0)) != len(bufs):
            raise TransferError(f"prefill side offers {reply['nbytes']} bytes in {reply.get('chunks')} "
                                f"chunks, expected {nbytes} in {len(bufs)}")
        conn.plane.recv_chunks(conn.peer, conn.sock, bufs, tag, on_chunk, fetch.check)
        conn.sock.settimeout(IO_TIMEOUT_S)
        return nbytes

    def _staging(self) -> Staging:
        if self._staging_bufs is None:
            self._staging_bufs = Staging(self.fetcher.kv)
        return self._staging_bufs


class BlockFetcher:
    """Lanes of fetches, one per peer; results are taken by the engine step."""

    def __init__(self, kv: PagedKV, planes: dict[str, DataPlane], timeout_s: float = FETCH_TIMEOUT_S,
                 security: ControlSecurity | None = None) -> None:
        self.kv = kv
        self.security = security or ControlSecurity()
        self._planes = planes
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lane] = {}
        self._fetches: dict[str, Fetch] = {}
        self._finished: set[str] = set()
        self._failed: set[str] = set()
        self.stats = TransferStats()
        self._tags = itertools.count(1)  # unique per process: a stale message never matches a new receive

    def submit(self, job: LoadJob) -> Fetch:
        fetch = Fetch(job, self._timeout_s)
        with self._lock:
            self._fetches[job.req_id] = fetch
        if not self._offer(job.address, fetch):
            logger.error("request %s: %d KV fetches already wait for %s; failing this one", job.req_id,
                         MAX_QUEUED_PER_PEER, job.address)
            if fetch.claim():
                self._report(job.req_id, failed=True)
        return fetch

    def submit_release(self, handle: TransferHandle) -> None:
        if not self._offer(handle.address, handle):
            logger.warning("release of remote request %s at %s dropped (its lane is full); its lease frees it",
                           handle.remote_request_id, handle.address)

    def abort(self, req_id: str) -> None:
        """Stop a request's fetch now (its request was cancelled or moved elsewhere)."""
        with self._lock:
            fetch = self._fetches.get(req_id)
        if fetch is not None and fetch.abort():
            # Never started: reported now; its lane skips it and releases the hold.
            self._report(req_id, aborted=True)

    def fail(self, req_id: str) -> None:
        """Report a load as failed without trying it (it could not even start; never submitted)."""
        self._report(req_id, failed=True)

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

    def close(self, wait_s: float = 0.0) -> bool:
        """Ends every lane after the work queued on it; ``wait_s``: wait that long for them to have
        closed their connections (a process about to exit waits: a lane thread still tearing a UCX
        endpoint down while the interpreter exits can abort the process). True when all ended."""
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.offer(None)  # type: ignore[arg-type]
        deadline = time.monotonic() + wait_s
        for lane in lanes:
            lane.join(max(0.0, deadline - time.monotonic()))
        return not any(lane.is_alive() for lane in lanes)

    def _offer(self, address: str, item: Fetch | TransferHandle) -> bool:
        # Under the lock: an idle lane leaves only when nothing was queued on it (see _retire_lane).
        with self._lock:
            lane = self._lanes.get(address)
            if lane is None or not lane.is_alive():
                lane = self._lanes[address] = _Lane(self, address)
                lane.start()
            return lane.offer(item)

    def _retire_lane(self, lane: _Lane) -> bool:
        """An idle lane leaves, unless something was queued on it meanwhile."""
        with self._lock:
            if not lane.jobs.empty():
                return False
            if self._lanes.get(lane.address) is lane:
                del self._lanes[lane.address]
            return True

    def _report(self, req_id: str, *, failed: bool = False, aborted: bool = False, nbytes: int = 0,
                seconds: float | None = None) -> None:
        with self._lock:
            self._fetches.pop(req_id, None)
            self._finished.add(req_id)
            if failed:
                self._failed.add(req_id)
                self.stats.failures += 1
            elif aborted:
                self.stats.aborts += 1
            else:
                self.stats.bytes += nbytes
                if seconds is not None:
                    self.stats.fetch_seconds.append(seconds)


def release_remote(address: str, remote_req_id: str, engine_id: str = "", timeout_s: float = 5.0,
                   handle: TransferHandle | None = None, security: ControlSecurity | None = None) -> None:
    """Tell a prefill worker that nobody will fetch a request's blocks (client cancel); ``handle``
    carries the capability a block server with a KV secret asks for; ``security``: the TLS files
    its control port takes."""
    with (security or ControlSecurity()).dial(address, timeout_s) as sock:
        sock.settimeout(timeout_s)
        send_msg(sock, {"op": "release", "req": remote_req_id, "engine": engine_id,
                        **(cap_fields(handle.capability, handle.num_tokens, handle.lease_deadline) if handle else {})})
        reply = recv_msg(sock)
        if not reply.get("ok"):
            raise (CapabilityRefused if reply.get("denied") else TransferError)(str(reply.get("error")))
