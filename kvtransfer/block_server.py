"""The prefill worker's block server: holds finished requests' blocks under a lease and serves them.

A held request's blocks stay allocated in the engine until one of: the decode
side's fetch of them has been sent, someone releases it (client cancel), or
its lease runs out. Each of those puts the request id in ``take_freed()``, which the worker
connector reports to vLLM as finished sending, and vLLM frees the blocks.

Control messages (JSON over TCP, or TLS: see ``wire`` and ``secure``):
  hello  {layout, planes, ucx_address?, ts?, auth?}
                                        -> {ok, layout, plane, ucx_address?}
                                           ts, auth: the KV secret's proof, when the server has one
  fetch  {req, blocks, tag, runs?, free_after?}
                                        -> {ok, nbytes, chunks} then the bytes on the data plane;
                                           free_after: free the hold once the send completed
                                           (its buffers are then reusable: the bytes are out)
  release {req}                         -> {ok}   (nobody will fetch; free them)
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tandem.logs import RateLimitedLog

from .capability import CapabilityRefused
from .capability import check as check_capability
from .layout import KVLayout, KVLayoutMismatch
from .paged import PagedKV, Staging, as_bytes_array
from .secure import PREAUTH_MAX_BYTES, PREAUTH_TIMEOUT_S, ControlSecurity
from .transport import DataPlane, TransferError, choose_plane, peer_hung_up
from .wire import ChannelClosed, recv_msg, send_msg

logger = logging.getLogger(__name__)
# Whoever can reach the port can send garbage: one line per 10 s, not one per message.
_bad_peer_log = RateLimitedLog(logger, every_s=10.0)

# A fetch can arrive a moment before the engine step that registers the hold.
HOLD_REGISTRATION_WAIT_S = 5.0
# Control connections served at once (each has a thread and, with UCX, its own worker); one more
# is refused with an error. Decode workers keep one per prefill worker, so this is many nodes' worth.
MAX_CONNECTIONS = 64
# One send's socket timeout (TCP plane; a UCX send gives up after the plane's 60 s, or as soon
# as the peer hangs up): past it the peer is gone.
SEND_TIMEOUT_S = 30.0
# A connection with no message for this long is closed (its slot freed): decode lanes close their
# own after 60 s idle, so only a peer that vanished without a word stays this long.
IDLE_TIMEOUT_S = 300.0


@dataclass
class _Hold:
    block_ids: list[int]
    deadline: float


class HoldTable:
    """Requests whose blocks are held for a transfer; thread-safe."""

    max_early_releases = 100_000  # releases remembered for holds that have not arrived (yet)

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holds: dict[str, _Hold] = {}
        self._released_early: dict[str, float] = {}
        self._freed: set[str] = set()
        # Holds being sent now: their blocks are read, so neither a release nor the lease frees
        # them until the send ends (a release meanwhile takes effect then).
        self._sending: dict[str, int] = {}
        self._release_after_send: set[str] = set()

    def hold(self, req_id: str, block_ids: list[int], lease_s: float) -> None:
        with self._cond:
            if self._released_early.pop(req_id, None) is not None:
                self._freed.add(req_id)
                return
            self._holds[req_id] = _Hold(list(block_ids), time.monotonic() + lease_s)
            self._cond.notify_all()

    def get(self, req_id: str, wait_s: float = HOLD_REGISTRATION_WAIT_S) -> list[int]:
        with self._cond:
            return self._get(req_id, wait_s)

    def _get(self, req_id: str, wait_s: float) -> list[int]:
        deadline = time.monotonic() + wait_s
        while req_id not in self._holds:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KeyError(f"no KV blocks held for request {req_id} (released, expired or unknown)")
            self._cond.wait(left)
        h = self._holds[req_id]
        if time.monotonic() > h.deadline:
            raise KeyError(f"the KV lease of request {req_id} ran out")
        return h.block_ids

    @contextmanager
    def sending(self, req_id: str, wait_s: float = HOLD_REGISTRATION_WAIT_S) -> Iterator[list[int]]:
        """The held block ids, kept from being freed while the caller reads them."""
        with self._cond:
            block_ids = self._get(req_id, wait_s)
            self._sending[req_id] = self._sending.get(req_id, 0) + 1
        try:
            yield block_ids
        finally:
            with self._cond:
                self._sending[req_id] -= 1
                if not self._sending[req_id]:
                    del self._sending[req_id]
                    if req_id in self._release_after_send:
                        self._release_after_send.discard(req_id)
                        self._free(req_id)

    def _free(self, req_id: str) -> bool:
        if self._holds.pop(req_id, None) is not None:
            self._freed.add(req_id)
            return True
        return False

    def release(self, req_id: str) -> bool:
        """Free a hold; a release that comes before its hold frees it on arrival, one that
        comes during its send when the send ends."""
        with self._cond:
            if req_id in self._sending:
                self._release_after_send.add(req_id)
                return True
            if self._holds.pop(req_id, None) is not None:
                self._freed.add(req_id)
                return True
            if len(self._released_early) >= self.max_early_releases:
                # Anyone who reaches the port can send releases for ids that never come:
                # forget the oldest rather than grow without bound.
                del self._released_early[next(iter(self._released_early))]
            self._released_early[req_id] = time.monotonic()
            return False

    def take_freed(self) -> set[str]:
        now = time.monotonic()
        with self._cond:
            for req_id, h in list(self._holds.items()):
                if now > h.deadline and req_id not in self._sending:
                    logger.warning("request %s: KV lease ran out before decode fetched it; freeing", req_id)
                    del self._holds[req_id]
                    self._freed.add(req_id)
            for req_id, t in list(self._released_early.items()):
                if now - t > 600:
                    del self._released_early[req_id]
            freed, self._freed = self._freed, set()
            return freed

    def num_blocks_held(self) -> int:
        with self._cond:
            return sum(len(h.block_ids) for h in self._holds.values())


class BlockServer:
    """Serves held blocks to decode workers; one thread and one forked data plane per control
    connection (so a slow decode peer holds up only its own transfers), at most MAX_CONNECTIONS."""

    def __init__(self, host: str, port: int, kv: PagedKV, planes: dict[str, DataPlane],
                 engine_id: str = "", reserved: bool = False, security: ControlSecurity | None = None) -> None:
        """``reserved``: the port is held for this server by a socket with SO_REUSEPORT
        (tandem.netutil.reserve_port in the node daemon), so bind it the same way.
        ``engine_id``: fetches and releases that name another engine are refused (they were
        meant for an earlier process on this address). ``security`` (secure.py): TLS on the control
        connection, and with a KV secret a hello must prove it and every fetch and release carry its
        handle's capability (capability.py); None serves anyone who names a held request."""
        self.kv = kv
        self._security = security or ControlSecurity()
        self._secret = self._security.secret
        self.engine_id = engine_id
        self.holds = HoldTable()
        self._planes = planes
        self._sock = socket.create_server((host, port), reuse_port=reserved)
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self._closed = False
        self._bytes_sent = 0
        self._bytes_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread = threading.Thread(target=self._accept_loop, name="tandem-kv-server", daemon=True)
        self._thread.start()
        logger.info("KV block server on %s (planes: %s; %s)", self.address, ", ".join(planes),
                    self._security.describe)

    def take_bytes_sent(self) -> int:
        with self._bytes_lock:
            n, self._bytes_sent = self._bytes_sent, 0
        return n

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:  # the peer reset it already: that connection only, never the accept loop
                conn.close()
                continue
            if not self._slots.acquire(blocking=False):
                _bad_peer_log.warning("KV server: %d connections open; refusing another", MAX_CONNECTIONS)
                if self._security.tls is None:  # a TLS peer could not read a plain message: just hang up
                    try:
                        conn.settimeout(1.0)
                        send_msg(conn, {"ok": False, "error": f"the KV server serves at most {MAX_CONNECTIONS} "
                                                              "connections"})
                    except OSError:
                        pass
                conn.close()
                continue
            threading.Thread(target=self._serve_one, args=(conn,), name="tandem-kv-conn", daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            try:
                conn = self._security.accept(conn)
            except OSError as exc:  # ssl.SSLError too: no certificate, another CA's, not TLS at all
                _bad_peer_log.warning("KV server: TLS handshake with a peer failed: %s", exc)
                conn.close()
                return
            self._serve(conn)
        finally:
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        plane: DataPlane | None = None
        peer: object = None
        staging = Staging(self.kv)
        # Until the peer proves itself (TLS did, or its first message: a hello with the secret's
        # proof, or a release with its capability) it has one small message and PREAUTH_TIMEOUT_S
        # in all to do so; whatever else it sends, it is hung up on after that message.
        proved = self._security.authenticated_by_transport
        preauth_until = time.monotonic() + PREAUTH_TIMEOUT_S
        with conn:
            while True:
                try:
                    if proved:
                        conn.settimeout(IDLE_TIMEOUT_S)
                        msg = recv_msg(conn)
                    else:
                        msg = recv_msg(conn, deadline=preauth_until, max_bytes=PREAUTH_MAX_BYTES)
                except (ChannelClosed, OSError):  # closed, broken, or idle past its time
                    return
                except ValueError as exc:  # not our framing or not JSON: nothing more to read from it
                    _bad_peer_log.warning("KV server: closing a connection that sent a malformed message: %s", exc)
                    return
                op = msg.get("op") if isinstance(msg, dict) else None
                try:
                    if not isinstance(msg, dict):
                        raise ValueError("a control message must be a JSON object")
                    self._check_engine(msg)
                    if op == "hello":
                        try:
                            self._security.check_hello(msg)
                        except CapabilityRefused:
                            proved = False if self._secret is not None else proved
                            raise
                        proved = True
                        conn.settimeout(IDLE_TIMEOUT_S)  # its reply is not bound by the pre-auth window
                        plane, peer = self._hello(conn, msg)
                    elif op == "fetch":
                        if plane is None:
                            raise TransferError("fetch before hello")
                        self._fetch(conn, msg, plane, peer, staging)
                    elif op == "release":
                        check_capability(self._secret, self.engine_id, msg)
                        proved = True
                        conn.settimeout(IDLE_TIMEOUT_S)
                        freed = self.holds.release(str(msg["req"]))
                        logger.debug("request %s: released (held: %s)", msg["req"], freed)
                        send_msg(conn, {"ok": True})
                    else:
                        send_msg(conn, {"ok": False, "error": f"unknown op {op!r}"})
                except (KVLayoutMismatch, KeyError, ValueError, TypeError, TransferError) as exc:
                    err = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                    _bad_peer_log.warning("KV %s from peer failed: %s", str(op)[:32], err)
                    try:
                        send_msg(conn, {"ok": False, "error": str(err),
                                        **({"denied": True} if isinstance(exc, CapabilityRefused) else {})})
                    except OSError:
                        return
                except OSError:
                    return
                except Exception:  # one connection's trouble never reaches the engine
                    logger.exception("KV server: unexpected error serving %s; closing that connection", str(op)[:32])
                    return
                if not proved:  # one message to prove itself, no more
                    return

    def _check_engine(self, msg: dict) -> None:
        engine = msg.get("engine")
        if engine and self.engine_id and engine != self.engine_id:
            raise ValueError(f"these blocks were held by engine {str(engine)[:80]}; this is {self.engine_id} "
                             "(the node restarted since)")

    def _hello(self, conn: socket.socket, msg: dict) -> tuple[DataPlane, object]:
        self.kv.layout.check_compatible(KVLayout.from_json(msg["layout"]))
        theirs = list(msg.get("planes", ["tcp"]))
        choose_plane(self._planes, theirs)  # raises, naming both sides' planes, when none is common
        plane: DataPlane | None = None
        for name, mine in self._planes.items():
            if name in theirs:
                try:
                    plane = mine.fork()
                    break
                except TransferError as exc:  # e.g. UCX given up in this process: the next one
                    _bad_peer_log.warning("KV server: not offering %s: %s", name, exc)
        if plane is None:
            raise TransferError("no KV transport left that the peer also offers")
        peer = plane.connect(msg)
        send_msg(conn, {"ok": True, "plane": plane.name, "layout": self.kv.layout.to_json(), **plane.local_info()})
        return plane, peer

    def _fetch(self, conn: socket.socket, msg: dict, plane: DataPlane, peer: object, staging: Staging) -> None:
        req_id = str(msg["req"])
        check_capability(self._secret, self.engine_id, msg)  # before a block is looked at
        wanted = [int(b) for b in msg["blocks"]]
        with self.holds.sending(req_id) as held:
            if not set(wanted) <= set(held):
                raise ValueError(f"request {req_id}: asked for blocks that are not held for it")
            conn.settimeout(SEND_TIMEOUT_S)  # a frozen peer must not hold the blocks for good
            nbytes = self._send(conn, req_id, wanted, msg, plane, peer, staging)
        if msg.get("free_after"):
            # One round trip less than an ack: once the send completed the blocks are no longer read.
            self.holds.release(req_id)
        with self._bytes_lock:
            self._bytes_sent += nbytes

    def _send(self, conn: socket.socket, req_id: str, wanted: list[int], msg: dict, plane: DataPlane,
              peer: object, staging: Staging) -> int:
        t0 = time.perf_counter()
        tag = int(msg.get("tag", 0))
        if msg.get("runs") is not None:
            # Direct: runs of consecutive blocks go straight from the cache, no staging copy.
            lengths = [int(n) for n in msg["runs"]]
            if sum(lengths) != len(wanted) or min(lengths, default=1) < 1 or not self.kv.direct_ok:
                raise ValueError(f"request {req_id}: direct fetch runs do not fit this cache")
            offsets = [0, *itertools.accumulate(lengths)][:-1]
            starts = [wanted[o] for o in offsets]
            # Each run must be consecutive ids, or the views below would cover blocks not asked for.
            if any(wanted[o:o + n] != list(range(wanted[o], wanted[o] + n)) for o, n in zip(offsets, lengths)):
                raise ValueError(f"request {req_id}: a direct fetch run is not consecutive blocks")
            views = self.kv.run_views(starts, lengths)
            nbytes = sum(v.nbytes for v in views)
            send_msg(conn, {"ok": True, "nbytes": nbytes, "chunks": len(views)})
            self._send_or_hang_up(req_id, plane, peer, conn, iter(views), tag)
        else:
            idx = self.kv.index(wanted)
            layers = staging.layers(len(wanted))
            nbytes = sum(t.numel() * t.element_size() for t in layers)
            send_msg(conn, {"ok": True, "nbytes": nbytes, "chunks": len(layers)})

            def packed():  # gather layer i while layer i-1 is on its way
                for i, out in enumerate(layers):
                    self.kv.gather_layer(i, idx, out)
                    yield as_bytes_array(out)

            self._send_or_hang_up(req_id, plane, peer, conn, packed(), tag)
        logger.debug("request %s: sent %d blocks (%d bytes) in %.4f s over %s",
                     req_id, len(wanted), nbytes, time.perf_counter() - t0, plane.name)
        return nbytes

    def _send_or_hang_up(self, req_id: str, plane: DataPlane, peer: object, conn: socket.socket, chunks: object,
                         tag: int) -> None:
        """Once "ok" went out the peer expects bytes, not an error message: on failure, hang up.

        The hold is freed then (the fetcher gave up on it, or cannot use half of it), and the
        connection's plane is retired: a send left half-posted on it never progresses again."""
        try:
            plane.send_chunks(peer, conn, chunks, tag, lambda: peer_hung_up(conn))  # type: ignore[arg-type]
        except Exception as exc:  # socket, UCX, a gather that failed: the peer gets no bytes
            logger.warning("request %s: KV send failed mid-transfer, closing the connection: %s", req_id, exc)
            plane.retire(peer)
            self.holds.release(req_id)
            raise ConnectionAbortedError(str(exc)) from exc
