"""TLS and mutual TLS for Tandem's gRPC ports and the coordinator's HTTP API.

Two certificate authorities, so that a client's certificate never opens a node:

- the **cluster CA** (``--tls-ca``) signs the daemons' own certificates
  (``--tls-cert``/``--tls-key``: served on their ports, shown when they dial one
  another). A node with TLS takes only clients whose certificate this CA signed:
  the coordinators (and tools holding a daemon's certificate, such as probes);
- the **client CA** (``--tls-client-ca``, the coordinator's front door only)
  signs clients' certificates. With ``--tls-client-auth required`` (the default
  when TLS is on) the coordinator takes only clients this CA signed; with
  ``none`` clients need no certificate, and API keys say who they are.

The server side reloads its certificate, key and CAs when the files change: gRPC
at the first handshake after (``dynamic_ssl_server_credentials``: the files are
stat'ed at each handshake and read only when changed), the HTTP API within a
second. A change that does not load (a key that does not match its certificate,
a half-copied file) is logged once and the previous files stay in use. The HTTP
port adds a new CA to what it trusts; it drops a replaced one only on restart.
The coordinator dials the nodes with the new files within 5 s of a change
(``Router.keep_certificate_fresh``: new calls on new channels, calls under way
finish on the old ones); a node's KV control port and its fetcher take them at
the next connection (``ReloadingContext``).

``tandem certs make DIR`` writes both CAs and a daemon and a client certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

logger = logging.getLogger(__name__)

CLIENT_AUTH = ("required", "none")
RELOAD_CHECK_S = 1.0


T = TypeVar("T")


def file_stamp(paths: list[str]) -> tuple[tuple[int, ...], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size))
    return tuple(out)


class FileWatch:
    """Files loaded again when they change. A change that does not load keeps what was loaded
    before (``keeps`` says what, in the log) and is logged once per problem; the next change of
    the files tries again."""

    def __init__(self, files: list[str], what: str, keeps: str = "the previous certificate stays") -> None:
        self.files, self._what, self._keeps = list(files), what, keeps
        self._stamp = file_stamp(self.files)
        self._error = ""

    def reload(self, load: Callable[[], T]) -> T | None:
        """``load()``'s result (never None) when the files changed since the last good load and
        it loaded; None when they did not change, or they did and it failed."""
        try:
            stamp = file_stamp(self.files)
            if stamp == self._stamp:
                return None
            out = load()
        except Exception as exc:  # any failure to load (an encrypted key, an unknown algorithm...) keeps the old
            if str(exc) != self._error:
                logger.error("TLS: %s changed but cannot be used (%s): %s", self._what, self._keeps, exc)
            self._error = str(exc)
            return None
        self._stamp, self._error = stamp, ""
        return out


def _load(cert: str, key: str, cas: list[str]) -> tuple[bytes, bytes, bytes | None]:
    """(key, cert, CA bundle) read once each; ValueError unless the key is the certificate's and
    every CA file holds certificates (a rotation half-way through, a wrong key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key_b, cert_b = Path(key).read_bytes(), Path(cert).read_bytes()
    try:
        pub = x509.load_pem_x509_certificate(cert_b).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        mine = serialization.load_pem_private_key(key_b, password=None).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except ValueError as exc:
        raise ValueError(f"{cert} or {key} is not a PEM certificate and key: {exc}") from None
    if pub != mine:
        raise ValueError(f"{key} is not the key of {cert}")
    bundle = _load_cas(cas)
    return key_b, cert_b, bundle or None


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""
    key: str = ""
    ca: str = ""  # the cluster CA: verifies the daemons this one dials, and a node's clients
    client_auth: str = "required"  # the coordinator's front door: required | none
    server_name: str = ""  # verify the daemons it dials as this name, not their address (pods' IPs change)
    client_ca: str = ""  # the coordinator's front door: the CA its clients' certificates come from

    @property
    def on(self) -> bool:
        """Serves TLS (a daemon with a certificate)."""
        return bool(self.cert)

    @property
    def dials_tls(self) -> bool:
        """Dials with TLS: a certificate to show, or only a CA to verify the server with."""
        return bool(self.cert or self.ca)

    def check(self, role: str = "client", where: str = "--tls") -> TlsConfig:
        """ValueError naming what is missing or does not load. ``role``: node (TLS needs the cluster
        CA: only daemons it signed may call a node), coordinator, or client (a CA alone verifies
        a server that asks for no certificate)."""
        if not (self.cert or self.key or self.ca or self.client_ca):
            return self
        if bool(self.cert) != bool(self.key):
            raise ValueError(f"{where}-cert and {where}-key go together")
        if self.client_auth not in CLIENT_AUTH:
            raise ValueError(f"{where}-client-auth must be one of {', '.join(CLIENT_AUTH)}, got {self.client_auth!r}")
        for flag, path in (("cert", self.cert), ("key", self.key), ("ca", self.ca), ("client-ca", self.client_ca)):
            if path and not Path(path).is_file():
                raise ValueError(f"{where}-{flag}: {path!r} is not a file")
        if role != "client" and not self.cert:
            raise ValueError(f"{where}-ca without {where}-cert and {where}-key: a daemon serves TLS with its own "
                             "certificate")
        if role == "node" and not self.ca:
            raise ValueError(f"a node with TLS needs {where}-ca: only daemons the cluster CA signed may call it")
        if role == "coordinator" and self.client_auth == "required" and not (self.client_ca or self.ca):
            raise ValueError(f"{where}-client-auth required needs {where}-client-ca (or {where}-ca): the CA its "
                             "clients' certificates come from")
        try:
            if self.cert:
                _load(self.cert, self.key, [p for p in (self.ca, self.client_ca) if p])
            elif self.ca:
                _load_cas([self.ca])
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        return self

    @property
    def mutual(self) -> bool:
        return bool(self._client_roots) and self.client_auth == "required"

    @property
    def _client_roots(self) -> str:
        """The CA the clients of this daemon's ports are verified against."""
        return self.client_ca or self.ca

    # gRPC -------------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials:
        """Reloaded at the first handshake after the files change."""
        roots = [self._client_roots] if self._client_roots else []
        files = [self.cert, self.key, *roots]
        lock = threading.Lock()
        watch = FileWatch(files, self.cert)

        def config(loaded: tuple[bytes, bytes, bytes | None]) -> Any:
            key, cert, ca = loaded
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        def fetch() -> Any:  # called by gRPC's core at each handshake: never raises (FileWatch)
            with lock:
                cfg = watch.reload(lambda: config(_load(self.cert, self.key, roots)))  # read once, checked
            if cfg is not None:
                logger.info("TLS: certificate reloaded from %s", self.cert)
            return cfg

        return grpc.dynamic_ssl_server_credentials(config(_load(self.cert, self.key, roots)), fetch,
                                                   require_client_authentication=self.mutual)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca = _load_cas([self.ca]) if self.ca else None
        if not self.cert:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        key, cert, _ = _load(self.cert, self.key, [])
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def _options(self, options: Any) -> list[tuple[str, Any]]:
        out = list(options or [])
        if self.server_name:
            out.append(("grpc.ssl_target_name_override", self.server_name))
        return out

    def aio_channel(self, address: str, options: Any = None) -> grpc.aio.Channel:
        if not self.dials_tls:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, self.channel_credentials(), options=self._options(options))

    def channel(self, address: str, options: Any = None) -> grpc.Channel:
        if not self.dials_tls:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, self.channel_credentials(), options=self._options(options))

    # HTTP -------------------------------------------------------------------
    def server_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._load_into(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.mutual else ssl.CERT_NONE
        return ctx

    def _load_into(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        """The files, read once and checked, loaded into ``ctx`` from private copies: a load that
        could fail half-way (OpenSSL keeps a new certificate whose key did not load) never
        touches ``ctx``."""
        roots = [self._client_roots] if self._client_roots else []
        key, cert, ca = _load(self.cert, self.key, roots)
        with tempfile.TemporaryDirectory(prefix="tandem-tls-") as d:
            cert_p, key_p = Path(d, "cert.pem"), Path(d, "key.pem")
            cert_p.write_bytes(cert)
            key_p.write_bytes(key)
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_p, key_p)  # proves the pair first
            ctx.load_cert_chain(cert_p, key_p)
        if ca:
            ctx.load_verify_locations(cadata=ca.decode())
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """For an HTTPS client of a Tandem daemon: verifies it with the CA, shows this certificate."""
        ctx = ssl.create_default_context(cafile=self.ca or None)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def reloading_context(self, side: str) -> ReloadingContext:
        """``side`` server or client: an SSL context made again when the files change."""
        if side == "server":
            files = [p for p in (self.cert, self.key, self._client_roots) if p]
            return ReloadingContext(self.server_ssl_context, files, self.cert)
        files = [p for p in (self.cert, self.key, self.ca) if p]
        return ReloadingContext(self.client_ssl_context, files, self.cert or self.ca)

    async def keep_reloading(self, ctx: ssl.SSLContext) -> None:
        """Load the files into ``ctx`` again whenever they change (new connections get them)."""
        watch = FileWatch([p for p in (self.cert, self.key, self._client_roots) if p], self.cert)
        while True:
            await asyncio.sleep(RELOAD_CHECK_S)
            if watch.reload(lambda: self._load_into(ctx)) is not None:
                logger.info("TLS: HTTP certificate reloaded from %s", self.cert)


class ReloadingContext:
    """An SSL context for plain sockets (the KV control connection), made again from its files
    when they change (checked at most once a second, at ``get``); a change that does not load
    keeps the previous context and is logged once."""

    def __init__(self, make: Callable[[], ssl.SSLContext], files: list[str], what: str) -> None:
        self._make, self._what = make, what
        self._lock = threading.Lock()
        self._ctx = make()
        self._watch = FileWatch(files, what)
        self._checked = time.monotonic()

    def get(self) -> ssl.SSLContext:
        with self._lock:
            if time.monotonic() - self._checked < RELOAD_CHECK_S:
                return self._ctx
            self._checked = time.monotonic()
            if (ctx := self._watch.reload(self._make)) is not None:
                self._ctx = ctx
                logger.info("TLS: KV control certificate reloaded from %s", self._what)
            return self._ctx


def _load_cas(paths: list[str]) -> bytes:
    from cryptography import x509

    out = b""
    for p in paths:
        data = Path(p).read_bytes()
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise ValueError(f"{p} holds no PEM certificate: {exc}") from None
        out += data if data.endswith(b"\n") else data + b"\n"
    return out


def add_tls_args(ap: argparse.ArgumentParser, *, front_door: bool = False) -> None:
    env = os.environ.get
    ap.add_argument("--tls-cert", default=env("TANDEM_TLS_CERT", ""),
                    help="this process's certificate (PEM): a daemon serves TLS with it and shows it to the daemons "
                         "it dials; a client shows it to the coordinator (TANDEM_TLS_CERT; default: no TLS)")
    ap.add_argument("--tls-key", default=env("TANDEM_TLS_KEY", ""), help="its private key (TANDEM_TLS_KEY)")
    ap.add_argument("--tls-ca", default=env("TANDEM_TLS_CA", ""),
                    help="the cluster CA (TANDEM_TLS_CA): verifies the daemons this process dials, and a node's "
                         "clients (only daemons it signed may call a node)")
    ap.add_argument("--tls-server-name", default=env("TANDEM_TLS_SERVER_NAME", ""),
                    help="verify the daemons this process dials as this name (in their certificate) rather than by "
                         "the address it dials: for pods whose addresses change (TANDEM_TLS_SERVER_NAME)")
    if front_door:
        ap.add_argument("--tls-client-ca", default=env("TANDEM_TLS_CLIENT_CA", ""),
                        help="the CA the coordinator's clients' certificates come from (TANDEM_TLS_CLIENT_CA; "
                             "default: --tls-ca)")
        ap.add_argument("--tls-client-auth", default=env("TANDEM_TLS_CLIENT_AUTH", "required"),
                        choices=CLIENT_AUTH,
                        help="must the coordinator's clients show a certificate the client CA signed "
                             "(TANDEM_TLS_CLIENT_AUTH; default required; none: API keys say who they are)")


# certificates ----------------------------------------------------------------
def make_certs(out_dir: str | Path, hosts: list[str], days: int = 365, loopback: bool = True) -> dict[str, Path]:
    """Two development CAs (``ca``: the daemons', ``client-ca``: the clients') and, signed by them,
    ``server`` (the daemons' certificate: server and client use, for ``hosts``) and ``client``
    (a client's). Keys are written mode 600, every file replaced whole. Where ``out_dir`` already
    has the CAs, they sign new certificates (a rotation the daemons reload); a CA certificate
    whose key is not there is an error, never a new CA. ``loopback``: localhost and 127.0.0.1
    are among the hosts too."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write(path: Path, data: bytes, mode: int) -> Path:
        """Whole or not at all (a daemon reloading it never reads half a file)."""
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        return path

    def write_key(name: str, key: Any) -> Path:
        return write(out / f"{name}.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()), 0o600)

    def write_cert(name: str, cert: Any) -> Path:
        return write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)

    paths: dict[str, Path] = {}

    def authority(name: str, title: str) -> tuple[Any, Any]:
        cert_p, key_p = out / f"{name}.pem", out / f"{name}.key"
        if cert_p.exists():
            if not key_p.exists():
                raise ValueError(f"{cert_p} is here but its key {key_p} is not: put the key back to sign new "
                                 f"certificates with it (a new CA in place of it would cut every daemon off)")
            ca = x509.load_pem_x509_certificate(cert_p.read_bytes())
            key = serialization.load_pem_private_key(key_p.read_bytes(), password=None)
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            if ca.public_key().public_bytes(serialization.Encoding.DER, spki) != \
                    key.public_key().public_bytes(serialization.Encoding.DER, spki):
                raise ValueError(f"{key_p} is not the key of {cert_p}")
        else:
            key, ca = _new_ca(now, days, title)
            write_key(name, key)
            write_cert(name, ca)
        paths[name.replace("-", "_")], paths[f"{name.replace('-', '_')}_key"] = cert_p, key_p
        return key, ca

    def issue(name: str, common_name: str, usages: list[Any], sans: list[Any], ca_key: Any, ca: Any) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        not_after = min(now + datetime.timedelta(days=days), ca.not_valid_after_utc)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
             .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(not_after)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # key first, then the certificate: a reload that sees the new certificate finds its key
        paths[f"{name}_key"] = write_key(name, key)
        paths[name] = write_cert(name, b.sign(ca_key, hashes.SHA256()))

    ca_key, ca = authority("ca", "Tandem development CA (daemons)")
    client_ca_key, client_ca = authority("client-ca", "Tandem development CA (clients)")
    sans: list[Any] = []
    for h in dict.fromkeys([*hosts, *(["localhost", "127.0.0.1"] if loopback else [])]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    issue("server", "tandem daemon", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans,
          ca_key, ca)
    issue("client", "tandem client", [ExtendedKeyUsageOID.CLIENT_AUTH], [], client_ca_key, client_ca)
    return paths


def _new_ca(now: Any, days: int, title: str) -> tuple[Any, Any]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, title)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    return ca_key, ca


def cmd_certs(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        paths = make_certs(args.dir, hosts, args.days)
    except ValueError as exc:
        print(f"tandem certs make: {exc}", file=sys.stderr)
        return 2
    print(f"wrote certificates to {args.dir} (valid {args.days} days at most, hosts: "
          f"{', '.join(dict.fromkeys([*hosts, 'localhost', '127.0.0.1']))}):")
    for name, path in paths.items():
        print(f"  {name:13} {path}")
    print(f"daemons:         --tls-cert {paths['server']} --tls-key {paths['server_key']} --tls-ca {paths['ca']}\n"
          f"the coordinator: also --tls-client-ca {paths['client_ca']}\n"
          f"clients:         --tls-cert {paths['client']} --tls-key {paths['client_key']} --tls-ca {paths['ca']}\n"
          f"keep {paths['ca_key']} and {paths['client_ca_key']} away from the cluster: they sign new certificates "
          "(run this again with them here to rotate; the daemons reload)")
    return 0
