"""A one-machine Tandem cluster of real processes: etcd, a coordinator, prefill and decode nodes.

`tandem up` and the end-to-end tests both use it. Each daemon is a child
process (`python -m tandem.cli <role> ...`) whose output goes to a log file;
it is ready when it prints its TANDEM_READY line. With ``supervise`` on, a
Supervisor restarts whatever dies or stops answering (etcd included) while
the rest keeps serving.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .etcd_server import LocalEtcd
from tandem.node.config import READY_LINE, RESTARTING_LINE, core_spec
from tandem.tls import TlsConfig
from .supervisor import OK, REFUSED, SILENT, Event, Supervisor

logger = logging.getLogger(__name__)



class StartStopped(Exception):
    """A stop was asked for while the cluster was starting; what had started was stopped."""


@dataclass
class Daemon:
    name: str
    role: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    tls: TlsConfig = field(default_factory=TlsConfig)  # what its health probe dials with
    proc: subprocess.Popen[str] | None = None
    info: dict[str, str] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Start the process (again, after a kill: the same command line, a fresh READY line)."""
        self.ready.clear()
        self.info = {}
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        threading.Thread(target=self._pump, name=f"log-{self.name}", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "a", buffering=1) as log:
            for line in self.proc.stdout:
                log.write(line)
                if line.startswith(READY_LINE):
                    self.info = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                    self.role = self.info.get("role", self.role)  # `tandem role` may have changed it
                    self.ready.set()
                elif line.startswith(RESTARTING_LINE):  # it starts again in place: not ready until it says so
                    self.ready.clear()
                    self.info = {}

    def wait_ready(self, deadline: float) -> None:
        while not self.ready.wait(0.2):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                                   f"last lines of {self.log_path}:\n{tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} was not ready in time; last lines of {self.log_path}:\n"
                                   f"{tail(self.log_path)}")

    def pin_ports(self) -> None:
        """A ready coordinator started on port 0: its command line takes the ports it bound, so a
        restart comes back at the same addresses."""
        for flag, key in (("--grpc-port", "grpc"), ("--http-port", "http")):
            port = self.info.get(key, "").rpartition(":")[2]
            if flag in self.argv and port.isdigit():
                self.argv[len(self.argv) - 1 - self.argv[::-1].index(flag) + 1] = port  # (the last one counts)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def probe(self, timeout_s: float = 2.0) -> str:
        """One gRPC health check: supervisor.OK, REFUSED (not serving, or no server on the
        port) or SILENT (no answer in ``timeout_s``: a frozen or wedged process)."""
        address = self.info.get("grpc")
        if not address:
            return REFUSED
        with self.tls.channel(address) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.RpcError as exc:
                return SILENT if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else REFUSED
        return OK if resp.status == health_pb2.HealthCheckResponse.SERVING else REFUSED

    def kill(self) -> None:
        """SIGKILL the whole process group (vLLM's engine processes too) and reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            if sig in (signal.SIGTERM, signal.SIGINT):
                # The daemon alone: it drains and stops its engine itself. vLLM's engine core,
                # signalled too, would abort every request it holds at once.
                self.proc.send_signal(sig)
            else:
                os.killpg(self.proc.pid, sig)  # the whole group: vLLM's engine processes too

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
            self.signal(signal.SIGKILL)
            self.proc.wait()
        # vLLM's engine children are in the same process group; make sure none lingers.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tail(path: Path, n: int = 30) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return "(no log)"


def core_plan(num_prefill: int, num_decode: int, cores: list[int] | None = None) -> list[str]:
    """One core set per node, prefill nodes first; the two pools never share a core.

    A prefill and a decode engine pinned to the same core starve each other
    badly (vLLM's worker spins between steps, and a prefill engine that holds
    blocks steps every millisecond): seen here as decode KV loads that never
    finished. Nodes of one pool may share cores when there are too few. With no prefill pool
    (P:D 0:N, the decode nodes prefill what they decode) the decode nodes have every core.
    """
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if num_decode < 1 or num_prefill < 0:
        raise ValueError(f"P:D {num_prefill}:{num_decode}: a cluster needs a decode node, and no fewer than 0 prefill nodes")
    if num_prefill == 0:
        return _deal(cores, num_decode)
    if len(cores) < 2:
        raise ValueError("a local cluster needs at least 2 cores: one for each pool")
    n_pre = max(1, round(len(cores) * num_prefill / (num_prefill + num_decode)))
    n_pre = min(n_pre, len(cores) - 1)
    return _deal(cores[:n_pre], num_prefill) + _deal(cores[n_pre:], num_decode)


def _deal(cores: list[int], n: int) -> list[str]:
    if len(cores) < n:
        return [str(cores[i % len(cores)]) for i in range(n)]
    per = len(cores) // n
    return [core_spec(cores[i * per:(i + 1) * per]) for i in range(n)]


@dataclass
class ClusterSpec:
    model: str
    num_prefill: int = 1
    num_decode: int = 1
    transport: str = "auto"
    kv_cache_gib: float = 1.0  # each engine's own KV cache (each prefill engine's, with decode_kv_cache_gib)
    decode_kv_cache_gib: float = 0.0  # each decode engine's own KV cache; 0: kv_cache_gib
    max_model_len: int = 0
    etcd: str = ""  # empty: start a private etcd
    cluster: str = "default"
    ttl_s: int = 10
    lease_s: float = 30.0
    host: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    log_dir: str = ""
    extra_node_args: list[str] = field(default_factory=list)
    node_args: dict[str, list[str]] = field(default_factory=dict)  # node name -> more flags for that node
    extra_coordinator_args: list[str] = field(default_factory=list)
    num_coordinators: int = 1  # stateless front doors on the same etcd: coordinator, coordinator-1, ...
    cores: list[str] = field(default_factory=list)  # per node, prefill nodes first; empty: dealt out
    supervise: bool = False  # restart daemons that die or stop answering (tandem up: on)
    kvstore_ram_gib: float = 0.0  # each node's KV store RAM tier; 0: no store
    kvstore_root: str = ""  # each node's disk tier in <root>/<node name>; empty: RAM only
    # The nodes' shared KV secret (capability.py): this file, or (empty) a new one in the log dir;
    # kv_auth False runs the KV ports unauthenticated.
    kv_secret_file: str = ""
    kv_auth: bool = True
    # Mutual TLS on every gRPC port, the coordinator's HTTP API and this cluster's own etcd, with
    # certificates `tandem certs make` writes into <log dir>/certs (client.pem there is a client's).
    tls: bool = False


class LocalCluster:
    def __init__(self, spec: ClusterSpec, on_event: Callable[[Event], None] | None = None) -> None:
        self.spec = spec
        self.on_event = on_event
        self.log_dir = Path(spec.log_dir or tempfile.mkdtemp(prefix="tandem-run-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.etcd: LocalEtcd | None = None
        self.etcd_url = spec.etcd
        self.coordinators: list[Daemon] = []
        self.nodes: list[Daemon] = []
        self.supervisor: Supervisor | None = None
        self.tls = TlsConfig()  # the daemons' own (server) certificate, when spec.tls
        self.client_tls = TlsConfig()  # a client's

    def tls_args(self, coordinator: bool = False) -> list[str]:
        """A daemon's TLS flags; empty ones without TLS (so that TANDEM_TLS_* in the environment
        cannot turn it on behind this cluster's probes)."""
        if not self.spec.tls:
            return ["--tls-cert", "", "--tls-key", "", "--tls-ca", "",
                    *(["--etcd-ca", "", "--etcd-cert", "", "--etcd-key", ""]
                      if not self.etcd_url.startswith("https://") else [])]
        if not self.tls.on:
            from tandem.tls import make_certs

            p = make_certs(self.log_dir / "certs", [self.spec.host])
            self.tls = TlsConfig(str(p["server"]), str(p["server_key"]), str(p["ca"]))
            self.client_tls = TlsConfig(str(p["client"]), str(p["client_key"]), str(p["ca"]))
            self._client_ca = str(p["client_ca"])
        return ["--tls-cert", self.tls.cert, "--tls-key", self.tls.key, "--tls-ca", self.tls.ca,
                *(["--tls-client-ca", self._client_ca] if coordinator else []),
                *(["--etcd-ca", self.tls.ca, "--etcd-cert", self.tls.cert, "--etcd-key", self.tls.key]
                  if self._own_tls_etcd() else [])]

    def _own_tls_etcd(self) -> bool:
        return self.etcd is not None and self.etcd.tls is not None

    def channel(self, address: str) -> grpc.Channel:
        """A client's channel to a coordinator of this cluster (its client certificate with TLS)."""
        return self.client_tls.channel(address)

    def aio_channel(self, address: str, options: object = None) -> grpc.aio.Channel:
        return self.client_tls.aio_channel(address, options)

    def node_channel(self, address: str) -> grpc.Channel:
        """A channel to a node, as a daemon dials it (with TLS only the cluster CA's certificates
        get in: the daemons' own)."""
        return self.tls.channel(address)

    def _kv_secret(self) -> str:
        if not self.spec.kv_auth:
            return ""
        if self.spec.kv_secret_file:
            return self.spec.kv_secret_file
        from tandem.kvtransfer.capability import write_secret

        path = self.log_dir / "kv-secret"
        return str(path if path.exists() else write_secret(path))

    def _kvstore_args(self, name: str) -> list[str]:
        s = self.spec
        if not s.kvstore_ram_gib:
            return []
        return ["--kvstore-ram-gib", str(s.kvstore_ram_gib),
                *(["--kvstore-dir", str(Path(s.kvstore_root) / name)] if s.kvstore_root else [])]

    # endpoints --------------------------------------------------------------
    @property
    def coordinator(self) -> Daemon | None:
        """The first coordinator (the one ``grpc_address`` and ``http_url`` name)."""
        return self.coordinators[0] if self.coordinators else None

    @property
    def grpc_address(self) -> str:
        assert self.coordinator is not None
        return self.coordinator.info["grpc"]

    @property
    def http_url(self) -> str:
        assert self.coordinator is not None
        return self.coordinator.info["http"]

    def node(self, name: str) -> Daemon:
        return next(d for d in self.nodes if d.name == name)

    # lifecycle --------------------------------------------------------------
    def _common_args(self) -> list[str]:
        """Every daemon's flags for this cluster: its etcd, name, model, host and max model length."""
        s = self.spec
        return ["--etcd", self.etcd_url, "--cluster", s.cluster, "--model", s.model, "--host", s.host,
                *(["--max-model-len", str(s.max_model_len)] if s.max_model_len else [])]

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tandem.cli", *args]

    def start(self, timeout_s: float = 300.0, progress: Callable[[str], None] | None = None,
              stop: threading.Event | None = None) -> LocalCluster:
        """Start everything and wait until each daemon is ready; ``progress`` hears each one that
        gets there and, every 10 s, which are still starting; ``stop`` set meanwhile stops what
        started and raises StartStopped."""
        s = self.spec
        try:
            if not self.etcd_url:
                self.tls_args()  # with TLS: the certificates first, etcd serves with the daemons'
                self.etcd = LocalEtcd(s.host, tls=self.tls if s.tls else None).start()
                self.etcd_url = self.etcd.url
            if self._own_tls_etcd():
                # this process (its tests, its tools) and the daemons dial etcd with the daemons' files
                from tandem.membership import use_etcd_tls

                use_etcd_tls(self.tls.cert, self.tls.key, self.tls.ca)
            secret = self._kv_secret()
            for i in range(s.num_coordinators):
                name = "coordinator" if i == 0 else f"coordinator-{i}"
                fixed = i == 0  # the spec's ports are the first coordinator's
                # 0: it binds a free port itself and says which (``pin_ports`` keeps them for a
                # restart); a port picked here could be taken before it binds
                self.coordinators.append(self.add_coordinator(
                    name, *s.extra_coordinator_args, grpc_port=s.grpc_port if fixed else 0,
                    http_port=s.http_port if fixed else 0))
            plan = s.cores or core_plan(s.num_prefill, s.num_decode)
            roles = ["prefill"] * s.num_prefill + ["decode"] * s.num_decode
            counters = {"prefill": 0, "decode": 0}
            for role, cores in zip(roles, plan):
                name = f"{role}-{counters[role]}"
                counters[role] += 1
                argv = self._cli(role, *self._common_args(), *self.tls_args(), "--node-id", name, "--cores", cores,
                                 "--kv-cache-gib", str(s.kv_cache_gib),
                                 "--decode-kv-cache-gib", str(s.decode_kv_cache_gib),
                                 "--kv-transport", s.transport,
                                 *(["--kv-secret-file", secret] if secret else []),
                                 "--ttl-s", str(s.ttl_s), "--kv-lease-s", str(s.lease_s),
                                 *self._kvstore_args(name), *s.extra_node_args, *s.node_args.get(name, []))
                d = Daemon(name, role, argv, self.log_dir / f"{name}.log", tls=self.tls)
                d.start()
                self.nodes.append(d)
            self._wait_ready([*self.coordinators, *self.nodes], timeout_s, progress, stop)
            for c in self.coordinators:
                c.pin_ports()
            if s.supervise:
                self.supervisor = Supervisor(self.daemons, on_event=self.on_event).start()
        except BaseException:
            self.stop()
            raise
        return self

    def add_coordinator(self, name: str, *args: str, grpc_port: int = 0, http_port: int = 0,
                        command: list[str] | None = None, env: dict[str, str] | None = None) -> Daemon:
        """Another coordinator on this cluster's etcd, started (not yet ready), logging to
        <log dir>/<name>.log: the cluster's etcd, name, model, host, TLS and max model length,
        then ``args`` (a flag there overrides the cluster's: ``--cluster other`` sees other nodes).
        Ports 0: it binds free ones and says which (``info``). ``command``: what runs
        ``tandem`` (this Python's ``-m tandem.cli``). Not this cluster's to supervise or stop:
        the caller stops it (``start`` keeps its own in ``coordinators``)."""
        argv = [*(command or self._cli()), "coordinator", *self._common_args(), *self.tls_args(coordinator=True),
                "--grpc-port", str(grpc_port), "--http-port", str(http_port), *args]
        # its front door takes the client CA's certificates, not the daemons'
        d = Daemon(name, "coordinator", argv, self.log_dir / f"{name}.log", env=env or {}, tls=self.client_tls)
        d.start()
        return d

    @staticmethod
    def _wait_ready(pending: list[Daemon], timeout_s: float, progress: Callable[[str], None] | None,
                    stop: threading.Event | None) -> None:
        t0 = time.monotonic()
        deadline, noted = t0 + timeout_s, t0
        while pending:
            for d in list(pending):
                exited = d.proc is not None and d.proc.poll() is not None
                if d.is_ready() and exited:  # it got there, then died
                    raise RuntimeError(f"{d.name} exited with code {d.proc.returncode} right after it was ready; "
                                       f"last lines of {d.log_path}:\n{tail(d.log_path)}")
                if d.is_ready():
                    pending.remove(d)
                    if progress:
                        progress(f"{d.name} ready ({time.monotonic() - t0:.0f} s)")
                elif exited:
                    d.wait_ready(deadline)  # raises: it exited, with its log's last lines
            if not pending:
                return
            if stop is not None and stop.is_set():
                raise StartStopped(f"stopped while {', '.join(d.name for d in pending)} started")
            now = time.monotonic()
            if now > deadline:
                pending[0].wait_ready(deadline)  # raises, with its log's last lines
            if progress and now - noted >= 10:
                noted = now
                progress(f"waiting for {', '.join(d.name for d in pending)} ({now - t0:.0f} s)")
            time.sleep(0.2)

    def daemons(self) -> list[Daemon | LocalEtcd]:
        """Everything this cluster runs, etcd first (when it is this cluster's own)."""
        out: list[Daemon | LocalEtcd] = [self.etcd] if self.etcd is not None else []
        return out + self.coordinators + self.nodes

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        for d in self.nodes:
            d.signal(signal.SIGTERM)
        for d in self.nodes:
            d.stop()
        for c in self.coordinators:
            c.stop()
        if self.etcd is not None:
            self.etcd.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
