"""Cluster membership in etcd: nodes register under a lease; the coordinator watches.

Layout: ``/tandem/<cluster>/nodes/<role>/<node_id>`` -> JSON NodeRecord, bound
to the node's lease (default TTL 10 s, kept alive at a third of the TTL). A
node that dies stops refreshing, and etcd deletes its key when the lease runs
out; a node that exits cleanly revokes its lease at once. A node whose lease
ran out while it lived (etcd unreachable, or the node frozen, for longer than
the TTL) registers again with a fresh lease as soon as it notices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import aetcd
import grpc

from .tls import TlsConfig

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 10
ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    role: str
    grpc_address: str
    kv_address: str
    model: str
    max_model_len: int
    metrics_address: str = ""
    layout: dict[str, object] = field(default_factory=dict)
    version: str = ""
    engine_id: str = ""  # new with every process start; KV handles name it
    draining: bool = False  # finishing what it holds; takes no new work
    scheduling: str = "fcfs"  # its engine's scheduling policy: fcfs or priority (PrefillRequest.priority)
    # a prefill node that serves a request whole (DecodeNode calls with prefill_here: --colocate);
    # one that does not say so (an older version) is never asked to
    serves_whole: bool = False
    # its engine starts each prompt in a step no other prompt's chunk is in (--prompt-steps own);
    # one that does not say so fills a step's spare budget with the next prompt, as vLLM does
    own_steps: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> NodeRecord:
        d = json.loads(raw)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def nodes_prefix(cluster: str) -> bytes:
    return f"/tandem/{cluster}/nodes/".encode()


def node_key(cluster: str, role: str, node_id: str) -> bytes:
    return f"/tandem/{cluster}/nodes/{role}/{node_id}".encode()


def drain_key(cluster: str, node_id: str) -> bytes:
    """Where `tandem drain` (and `tandem role`) ask a node to drain: JSON {engine_id, grace_s,
    restart}. The engine id names the process asked, so a node restarted after its drain is not
    drained again; with restart, the node starts itself again once drained (a role switch)."""
    return f"/tandem/{cluster}/drain/{node_id}".encode()


def role_key(cluster: str, node_id: str) -> bytes:
    """The role `tandem role` gave a node: JSON {role}. It outlives the node's processes (no
    lease): the node takes it at every start, over the role on its command line."""
    return f"/tandem/{cluster}/roles/{node_id}".encode()


@dataclass(frozen=True)
class DrainAsk:
    grace_s: float
    restart: bool = False  # start again once drained (in the role etcd gives it) instead of exiting


async def assigned_role(etcd_url: str, cluster: str, node_id: str) -> str | None:
    """The role `tandem role` gave ``node_id``, or None; ValueError for a malformed entry."""
    client = etcd_client(etcd_url)
    try:
        raw = await client.get(role_key(cluster, node_id))
    finally:
        await client.close()
    if raw is None:
        return None
    try:
        role = json.loads(raw.value)["role"]
    except (ValueError, TypeError, KeyError):
        role = None
    if role not in ROLES:
        raise ValueError(f"the role assigned to {node_id} in etcd ({role_key(cluster, node_id).decode()}) is "
                         f"malformed: {raw.value[:100]!r}")
    return str(role)


def etcd_tls() -> TlsConfig:
    """How this process dials an ``https://`` etcd: TANDEM_ETCD_CA (the CA that signed etcd's
    certificate) and, where etcd asks clients for one (--client-cert-auth), TANDEM_ETCD_CERT and
    TANDEM_ETCD_KEY. The daemons' --etcd-ca/--etcd-cert/--etcd-key set these."""
    return TlsConfig(os.environ.get("TANDEM_ETCD_CERT", ""), os.environ.get("TANDEM_ETCD_KEY", ""),
                     os.environ.get("TANDEM_ETCD_CA", ""))


def use_etcd_tls(cert: str, key: str, ca: str) -> None:
    """This process's (and its children's) ``etcd_tls()``: a daemon's --etcd-* flags."""
    for name, value in (("TANDEM_ETCD_CERT", cert), ("TANDEM_ETCD_KEY", key), ("TANDEM_ETCD_CA", ca)):
        if value:
            os.environ[name] = value


def add_etcd_tls_args(ap: object) -> None:
    env = os.environ.get
    ap.add_argument("--etcd-ca", default=env("TANDEM_ETCD_CA", ""),  # type: ignore[attr-defined]
                    help="for an https:// etcd: the CA that signed its certificate (TANDEM_ETCD_CA)")
    ap.add_argument("--etcd-cert", default=env("TANDEM_ETCD_CERT", ""),  # type: ignore[attr-defined]
                    help="for an etcd that asks clients for a certificate (--client-cert-auth): this one "
                         "(TANDEM_ETCD_CERT)")
    ap.add_argument("--etcd-key", default=env("TANDEM_ETCD_KEY", ""),  # type: ignore[attr-defined]
                    help="its private key (TANDEM_ETCD_KEY)")


def check_etcd_tls(url: str, cert: str, key: str, ca: str) -> None:
    """ValueError when an https:// etcd has no CA or the files do not load."""
    if not url.startswith("https://"):
        return  # the files matter only to a TLS etcd
    if not ca:
        raise ValueError(f"--etcd {url} is https: give --etcd-ca (the CA that signed etcd's certificate)")
    TlsConfig(cert, key, ca).check("client", where="--etcd")


class _TlsClient(aetcd.Client):
    """aetcd over TLS: aetcd itself dials only in plaintext, so ``connect`` makes the same stubs
    on a secure channel."""

    def __init__(self, credentials: grpc.ChannelCredentials, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        from aetcd import rpc, watcher

        try:
            self._is_connecting = True
            self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                                   options=list(self._options.items()))
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def etcd_client(url: str) -> aetcd.Client:
    """An aetcd client for ``http://host:port`` (or ``host:port``), or ``https://`` with ``etcd_tls()``."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if not parsed.hostname or not parsed.port or parsed.scheme not in ("http", "https"):
        raise ValueError(f"bad etcd URL {url!r}; expected http://host:port or https://host:port")
    if parsed.scheme == "https":
        tls = etcd_tls()
        if not tls.ca:
            raise ValueError(f"{url} is https: give the CA that signed etcd's certificate (--etcd-ca, or "
                             "TANDEM_ETCD_CA in the environment)")
        return _TlsClient(tls.channel_credentials(), host=parsed.hostname, port=parsed.port, timeout=5)
    return aetcd.Client(host=parsed.hostname, port=parsed.port, timeout=5)


class Registration:
    """A node's entry in etcd, kept alive until ``close()``."""

    def __init__(self, etcd_url: str, cluster: str, record: NodeRecord, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.record = record
        self.key = node_key(cluster, record.role, record.node_id)
        self._client = etcd_client(etcd_url)
        self._ttl_s = ttl_s
        self._lease: aetcd.Lease | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.create_task(self._keepalive(), name="etcd-keepalive")
        logger.info("registered %s in etcd (lease TTL %d s)", self.key.decode(), self._ttl_s)

    async def update(self, record: NodeRecord) -> None:
        """Replace the registered record (same key, same lease)."""
        self.record = record
        if self._lease is not None:
            await self._client.put(self.key, record.to_json(), lease=self._lease)

    async def drain_requested(self, cluster: str) -> DrainAsk | None:
        """What `tandem drain` or `tandem role` asked of this node's engine, or None."""
        raw = await self._client.get(drain_key(cluster, self.record.node_id))
        if raw is None:
            return None
        try:
            ask = json.loads(raw.value)
            if ask.get("engine_id") != self.record.engine_id:
                return None  # meant for an earlier process of this node
            return DrainAsk(float(ask.get("grace_s", 30.0)), bool(ask.get("restart", False)))
        except (ValueError, TypeError, AttributeError):
            logger.warning("ignoring a malformed drain request for %s", self.record.node_id)
            return None

    async def clear_drain(self, cluster: str) -> None:
        await self._client.delete(drain_key(cluster, self.record.node_id))

    async def _register(self) -> None:
        self._lease = None
        lease = await self._client.lease(self._ttl_s)
        record = self.record
        await self._client.put(self.key, record.to_json(), lease=lease)
        while self.record is not record:  # update() ran meanwhile (say, draining): put what it set
            record = self.record
            await self._client.put(self.key, record.to_json(), lease=lease)
        self._lease = lease

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            try:
                if self._lease is None:  # an earlier re-registration failed half way
                    await self._register()
                    logger.warning("registered %s again with a new lease", self.key.decode())
                    continue
                reply = await self._lease.refresh()
                if reply is None or reply.TTL <= 0:
                    logger.warning("the etcd lease of %s ran out (etcd or this node was unreachable for longer "
                                   "than the %d s TTL); registering again with a new lease",
                                   self.key.decode(), self._ttl_s)
                    await self._register()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd unreachable for a moment: keep trying
                logger.warning("etcd lease refresh failed (retrying): %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            if self._lease is not None:
                await self._lease.revoke()
                logger.info("deregistered %s", self.key.decode())
        except Exception as exc:
            logger.warning("could not revoke etcd lease on exit (it expires by itself): %s", exc)
        await self._client.close()


class MembershipView:
    """The coordinator's live view of the registered nodes."""

    def __init__(self, etcd_url: str, cluster: str,
                 on_change: Callable[[str, NodeRecord | None], None] | None = None) -> None:
        self._client = etcd_client(etcd_url)
        self._prefix = nodes_prefix(cluster)
        self._nodes: dict[bytes, NodeRecord] = {}
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._watch: aetcd.Watch | None = None

    def nodes(self, role: str) -> list[NodeRecord]:
        return [n for n in self._nodes.values() if n.role == role]

    def all_nodes(self) -> list[NodeRecord]:
        return sorted(self._nodes.values(), key=lambda n: (n.role, n.node_id))

    async def start(self) -> None:
        await self._sync()
        self._task = asyncio.create_task(self._follow(), name="etcd-watch")
        logger.info("watching %s: %d nodes now", self._prefix.decode(), len(self._nodes))

    async def _sync(self) -> None:
        """Read the whole prefix, drop what is gone, then watch from the next revision."""
        snapshot = await self._client.get_prefix(self._prefix)
        present = set()
        for kv in snapshot:
            present.add(kv.key)
            self._apply(kv.key, kv.value)
        for key in [k for k in self._nodes if k not in present]:
            self._apply(key, None)
        self._watch = await self._client.watch_prefix(self._prefix, start_revision=snapshot.header.revision + 1)

    def _apply(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            gone = self._nodes.pop(key, None)
            if gone is not None:
                logger.info("node left: %s %s", gone.role, gone.node_id)
                if self._on_change:
                    self._on_change(gone.node_id, self._current(gone.node_id))
            return
        try:
            rec = NodeRecord.from_json(value)
        except (ValueError, TypeError) as exc:
            logger.warning("ignoring malformed node record at %s: %s", key.decode(), exc)
            return
        if rec.role not in ROLES:
            logger.warning("ignoring node %s with unknown role %r", rec.node_id, rec.role)
            return
        if key not in self._nodes:
            logger.info("node joined: %s %s at %s", rec.role, rec.node_id, rec.grpc_address)
        self._nodes[key] = rec
        if self._on_change:
            self._on_change(rec.node_id, self._current(rec.node_id))

    def _current(self, node_id: str) -> NodeRecord | None:
        """The node's record; of two (a node that switched role, whose old record outlives it: a
        lease that expired rather than being revoked), the one not draining: the old process
        marked its record draining before it left."""
        mine = [n for n in self._nodes.values() if n.node_id == node_id]
        return min(mine, key=lambda n: n.draining) if mine else None

    async def _follow(self) -> None:
        while True:
            try:
                assert self._watch is not None
                async for event in self._watch:
                    self._apply(event.kv.key, event.kv.value if event.kind == "PUT" else None)
                logger.warning("etcd watch ended; re-reading the membership")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("etcd watch failed (%s); re-reading the membership", exc)
            while True:
                await asyncio.sleep(1.0)
                try:
                    await self._sync()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    logger.warning("etcd unreachable (%s); retrying", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._watch is not None:
            try:
                await self._watch.cancel()
            except Exception:
                pass
        await self._client.close()
