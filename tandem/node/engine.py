"""The vLLM engine host both node kinds share.

Lifecycle, once: start() -> generate()/abort() -> shutdown(). The engine runs
in-process through vLLM's AsyncLLM (its engine core and worker are vLLM's own
child processes) with TandemConnector loaded as its KV connector. An engine
whose core died stays dead (vLLM cannot restart it): ``wait_until_dead``
returns then, and the node leaves the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tandem.errors import InvalidRequest
from tandem.sampling import Sampling

from .config import NodeConfig

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput

logger = logging.getLogger(__name__)

CONNECTOR_MODULE = "tandem.kvtransfer.connector"



def require_host_kv(device_type: str) -> None:
    """Tandem's KV transfer moves host-memory KV caches only; a GPU engine's cache is on the device."""
    if device_type != "cpu":
        raise RuntimeError(
            f"this host's vLLM runs its engine on {device_type}, so its KV cache would be in device memory; "
            "Tandem's KV transfer moves host-memory KV caches only (device KV over NVLink/RDMA is not built "
            "yet). Install the CPU engine (TANDEM_EXTRA=cpu scripts/setup.sh, the cpu extra) to run nodes here.")

class KvRoom:
    """What room the engine's KV cache has, from vLLM's per-step scheduler stats (a stat logger
    in the engine's frontend, this process): its blocks in all, the share in use (blocks that
    only the prefix cache holds count as free: the engine evicts them for new work), and the
    requests its scheduler holds waiting (a prefill whose blocks do not fit waits there).
    A decode node reports it (NodeLoad.kv_tokens, kv_free_tokens, engine_waiting): a local
    prefill, or KV arriving, that does not fit waits until running streams end."""

    def __init__(self) -> None:
        self.blocks = 0  # the cache's blocks (0: not known yet)
        self.block_size = 0
        self.usage = 0.0
        self.waiting = 0

    def factory(self):  # type: ignore[no-untyped-def]
        """A per-engine stat logger factory for AsyncLLM (vLLM's StatLoggerFactory)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        room = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.cache = vllm_config.cache_config

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is None:
                    return
                room.blocks = int(self.cache.num_gpu_blocks or 0)
                room.block_size = int(self.cache.block_size or 0)
                room.usage = float(scheduler_stats.kv_cache_usage)
                room.waiting = int(scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger

    def tokens(self) -> tuple[int, int, int] | None:
        """(the cache's tokens, of them free, requests waiting in the engine); None before the
        engine's first step."""
        if not self.blocks:
            return None
        total = (self.blocks - 1) * self.block_size  # (vLLM keeps one null block)
        return total, round(total * (1.0 - min(1.0, max(0.0, self.usage)))), self.waiting


class EngineHost:
    def __init__(self, cfg: NodeConfig, kv_address: str, engine_id: str, kv_port_reserved: bool = False) -> None:
        self.cfg = cfg
        self.engine_id = engine_id
        self.kv_address = kv_address
        self.kv_port_reserved = kv_port_reserved
        self._engine: Any = None
        self._kv_security: Any = None  # its block server's control-connection security, for releases
        self._arena = ""  # the KV store's shared-memory file, while it has a name
        self.kv_room = KvRoom()
        # Where vLLM publishes its KV events (the daemon subscribes); "" when off.
        self.events_endpoint = ""
        if cfg.engine_kv_events and cfg.enable_prefix_caching:
            name = f"tandem-kvev-{os.getpid()}-{engine_id[-8:]}"
            where = tempfile.gettempdir()
            if len(os.path.join(where, name)) > 100:  # a Unix socket's path has at most 107 bytes
                where = "/tmp"
            self.events_endpoint = f"ipc://{os.path.join(where, name)}"

    def start(self) -> None:
        """Start vLLM (tens of seconds on CPU); blocks until it is ready."""
        from vllm.platforms import current_platform

        require_host_kv(current_platform.device_type)  # before minutes of loading, not after
        cfg = self.cfg
        # vLLM's CPU backend reads these when it starts its worker process.
        # The engine's KV cache, in bytes (vLLM's VLLM_CPU_KVCACHE_SPACE takes whole GiB only, and
        # would override this: the flag decides).
        if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
            logger.info("VLLM_CPU_KVCACHE_SPACE ignored: --kv-cache-gib sizes the engine's KV cache")
        if cfg.cores:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cores
        from vllm.config import KVEventsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        role = "kv_producer" if cfg.role == "prefill" else "kv_consumer"
        tandem = dict(
            model=cfg.model,
            served_model_name=[cfg.served_model_name],
            dtype=cfg.dtype,
            enforce_eager=True,
            max_model_len=cfg.max_model_len or None,
            block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs,
            kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
            max_num_batched_tokens=cfg.max_num_batched_tokens or None,
            enable_prefix_caching=cfg.enable_prefix_caching,
            scheduling_policy=cfg.scheduling_policy,
            kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                            endpoint=self.events_endpoint) if self.events_endpoint else None,
            # A stop signal that reaches the engine core too (a terminal's Ctrl-C, a process-group
            # kill) lets its requests finish like the daemon's own drain, instead of aborting them.
            shutdown_timeout=int(cfg.drain_grace_s),
            kv_transfer_config={
                "kv_connector": "TandemConnector",
                "kv_connector_module_path": CONNECTOR_MODULE,
                "kv_role": role,
                "engine_id": self.engine_id,
                "kv_load_failure_policy": cfg.kv_load_failure_policy,
                "kv_connector_extra_config": {
                    "engine_id": self.engine_id,
                    "address": self.kv_address,
                    "advertise": cfg.kv_advertise or self.kv_address,
                    "port_reserved": self.kv_port_reserved,
                    "lease_s": cfg.lease_s,
                    "transport": cfg.transport,
                    "prompt_steps": cfg.prompt_steps,
                    "kv_secret_file": cfg.kv_secret_file,
                    # the KV control connection's TLS: the node's own files (paths; secure.py)
                    **self._kv_tls_files().to_extra(),
                    **self._kvstore_config(),
                },
            },
        )
        # vLLM's flags from the command line, then Tandem's settings over them; these two are only
        # Tandem's defaults (no flag of its own), so an operator's vLLM flag for them keeps.
        given = dict(cfg.engine_args)
        for name in ("enforce_eager", "enable_prefix_caching"):
            if name in given:
                tandem.pop(name)
        args = AsyncEngineArgs(**{**given, **tandem})
        try:
            self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[self.kv_room.factory()])
        finally:
            self._drop_arena_name()  # opened by then, or the engine did not start
        logger.info("vLLM engine ready: model %s, context %d tokens", cfg.model, self.max_model_len)

    def _kvstore_config(self) -> dict[str, Any]:
        """The connector's kvstore_* keys (tandem.kvtransfer.store_side.StoreConfig); none when off."""
        cfg = self.cfg
        if not cfg.kvstore_ram_gib:
            return {}
        from tandem.kvstore.keys import model_identity

        self._arena = f"/dev/shm/tandem-kv-{os.getpid()}-{self.engine_id}"
        return {
            "kvstore_ram_bytes": int(cfg.kvstore_ram_gib * 2**30),
            # the worker creates it, the engine core opens it and drops the name (nothing is left
            # behind, even on a crash)
            "kvstore_arena": self._arena,
            "kvstore_dir": cfg.kvstore_dir,
            "kvstore_disk_bytes": int(cfg.kvstore_disk_gib * 2**30),
            "kvstore_chunk_blocks": cfg.kvstore_chunk_tokens // cfg.block_size,
            "kvstore_save": cfg.kvstore_save,
            "kvstore_eviction": cfg.kvstore_eviction,
            "kvstore_load": cfg.kvstore_load,
            "kvstore_promote_wait_ms": cfg.kvstore_promote_wait_ms,
            "kvstore_model_id": model_identity(cfg.model) + f"|{cfg.dtype}",
        }

    async def reset_cache(self, store_ram: bool) -> bool:
        """Empty the engine's prefix cache (and the KV store's RAM tier); False when some was in use."""
        ok = bool(await self._engine.reset_prefix_cache(reset_connector=store_ram))
        logger.info("cache reset (%s): %s", "engine and KV store RAM" if store_ram else "engine",
                    "done" if ok else "some blocks in use, kept")
        return ok

    @property
    def max_model_len(self) -> int:
        return int(self._engine.model_config.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self._engine.model_config.get_vocab_size())

    @property
    def block_size(self) -> int:
        return int(self._engine.vllm_config.cache_config.block_size)

    @property
    def step_tokens(self) -> int:
        """The engine's per-step token budget, as it runs (vLLM's default where the node set none)."""
        return int(self._engine.vllm_config.scheduler_config.max_num_batched_tokens)

    @property
    def dead(self) -> bool:
        return self._engine is not None and bool(self._engine.errored)

    async def wait_until_dead(self, every_s: float = 0.5) -> None:
        """Return once the engine core has died (it does not come back)."""
        while not self.dead:
            await asyncio.sleep(every_s)

    def layout(self) -> dict[str, object]:
        """What the KV layout check compares, as far as the config tells it."""
        vc = self._engine.vllm_config
        mc, pc = vc.model_config, vc.parallel_config
        return {
            "num_layers": mc.get_num_layers(pc),
            "block_size": vc.cache_config.block_size,
            "num_kv_heads": mc.get_num_kv_heads(pc),
            "head_size": mc.get_head_size(),
            "dtype": str(mc.dtype).removeprefix("torch."),
        }

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: Sampling,
                       kv_params: dict[str, Any] | None, priority: int = 0,
                       stream_interval: int = 1) -> AsyncIterator[RequestOutput]:
        """Stream outputs holding only the new tokens (delta mode); aborts on cancel. ``priority``
        (lower first) counts only where the engine runs the priority policy; ``stream_interval``:
        tokens per output after the first (vLLM's; an engine-wide --stream-interval raises it)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(
            n=1,
            max_tokens=sampling.max_tokens,
            min_tokens=sampling.min_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            seed=sampling.seed,
            ignore_eos=sampling.ignore_eos,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            stream_interval=stream_interval if stream_interval > 1 else None,
            extra_args={"kv_transfer_params": kv_params} if kv_params else None,
        )
        finished = started = False
        try:
            async for out in self._engine.generate({"prompt_token_ids": prompt_token_ids}, sp,
                                                   request_id=request_id,
                                                   priority=priority if self.cfg.scheduling_policy == "priority" else 0):
                started = True
                finished = out.finished
                yield out
        except ValueError as exc:
            if started:
                raise
            # vLLM's input checks (token ids outside the vocabulary, too long, ...): bad input.
            raise InvalidRequest(f"the engine refused the request: {exc}") from exc
        finally:
            if not finished:
                await self.abort(request_id)

    def _kv_tls_files(self) -> Any:
        from tandem.kvtransfer.secure import ControlTlsFiles

        cfg = self.cfg
        return ControlTlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.tls_server_name)

    async def release_held(self, remote_request_id: str, engine_id: str, handle: Any = None) -> None:
        """Free the blocks this engine holds for a request's fetch (OSError / TransferError when its
        block server cannot be reached; CapabilityRefused when ``handle`` lacks a valid capability)."""
        from tandem.kvtransfer.fetcher import release_remote
        from tandem.kvtransfer.secure import ControlSecurity, ControlTlsFiles

        if self._kv_security is None:
            files = self._kv_tls_files()
            host = self.kv_address.rpartition(":")[0]
            if not files.server_name and host in ("0.0.0.0", "::", "[::]", ""):
                # its own port, dialled on loopback: verified as localhost (tandem certs make puts it in)
                files = ControlTlsFiles(files.cert, files.key, files.ca, "localhost")
            self._kv_security = ControlSecurity(tls=files.config())
        security = self._kv_security
        # Always this node's own block server, whatever address a handle names.
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: release_remote(self.kv_address, remote_request_id, engine_id, handle=handle,
                                         security=security))

    async def abort(self, request_id: str) -> None:
        logger.info("request %s: aborting in the engine", request_id)
        await self._engine.abort(request_id)

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        self._drop_arena_name()

    def _drop_arena_name(self) -> None:
        from pathlib import Path

        if self._arena:
            Path(self._arena).unlink(missing_ok=True)
