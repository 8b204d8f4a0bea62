"""A TCP proxy that can cut the path it carries: the KV path between nodes, for `tandem chaos`.

A node advertises the proxy's address for its KV (``--kv-advertise``); decode
nodes dial the proxy, which pipes bytes to the node's real KV port. ``cut()``
closes every connection and refuses new ones until the cut ends, the way a
partition between two hosts looks to both ends. It only cuts what goes over
TCP: shared memory between two processes on one host has no path to cut.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from tandem.kvtransfer.wire import parse_address

logger = logging.getLogger(__name__)


class TcpProxy:
    def __init__(self, target: str, host: str = "127.0.0.1") -> None:
        self.target = parse_address(target)
        self._listener = socket.create_server((host, 0))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut_until = 0.0
        self._closed = False
        self.cuts = 0
        self.refused = 0

    def start(self) -> TcpProxy:
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()
        return self

    @property
    def is_cut(self) -> bool:
        return time.monotonic() < self._cut_until

    def cut(self, seconds: float) -> None:
        """Close every connection now and refuse new ones for ``seconds``."""
        with self._lock:
            self._cut_until = time.monotonic() + seconds
            self.cuts += 1
            doomed, self._open = self._open, set()
        for s in doomed:
            _hang_up(s)
        logger.warning("proxy %s -> %s:%d cut for %.0f s (%d sockets closed)", self.address, *self.target,
                       seconds, len(doomed))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            doomed, self._open = self._open, set()
        _hang_up(self._listener)
        for s in doomed:
            _hang_up(s)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.is_cut:
                self.refused += 1
                _hang_up(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _hang_up(client)  # the node is down: the dialler sees what it would see without us
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                # A cut (or close) may have come while we dialled upstream: it did not see
                # this pair, so it must not go on.
                doomed = self.is_cut or self._closed
                if not doomed:
                    self._open |= {client, upstream}
            if doomed:
                self.refused += 1
                _hang_up(client)
                _hang_up(upstream)
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(view)
                if n == 0:
                    break
                dst.sendall(view[:n])
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            _hang_up(src)
            _hang_up(dst)


def _hang_up(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
