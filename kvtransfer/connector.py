"""TandemConnector: Tandem's vLLM v1 KV connector.

vLLM instantiates this class twice, once per role, in different processes:
  scheduler role (engine core):  get_num_new_matched_tokens, update_state_after_alloc,
                                 build_connector_meta, request_finished
  worker role (beside the model): register_kv_caches, bind_connector_metadata
                                 (holds and loads start here, before the forward),
                                 get_transfer_results, shutdown
The roles share no objects; per-step state crosses as TandemConnectorMetadata.
Loads are asynchronous (whole blocks pulled between steps), so the per-layer
hooks (wait_for_layer_load, save_kv_layer) have nothing to do.

kv_connector_extra_config keys: engine_id, address (host:port this engine's
block server binds; producers), advertise (host:port put in handles, when
decode nodes reach the server through a NAT or proxy; default: address),
port_reserved (the daemon holds that port with SO_REUSEPORT until the server
is up), lease_s, transport (auto | ucx | tcp), kv_secret_file, tls_cert, tls_key,
tls_ca, tls_server_name (secure.py: the control connection's TLS; paths only),
prompt_steps (own | shared: scheduler_side.PromptSteps; default shared, vLLM's own).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from tandem.logs import ensure_engine_logging

from .capability import load_secret
from .handle import CONSUME
from .metadata import TandemConnectorMetadata, TandemWorkerMetadata
from .scheduler_side import SchedulerSide
from .secure import ControlSecurity, ControlTlsFiles
from .store_side import StoreConfig, open_store_scheduler
from .stats import TandemKVStats, TandemPromMetrics
from .worker_side import WorkerSide

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0


class TandemConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        ktc = vllm_config.kv_transfer_config
        extra: dict[str, Any] = dict(ktc.kv_connector_extra_config or {})
        engine_id = str(extra.get("engine_id") or ktc.engine_id)
        address = str(extra.get("address", ""))
        lease_s = float(extra.get("lease_s", DEFAULT_LEASE_S))
        # the file's path travels in the config (which vLLM logs), never the secret itself
        secret = load_secret(extra["kv_secret_file"]) if extra.get("kv_secret_file") else None
        block_size = vllm_config.cache_config.block_size
        if ktc.is_kv_producer and not address:
            raise ValueError("TandemConnector: a producer needs kv_connector_extra_config['address']")
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        store = StoreConfig.parse(extra, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:
            ensure_engine_logging("kv-sched")  # the engine core's process: its lines reach the node's log
            self._sched = SchedulerSide(engine_id, block_size, str(extra.get("advertise") or address), lease_s,
                                        store=open_store_scheduler(store, block_size) if store else None,
                                        secret=secret, own_steps=extra.get("prompt_steps") == "own")
        else:
            mc, pc = vllm_config.model_config, vllm_config.parallel_config
            if kv_cache_config is None:
                raise ValueError("TandemConnector: the worker role needs the KV cache config")
            self._worker = WorkerSide(
                is_producer=ktc.is_kv_producer,
                is_consumer=ktc.is_kv_consumer,
                engine_id=engine_id,
                address=address,
                port_reserved=bool(extra.get("port_reserved", False)),
                transport=str(extra.get("transport", "auto")),
                num_blocks=kv_cache_config.num_blocks,
                layout_fields={
                    "block_size": block_size,
                    "num_kv_heads": mc.get_num_kv_heads(pc),
                    "head_size": mc.get_head_size(),
                },
                store=store,
                security=ControlSecurity(secret, ControlTlsFiles.from_extra(extra).config()),
            )

    # worker role --------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        # Act on the step's metadata here, before the forward pass: vLLM calls
        # start_load_kv only after the forward when no load is synchronous, and a
        # hold registered that late would keep a decode's fetch waiting for the
        # whole step (seconds, behind a long prefill).
        super().bind_connector_metadata(connector_metadata)
        assert self._worker is not None and isinstance(connector_metadata, TandemConnectorMetadata)
        self._worker.start_step(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        return  # loads were handed to the fetch thread in bind_connector_metadata

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sent, recvd, failed = self._worker.transfer_results()
        return KVConnectorTransferResults(finished_sending=sent, finished_recving=recvd, failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending, r.finished_recving

    def get_kv_connector_stats(self) -> TandemKVStats | None:
        if self._worker is not None:
            return self._worker.take_stats()
        return self._sched.take_stats() if self._sched is not None else None

    def build_connector_worker_meta(self) -> TandemWorkerMetadata | None:
        return self._worker.worker_meta() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TandemKVStats:
        return TandemKVStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> TandemPromMetrics:
        return TandemPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._sched is not None and self._sched.store is not None:
            self._sched.store.store.close()  # what is queued for the disk gets there first

    # scheduler role -----------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._sched is not None
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._sched is not None
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int
                                       ) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        p = request.kv_transfer_params
        # From the prefill node (a transfer), or from this node's KV store (host memory).
        source = CacheHitSource.P2P if p and p.get("tandem") == CONSUME else CacheHitSource.HOST
        return {source: num_external_tokens}

    def reset_cache(self) -> bool | None:
        # vLLM's reset_prefix_cache(reset_connector=True): the KV store's RAM tier.
        if self._sched is None or self._sched.store is None:
            return None
        return self._sched.store.store.drop_ram()

    def has_pending_push_work(self) -> bool:
        # Keep vLLM stepping while the worker copies a finished request's prompt into the store:
        # its chunks become ready for lookups only when a step brings the news back.
        # Also while its disk work or its events (KV events, for routing) are pending: they travel only
        # with a step's stats.
        store = self._sched.store if self._sched is not None else None
        return store is not None and (store.saving or store.store.pending())

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._sched is not None
        self._sched.update_connector_output(connector_output)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._sched is not None
        return self._sched.build_connector_meta()

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._sched is not None
        return self._sched.request_finished(request, block_ids)
