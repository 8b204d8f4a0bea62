"""Per-step metadata the scheduler half builds and the worker half consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from .fetcher import LoadJob
from .handle import TransferHandle
from .store_side import StoreJob


@dataclass
class TandemConnectorMetadata(KVConnectorMetadata):
    # producer: requests that finished and whose blocks are now held for a fetch
    holds: dict[str, list[int]] = field(default_factory=dict)
    lease_s: float = 30.0
    # consumer: blocks to pull, and remote holds to release without pulling
    loads: list[LoadJob] = field(default_factory=list)
    releases: list[TransferHandle] = field(default_factory=list)
    # consumer: requests whose load cannot even start (a handle that does not fit the blocks
    # allocated here); reported as failed loads, so vLLM's load-failure policy handles them
    failures: list[str] = field(default_factory=list)
    # consumer: requests that ended (cancelled, migrated away) while their load may be in flight
    aborts: list[str] = field(default_factory=list)
    # the node's KV store: chunks to copy from its RAM tier into blocks (a lookup's hit), blocks to
    # copy into it (a finished request's prompt), and loads that cannot even start
    store_loads: list[StoreJob] = field(default_factory=list)
    store_saves: list[StoreJob] = field(default_factory=list)
    store_failures: list[str] = field(default_factory=list)


@dataclass
class TandemWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker to scheduler, per step: the KV store saves that ended, and its sync loads copied
    (request id -> copied)."""

    saves: dict[str, bool] = field(default_factory=dict)
    loads: dict[str, bool] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, TandemWorkerMetadata)
        for mine, theirs in ((self.saves, other.saves), (self.loads, other.loads)):
            for rid, ok in theirs.items():
                mine[rid] = mine.get(rid, True) and ok
        return self
