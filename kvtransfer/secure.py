"""Who may use a KV block server's control connection, and how it is protected.

Two layers, each on when configured, both on in a production cluster:

- **TLS** (``--tls-cert``/``--tls-key``/``--tls-ca`` on the nodes, the same files
  as their gRPC ports): the control connection is mutual TLS. The block server
  takes only peers whose certificate the cluster CA signed, and the fetcher
  verifies the server's (as ``--tls-server-name`` when given, else its address).
  On the TCP data plane the block bytes follow on the same connection, so they
  are encrypted too; over UCX they are not (UCX has no encryption).
- **The KV secret** (``--kv-secret-file``): a connection's first message (its
  ``hello``) proves the peer holds the cluster secret, an HMAC over the whole
  hello with a fresh timestamp; fetches and releases also carry their handle's
  capability (capability.py). A peer without the secret is hung up on after one
  message. Without TLS a sniffed hello can be replayed within the timestamp's
  window (for a connection slot, never for blocks: each fetch needs its
  capability); TLS closes that too.

Until a peer has proved itself (the TLS handshake, or an authenticated first
message) it has ``PREAUTH_TIMEOUT_S`` in all and one message of at most
``PREAUTH_MAX_BYTES`` to do so, and is hung up on after that message whatever
it was: someone who merely reaches the port holds a connection slot for
seconds, not for the idle timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import ssl
import time
from dataclasses import dataclass

from tandem.tls import TlsConfig

from .capability import CapabilityRefused
from .wire import parse_address

# A hello's timestamp may be this far from the server's clock (the capability's deadlines already
# assume the nodes' clocks agree to well within a lease).
HELLO_WINDOW_S = 120.0
# A peer that has not proved itself within this long is hung up on.
PREAUTH_TIMEOUT_S = 10.0
# ... and its one message before that may be at most this large (a hello is a few hundred bytes).
PREAUTH_MAX_BYTES = 64 << 10


def hello_proof(secret: bytes, hello: dict) -> str:
    """The HMAC of a hello's every field but ``auth`` (its timestamp ``ts`` among them): a sniffed
    hello replayed within the window cannot carry another data-plane address or layout."""
    body = json.dumps({k: v for k, v in hello.items() if k != "auth"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret, b"tandem-kv-hello\0" + body.encode(), hashlib.sha256).hexdigest()


class ControlSecurity:
    """One process's side of the KV control connection's security (server and client)."""

    def __init__(self, secret: bytes | None = None, tls: TlsConfig | None = None) -> None:
        self.secret = secret
        self.tls = tls if tls is not None and tls.on else None
        if self.tls is not None and not self.tls.ca:
            raise ValueError("KV control TLS needs the cluster CA (--tls-ca): only daemons it signed may connect")
        self._server_ctx = self.tls.reloading_context("server") if self.tls else None
        self._client_ctx = self.tls.reloading_context("client") if self.tls else None

    @property
    def describe(self) -> str:
        parts = (["mutual TLS"] if self.tls else []) + (["KV secret"] if self.secret is not None else [])
        return " + ".join(parts) if parts else "UNAUTHENTICATED: no KV secret, no TLS"

    @property
    def authenticated_by_transport(self) -> bool:
        """A peer past the handshake is a cluster member (or nothing can tell: no secret, no TLS)."""
        return self.tls is not None or self.secret is None

    # server ------------------------------------------------------------------
    def accept(self, conn: socket.socket) -> socket.socket:
        """The accepted connection, past its TLS handshake (at most PREAUTH_TIMEOUT_S) when TLS is on;
        OSError (ssl.SSLError among them) when the peer fails it."""
        if self._server_ctx is None:
            return conn
        conn.settimeout(PREAUTH_TIMEOUT_S)
        return self._server_ctx.get().wrap_socket(conn, server_side=True)

    def check_hello(self, msg: dict) -> None:
        """CapabilityRefused unless the hello proves the cluster secret (always passes without one)."""
        if self.secret is None:
            return
        ts, proof = msg.get("ts"), msg.get("auth")
        if not isinstance(ts, (int, float)) or not isinstance(proof, str):
            raise CapabilityRefused("this KV server requires the cluster's KV secret of its peers: give every node "
                                    "the same --kv-secret-file")
        if abs(time.time() - float(ts)) > HELLO_WINDOW_S:
            raise CapabilityRefused(f"the hello's timestamp is {time.time() - float(ts):+.0f} s off this node's "
                                    "clock (more than allowed: synchronise the nodes' clocks)")
        if not hmac.compare_digest(hello_proof(self.secret, msg), proof):
            raise CapabilityRefused("the hello does not prove the cluster's KV secret (a different "
                                    "--kv-secret-file on this node and its peer)")

    # client ------------------------------------------------------------------
    def sign_hello(self, hello: dict) -> dict:
        """``hello`` with the KV secret's proof (unchanged without a secret)."""
        if self.secret is None:
            return hello
        signed = {**hello, "ts": time.time()}
        signed["auth"] = hello_proof(self.secret, signed)
        return signed

    def dial(self, address: str, timeout_s: float, handshake: bool = True) -> socket.socket:
        """A connected socket to a block server; TLS-wrapped when TLS is on. ``handshake`` False:
        the TLS handshake waits for ``finish_handshake`` (so that whoever may shut the socket
        down to abort has it first)."""
        host, port = parse_address(address)
        sock = socket.create_connection((host, port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._client_ctx is None or self.tls is None:
            return sock
        try:
            wrapped = self._client_ctx.get().wrap_socket(sock, server_hostname=self.tls.server_name or host,
                                                         do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        if handshake:
            finish_handshake(wrapped)
        return wrapped


def finish_handshake(sock: socket.socket) -> None:
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.do_handshake()
        except BaseException:
            sock.close()
            raise


@dataclass(frozen=True)
class ControlTlsFiles:
    """The TLS files as they travel in the connector's extra config (paths, never key bytes)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    server_name: str = ""

    @classmethod
    def from_extra(cls, extra: dict) -> ControlTlsFiles:
        return cls(*(str(extra.get(f"tls_{k}", "")) for k in ("cert", "key", "ca", "server_name")))

    def to_extra(self) -> dict[str, str]:
        return {f"tls_{k}": v for k, v in (("cert", self.cert), ("key", self.key), ("ca", self.ca),
                                            ("server_name", self.server_name)) if v}

    def config(self) -> TlsConfig | None:
        return TlsConfig(self.cert, self.key, self.ca, server_name=self.server_name) if self.cert else None
