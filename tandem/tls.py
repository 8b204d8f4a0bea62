"""TLS and mutual TLS for Tandem's gRPC ports and the coordinator's HTTP API.

Every daemon takes the same three files: ``--tls-cert`` and ``--tls-key`` (its
own certificate, served on its ports and shown as its client certificate when
it dials another daemon) and ``--tls-ca`` (the cluster CA: it verifies the
daemons this one dials, and, with client auth ``required``, every client that
connects). Nodes always require a client certificate when they have a CA; the
coordinator's front door takes ``--tls-client-auth required|none`` (``none``:
clients need no certificate, API keys then say who they are).

The server side reloads its certificate and key when the files change: gRPC asks
for them at each handshake (``dynamic_ssl_server_credentials``; the files are
stat'ed, and read only when changed), the HTTP API's SSL context loads them
again within a second. Channels a daemon dials read the files when they are
made; a coordinator makes one per node process, so a node that restarts, or
one that joins, gets the new files.

``tandem certs make DIR`` writes a development CA and certificates.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

CLIENT_AUTH = ("required", "none")
RELOAD_CHECK_S = 1.0


def _stamp(paths: list[str]) -> tuple[tuple[float, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime, st.st_size))
    return tuple(out)


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""
    key: str = ""
    ca: str = ""
    client_auth: str = "required"  # for servers with a CA: required | none
    server_name: str = ""  # verify the daemons it dials as this name, not their address (pods' IPs change)

    @property
    def on(self) -> bool:
        return bool(self.cert)

    def check(self, where: str = "--tls") -> TlsConfig:
        """ValueError naming what is missing or unreadable; loads the files once to prove them."""
        if not (self.cert or self.key or self.ca):
            return self
        if not (self.cert and self.key):
            raise ValueError(f"{where}-cert and {where}-key go together")
        if self.client_auth not in CLIENT_AUTH:
            raise ValueError(f"{where}-client-auth must be one of {', '.join(CLIENT_AUTH)}, got {self.client_auth!r}")
        for flag, path in (("cert", self.cert), ("key", self.key), ("ca", self.ca)):
            if path and not Path(path).is_file():
                raise ValueError(f"{where}-{flag}: {path!r} is not a file")
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cert, self.key)
            if self.ca:
                ctx.load_verify_locations(self.ca)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"{where}: the certificate, key or CA cannot be used: {exc}") from exc
        return self

    @property
    def mutual(self) -> bool:
        return bool(self.ca) and self.client_auth == "required"

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        return (Path(self.key).read_bytes(), Path(self.cert).read_bytes(),
                Path(self.ca).read_bytes() if self.ca else None)

    # gRPC -------------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials:
        """Reloaded at the first handshake after the files change."""
        files = [p for p in (self.cert, self.key, self.ca) if p]
        lock = threading.Lock()
        state = {"stamp": _stamp(files)}

        def config() -> Any:
            key, cert, ca = self._read()
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        def fetch() -> Any:
            with lock:
                try:
                    stamp = _stamp(files)
                    if stamp == state["stamp"]:
                        return None
                    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key)  # a matching pair
                    cfg = config()
                    state["stamp"] = stamp
                except Exception as exc:  # a half-written file: keep serving the old one, try again
                    logger.error("TLS: %s changed but cannot be loaded (the previous certificate stays): %s",
                                 self.cert, exc)
                    return None
            logger.info("TLS: certificate reloaded from %s", self.cert)
            return cfg

        return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=self.mutual)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        key, cert, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def _options(self, options: Any) -> list[tuple[str, Any]]:
        out = list(options or [])
        if self.server_name:
            out.append(("grpc.ssl_target_name_override", self.server_name))
        return out

    def aio_channel(self, address: str, options: Any = None) -> grpc.aio.Channel:
        if not self.on:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, self.channel_credentials(), options=self._options(options))

    def channel(self, address: str, options: Any = None) -> grpc.Channel:
        if not self.on:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, self.channel_credentials(), options=self._options(options))

    # HTTP -------------------------------------------------------------------
    def server_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca:
            ctx.load_verify_locations(self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.mutual else ssl.CERT_NONE
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """For an HTTPS client of a Tandem daemon: verifies it with the CA, shows this certificate."""
        ctx = ssl.create_default_context(cafile=self.ca or None)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    async def keep_reloading(self, ctx: ssl.SSLContext) -> None:
        """Load the files into ``ctx`` again whenever they change (new connections get them)."""
        files = [p for p in (self.cert, self.key, self.ca) if p]
        stamp = _stamp(files)
        while True:
            await asyncio.sleep(RELOAD_CHECK_S)
            try:
                now = _stamp(files)
                if now == stamp:
                    continue
                ctx.load_cert_chain(self.cert, self.key)
                if self.ca:
                    ctx.load_verify_locations(self.ca)
                stamp = now
                logger.info("TLS: HTTP certificate reloaded from %s", self.cert)
            except (OSError, ssl.SSLError) as exc:
                logger.error("TLS: %s changed but cannot be loaded (the previous certificate stays): %s",
                             self.cert, exc)


def add_tls_args(ap: argparse.ArgumentParser, *, front_door: bool = False) -> None:
    env = os.environ.get
    ap.add_argument("--tls-cert", default=env("TANDEM_TLS_CERT", ""),
                    help="this daemon's certificate (PEM): its ports serve TLS, and it shows it to the daemons it "
                         "dials (TANDEM_TLS_CERT; default: no TLS)")
    ap.add_argument("--tls-key", default=env("TANDEM_TLS_KEY", ""), help="its private key (TANDEM_TLS_KEY)")
    ap.add_argument("--tls-ca", default=env("TANDEM_TLS_CA", ""),
                    help="the cluster CA (TANDEM_TLS_CA): verifies the daemons this one dials and, for mutual TLS, "
                         "its clients")
    ap.add_argument("--tls-server-name", default=env("TANDEM_TLS_SERVER_NAME", ""),
                    help="verify the daemons this one dials as this name (in their certificate) rather than by "
                         "the address it dials: for pods whose addresses change (TANDEM_TLS_SERVER_NAME)")
    if front_door:
        ap.add_argument("--tls-client-auth", default=env("TANDEM_TLS_CLIENT_AUTH", "required"),
                        choices=CLIENT_AUTH,
                        help="with --tls-ca: must clients of the coordinator show a certificate the CA signed "
                             "(TANDEM_TLS_CLIENT_AUTH; default required; none: API keys say who they are)")


def tls_from_args(args: argparse.Namespace) -> TlsConfig:
    return TlsConfig(args.tls_cert, args.tls_key, args.tls_ca, getattr(args, "tls_client_auth", "required"),
                     args.tls_server_name).check()


# certificates ----------------------------------------------------------------
def make_certs(out_dir: str | Path, hosts: list[str], days: int = 365, loopback: bool = True) -> dict[str, Path]:
    """A development CA and, signed by it, ``server`` (the daemons' certificate: server and client
    use, for ``hosts``) and ``client`` (a client's). Keys are written mode 600. Where ``out_dir``
    already has a CA (ca.pem, ca.key), it signs new certificates (a rotation the daemons reload).
    ``loopback``: localhost and 127.0.0.1 are among the hosts too."""
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
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
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

    if (out / "ca.pem").exists() and (out / "ca.key").exists():
        ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
        ca_name = ca.subject
        paths: dict[str, Path] = {"ca": out / "ca.pem", "ca_key": out / "ca.key"}
    else:
        ca_key, ca_name, ca = _new_ca(now, days)
        paths = {"ca": write_cert("ca", ca), "ca_key": write_key("ca", ca_key)}

    def issue(name: str, common_name: str, usages: list[Any], sans: list[Any]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
             .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # key first, then the certificate: a reload that sees the new certificate finds its key
        paths[f"{name}_key"] = write_key(name, key)
        paths[name] = write_cert(name, b.sign(ca_key, hashes.SHA256()))

    sans: list[Any] = []
    for h in dict.fromkeys([*hosts, *(["localhost", "127.0.0.1"] if loopback else [])]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    issue("server", "tandem daemon", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans)
    issue("client", "tandem client", [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    return paths


def _new_ca(now: Any, days: int) -> tuple[Any, Any, Any]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tandem development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    return ca_key, ca_name, ca


def cmd_certs(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    paths = make_certs(args.dir, hosts, args.days)
    print(f"wrote a development CA and certificates to {args.dir} (valid {args.days} days, hosts: "
          f"{', '.join(dict.fromkeys([*hosts, 'localhost', '127.0.0.1']))}):")
    for name, path in paths.items():
        print(f"  {name:11} {path}")
    print(f"daemons: --tls-cert {paths['server']} --tls-key {paths['server_key']} --tls-ca {paths['ca']}\n"
          f"clients: --tls-cert {paths['client']} --tls-key {paths['client_key']} --tls-ca {paths['ca']}\n"
          f"keep {paths['ca_key']} away from the cluster: it signs new certificates")
    return 0
