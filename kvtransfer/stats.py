"""Transfer statistics: gathered in the worker, carried by vLLM to the node process, exported there.

vLLM moves a connector's KVConnectorStats from its worker to the engine's
stat loggers, which call TandemPromMetrics.observe() in the node's own process,
so the metrics appear on the node's /metrics beside vLLM's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats


logger = logging.getLogger(__name__)

# Called in the node's process with each batch of the KV store's events (kvstore/held.py): the
# node's daemon registers its HeldChunks.apply here.
STORE_EVENT_SINKS: list[Callable[[list[tuple[str, str, str]]], None]] = []
# Called in the node's process, once a step in which the KV store loaded or promoted, with (prompt
# tokens loaded into the engine's blocks, chunks promoted from disk): the node's NodePerf.saw_store_loads,
# which tells a prefill that loaded from one that computed (tandem/node/perf.py).
STORE_LOAD_SINKS: list[Callable[[int, int], None]] = []


def empty_stats() -> dict[str, Any]:
    return {"bytes_sent": 0, "bytes_recv": 0, "fetch_seconds": [], "fetch_failures": 0, "fetch_aborts": 0,
            "blocks_held": None}


@dataclass
class TandemKVStats(KVConnectorStats):
    def __post_init__(self) -> None:
        if not self.data:
            self.data = empty_stats()

    def reset(self) -> None:
        self.data = empty_stats()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        o = other.data
        d = self.data
        d["bytes_sent"] += o.get("bytes_sent", 0)
        d["bytes_recv"] += o.get("bytes_recv", 0)
        d["fetch_seconds"] = list(d["fetch_seconds"]) + list(o.get("fetch_seconds", []))
        d["fetch_failures"] += o.get("fetch_failures", 0)
        d["fetch_aborts"] = d.get("fetch_aborts", 0) + o.get("fetch_aborts", 0)
        if o.get("blocks_held") is not None:
            d["blocks_held"] = o["blocks_held"]
        # the KV store: counts from the scheduler half, copy timings from the worker half
        if o.get("store"):
            mine = d.setdefault("store", {})
            for k, v in o["store"].items():
                mine[k] = mine.get(k, 0) + v
        if o.get("store_held") is not None:
            d["store_held"] = o["store_held"]
        for k in ("store_load_seconds", "store_save_seconds"):
            if o.get(k):
                d[k] = list(d.get(k, [])) + list(o[k])
        if o.get("store_load_bytes"):
            d["store_load_bytes"] = d.get("store_load_bytes", 0) + o["store_load_bytes"]
        if o.get("store_events"):
            d["store_events"] = list(d.get("store_events", [])) + list(o["store_events"])
        if o.get("prompts_held"):
            d["prompts_held"] = d.get("prompts_held", 0) + o["prompts_held"]
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        secs = d["fetch_seconds"]
        return {"bytes_sent": d["bytes_sent"], "bytes_recv": d["bytes_recv"], "fetches": len(secs),
                "fetch_failures": d["fetch_failures"], "fetch_aborts": d.get("fetch_aborts", 0),
                "avg_fetch_s": round(sum(secs) / len(secs), 6) if secs else 0.0}

    def is_empty(self) -> bool:
        d = self.data
        return (not d["bytes_sent"] and not d["bytes_recv"] and not d["fetch_seconds"]
                and not d["fetch_failures"] and not d.get("fetch_aborts") and d["blocks_held"] is None
                and not d.get("store") and d.get("store_held") is None and not d.get("store_load_seconds")
                and not d.get("store_save_seconds") and not d.get("store_events") and not d.get("prompts_held"))


class TandemPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._held = self._gauge_cls("tandem_kv_blocks_held",
                                     "KV blocks held for a transfer (prefill side)", labelnames=labelnames)
        self._bytes = self._counter_cls("tandem_kv_transfer_bytes", "KV bytes moved between engines",
                                        labelnames=[*labelnames, "direction"])
        self._secs = self._histogram_cls(
            "tandem_kv_transfer_seconds", "Time of one request's KV fetch (decode side)", labelnames=labelnames,
            buckets=[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
        self._fail = self._counter_cls("tandem_kv_transfer_failures", "KV fetches that failed",
                                       labelnames=labelnames)
        self._aborts = self._counter_cls("tandem_kv_transfer_aborts",
                                         "KV fetches stopped because their request ended first",
                                         labelnames=labelnames)
        # The node's KV store (tandem.kvstore), counted in the engine's processes, exported here.
        self._st_hits = self._counter_cls("tandem_kvstore_hits", "Chunks found in the KV store, by tier "
                                          "(a disk hit is promoted to RAM, then loaded: counted in both)",
                                          labelnames=[*labelnames, "tier"])
        self._st_misses = self._counter_cls("tandem_kvstore_misses",
                                            "Whole prompt chunks found neither in the engine's cache nor the store",
                                            labelnames=labelnames)
        self._st_tokens = self._counter_cls("tandem_kvstore_hit_tokens", "Prompt tokens loaded from the KV store",
                                            labelnames=labelnames)
        self._st_bytes = self._counter_cls("tandem_kvstore_bytes", "Bytes stored into or loaded from a tier",
                                           labelnames=[*labelnames, "tier", "direction"])
        self._st_evict = self._counter_cls("tandem_kvstore_evictions", "Chunks evicted to stay under a tier's cap",
                                           labelnames=[*labelnames, "tier"])
        self._st_dropped = self._counter_cls("tandem_kvstore_dropped_saves",
                                             "Chunks not saved: no free RAM slot, or the disk queue was full",
                                             labelnames=labelnames)
        self._st_corrupt = self._counter_cls("tandem_kvstore_corrupt_chunks",
                                             "Disk chunks that failed their check (removed, counted as misses)",
                                             labelnames=labelnames)
        self._st_saves = self._counter_cls("tandem_kvstore_saves", "Requests whose prompt chunks were saved",
                                           labelnames=labelnames)
        self._st_save_step = self._counter_cls(
            "tandem_kvstore_save_step_seconds", "Time the engine's steps spent on saves: planning them as "
            "requests end and committing them once copied (the copies run beside the step: "
            "tandem_kvstore_copy_seconds)",
            labelnames=labelnames)
        self._st_held = self._gauge_cls("tandem_kvstore_held_bytes", "Bytes held in the KV store, by tier",
                                        labelnames=[*labelnames, "tier"])
        self._st_load = self._histogram_cls(
            "tandem_kvstore_copy_seconds", "One request's copy between the KV store's RAM tier and the engine's "
            "blocks (the copier thread, beside the step; a sync load, --kvstore-load sync, on the worker's thread "
            "before the forward)", labelnames=[*labelnames, "direction"],
            buckets=[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25])
        self._prompts_held = self._counter_cls(
            "tandem_engine_prompts_held", "Times the engine's scheduler held a prompt back a step so that it "
            "starts in a step carrying no other prompt's chunk (--prompt-steps own)", labelnames=labelnames)
        for values in per_engine_labelvalues.values():
            self._held.labels(*values).set(0)
            self._prompts_held.labels(*values)
            self._aborts.labels(*values)
            self._bytes.labels(*values, "sent")
            self._bytes.labels(*values, "received")
            self._fail.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = getattr(transfer_stats_data, "data", transfer_stats_data)
        values = self.per_engine_labelvalues[engine_idx]
        if data.get("blocks_held") is not None:
            self._held.labels(*values).set(data["blocks_held"])
        if data.get("bytes_sent"):
            self._bytes.labels(*values, "sent").inc(data["bytes_sent"])
        if data.get("bytes_recv"):
            self._bytes.labels(*values, "received").inc(data["bytes_recv"])
        for s in data.get("fetch_seconds", []):
            self._secs.labels(*values).observe(s)
        if data.get("fetch_failures"):
            self._fail.labels(*values).inc(data["fetch_failures"])
        if data.get("fetch_aborts"):
            self._aborts.labels(*values).inc(data["fetch_aborts"])
        if data.get("prompts_held"):
            self._prompts_held.labels(*values).inc(data["prompts_held"])
        self._observe_store(data, values)

    def _observe_store(self, data: dict[str, Any], values: list[object]) -> None:
        if data.get("store_events"):
            for sink in STORE_EVENT_SINKS:
                try:
                    sink(data["store_events"])
                except Exception:  # never into vLLM's output handling (it would fail every request)
                    logger.exception("KV store events: a sink failed")
        counts = data.get("store") or {}
        if counts.get("hit_tokens") or counts.get("hits.disk"):
            for load_sink in STORE_LOAD_SINKS:
                try:
                    load_sink(int(counts.get("hit_tokens", 0)), int(counts.get("hits.disk", 0)))
                except Exception:
                    logger.exception("KV store loads: a sink failed")
        for name, n in counts.items():
            kind, _, rest = name.partition(".")
            if kind == "hits" and rest in ("ram", "disk"):
                self._st_hits.labels(*values, rest).inc(n)
            elif kind == "misses" and not rest:
                self._st_misses.labels(*values).inc(n)
            elif kind == "hit_tokens":
                self._st_tokens.labels(*values).inc(n)
            elif kind == "bytes":
                tier, _, direction = rest.partition(".")
                self._st_bytes.labels(*values, tier, direction).inc(n)
            elif kind == "evictions":
                self._st_evict.labels(*values, rest).inc(n)
            elif kind == "dropped_saves":
                self._st_dropped.labels(*values).inc(n)
            elif kind == "corrupt_chunks":
                self._st_corrupt.labels(*values).inc(n)
            elif kind == "saves":
                self._st_saves.labels(*values).inc(n)
            elif kind == "save_step_ns":
                self._st_save_step.labels(*values).inc(n / 1e9)
        for tier, n in (data.get("store_held") or {}).items():
            self._st_held.labels(*values, tier).set(n)
        for s in data.get("store_load_seconds", []):
            self._st_load.labels(*values, "load").observe(s)
        for s in data.get("store_save_seconds", []):
            self._st_load.labels(*values, "save").observe(s)
        if data.get("store_load_bytes"):
            self._st_bytes.labels(*values, "ram", "loaded").inc(data["store_load_bytes"])
