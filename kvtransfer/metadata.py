"""Per-step metadata the scheduler half builds and the worker half consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from .fetcher import LoadJob
from .handle import TransferHandle


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
