"""TandemConnector's two halves around the node's KV store, without an engine: the scheduler half
(StoreScheduler, NodeStore) and the worker half (WorkerSide with its StoreCopier) over one shared
arena, on CPU tensors laid out as vLLM's CPU backend lays them out. Real engines: tests/e2e."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tandem.kvstore.arena import Arena
from tandem.kvstore.keys import namespace
from tandem.kvstore.nodestore import NodeStore
from tandem.kvtransfer.metadata import TandemConnectorMetadata
from tandem.kvtransfer.store_side import StoreConfig, StoreScheduler
from tandem.kvtransfer.worker_side import WorkerSide

BLOCK, CHUNK_BLOCKS, LAYERS, BLOCKS, HEADS, HEAD = 4, 2, 2, 40, 2, 8


def request(rid: str, ids: list[int], computed: int = 0):  # type: ignore[no-untyped-def]
    from vllm.v1.request import RequestStatus

    return SimpleNamespace(request_id=rid, prompt_token_ids=ids, mm_features=[], lora_request=None, cache_salt=None,
                           skip_reading_prefix_cache=False, num_computed_tokens=computed,
                           num_prompt_tokens=len(ids), status=RequestStatus.FINISHED_LENGTH_CAPPED,
                           kv_transfer_params=None)


def halves(tmp_path: Path) -> tuple[StoreScheduler, WorkerSide, list[torch.Tensor]]:
    block_numel = 2 * BLOCK * HEADS * HEAD
    cfg = StoreConfig(arena_path=str(tmp_path / "arena"), num_slots=8,
                      slot_bytes=LAYERS * CHUNK_BLOCKS * block_numel * 4, chunk_blocks=CHUNK_BLOCKS,
                      namespace=namespace("m", {"l": LAYERS}, BLOCK * CHUNK_BLOCKS), disk_dir="", disk_bytes=0,
                      save=True)
    worker = WorkerSide(is_producer=False, is_consumer=False, engine_id="e", address="", transport="tcp",
                        num_blocks=BLOCKS, layout_fields={"block_size": BLOCK, "num_kv_heads": HEADS,
                                                          "head_size": HEAD}, store=cfg)
    layers = [torch.randn(2, BLOCKS, BLOCK, HEADS, HEAD) for _ in range(LAYERS)]  # vLLM CPU: [2, blocks, ...]
    worker.register_kv_caches({f"l{i}": t for i, t in enumerate(layers)})
    store = NodeStore(Arena(cfg.arena_path, cfg.num_slots, cfg.slot_bytes, create=False), None)
    return StoreScheduler(store, cfg.namespace, BLOCK, CHUNK_BLOCKS, save=True), worker, layers


def step(worker: WorkerSide, meta: TandemConnectorMetadata, until) -> tuple[set, set, set]:  # type: ignore[no-untyped-def]
    worker.start_step(meta)
    seen: tuple[set, set, set] = (set(), set(), set())
    deadline = time.monotonic() + 10
    while not until(seen):
        assert time.monotonic() < deadline, seen
        for acc, new in zip(seen, worker.transfer_results()):
            acc |= new
        time.sleep(0.01)
    return seen


def test_a_saved_prompt_is_loaded_into_other_blocks_bit_for_bit(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tandem.kvtransfer.store_side")
    sched, worker, layers = halves(tmp_path)
    ids = list(range(100, 123))  # 23 tokens: two whole chunks of 8, and a rest
    done = request("a", ids, computed=23)
    save = sched.on_finished(done, block_ids=[10, 11, 12, 13, 14, 15], ended_early=False)
    assert save is not None and [n for _, _, n in save.pieces] == [2, 2] and sched.saving
    sent, _, _ = step(worker, TandemConnectorMetadata(store_saves=[save]), lambda s: "a" in s[0])
    meta = worker.worker_meta()
    assert meta is not None and meta.saves == {"a": True}
    sched.saves_done(meta.saves)
    assert not sched.saving

    # The same prompt again, its first block in the engine's own cache: the rest of the chunks load.
    again = request("b", ids)
    assert sched.lookup(again, num_computed_tokens=4) == (12, True)
    job, failed = sched.after_alloc(again, [30, 31, 32, 33, 34, 35], 12)
    assert not failed and job is not None and job.block_ids == [31, 32, 33]
    # The node's log says where the request's prompt came from (no prompt text).
    assert "request b: 12 prompt tokens from the KV store's RAM tier (beside the step), 4 from the engine's cache" \
        in caplog.text
    _, recvd, bad = step(worker, TandemConnectorMetadata(store_loads=[job]), lambda s: "b" in s[1])
    assert not bad
    for t in layers:
        assert torch.equal(t[:, [31, 32, 33]], t[:, [11, 12, 13]])
    sched.loads_done(recvd)
    assert sched.store.index.drop_unpinned() == 0  # every slot unpinned once the load ended


def test_a_load_that_fails_is_finished_and_failed_and_the_store_is_off_for_that_request(tmp_path: Path) -> None:
    sched, worker, _ = halves(tmp_path)
    ids = list(range(8))
    save = sched.on_finished(request("a", ids, computed=8), block_ids=[1, 2], ended_early=False)
    assert save is not None
    step(worker, TandemConnectorMetadata(store_saves=[save]), lambda s: "a" in s[0])
    sched.saves_done(worker.worker_meta().saves)  # type: ignore[union-attr]
    again = request("b", ids)
    assert sched.lookup(again, 0) == (8, True)
    job, _ = sched.after_alloc(again, [1, BLOCKS + 5], 8)  # a block outside the cache: the copy raises
    # vLLM counts a receive as ended only when it is finished too; failed alone would hang the request.
    _, recvd, bad = step(worker, TandemConnectorMetadata(store_loads=[job]), lambda s: "b" in s[1])
    assert "b" in bad
    sched.loads_done(recvd, failed=bad)
    assert sched.lookup(again, 0) == (0, False)  # recomputed without the store
    assert sched.store.index.drop_unpinned() == 0  # its slot was unpinned all the same


class _FakeFetcher:
    """Stands in for the decode node's BlockFetcher (the real one, over UCX and TCP: test_kvtransfer
    and tests/e2e); it ends a load when told to."""

    def __init__(self) -> None:
        self.jobs: list = []
        self.ended: set[str] = set()

    def submit(self, job) -> None:  # type: ignore[no-untyped-def]
        self.jobs.append(job)

    def take_results(self) -> tuple[set[str], set[str]]:
        done, self.ended = self.ended, set()
        return done, set()


def test_a_decode_node_fills_its_stored_chunks_itself_and_pulls_only_the_rest(tmp_path: Path) -> None:
    from tandem.kvtransfer.handle import CONSUME, TransferHandle
    from tandem.kvtransfer.scheduler_side import SchedulerSide

    store, worker, layers = halves(tmp_path)
    ids = list(range(100, 123))  # 23 tokens: two whole chunks of 8 and a rest, in six blocks
    save = store.on_finished(request("a", ids, computed=23), block_ids=[10, 11, 12, 13, 14, 15], ended_early=False)
    step(worker, TandemConnectorMetadata(store_saves=[save]), lambda s: "a" in s[0])
    store.saves_done(worker.worker_meta().saves)  # type: ignore[union-attr]

    sched = SchedulerSide("e", BLOCK, "", 30.0, store=store)
    handle = TransferHandle("p", "127.0.0.1:1", "remote-c", [0, 1, 2, 3, 4, 5], 23, time.time() + 30)
    consumer = request("c", ids)
    consumer.kv_transfer_params = handle.to_params(CONSUME)
    # The engine's own cache has the first block: the rest is external, as it was without a store.
    assert sched.get_num_new_matched_tokens(consumer, 4) == (19, True)
    sched.update_state_after_alloc(consumer, SimpleNamespace(get_block_ids=lambda: [[30, 31, 32, 33, 34, 35]]), 19)
    meta = sched.build_connector_meta()
    (load,), (fetch,) = meta.store_loads, meta.loads
    assert load.block_ids == [31, 32, 33]  # blocks 1..3 (the rest of both stored chunks) from the store
    assert fetch.remote_block_ids == [4, 5] and fetch.local_block_ids == [34, 35]  # the rest from the prefill node

    worker.fetcher = fake = _FakeFetcher()  # type: ignore[assignment]
    worker.start_step(meta)
    assert fake.jobs == [fetch]
    deadline = time.monotonic() + 10
    while not torch.equal(layers[0][:, 33], layers[0][:, 13]):  # the store's part landed...
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)
    assert "c" not in worker.transfer_results()[1]  # ...but the load ends only with the transfer's part
    fake.ended.add("c")
    _, recvd, failed = worker.transfer_results()
    assert recvd == {"c"} and not failed
    for t in layers:
        assert torch.equal(t[:, [31, 32, 33]], t[:, [11, 12, 13]])


def test_a_decode_node_whose_store_has_the_whole_prompt_releases_the_transfer(tmp_path: Path) -> None:
    from tandem.kvtransfer.handle import CONSUME, TransferHandle
    from tandem.kvtransfer.scheduler_side import SchedulerSide

    store, worker, _ = halves(tmp_path)
    ids = list(range(16))  # two whole chunks, nothing else
    save = store.on_finished(request("a", ids, computed=16), block_ids=[10, 11, 12, 13], ended_early=False)
    step(worker, TandemConnectorMetadata(store_saves=[save]), lambda s: "a" in s[0])
    store.saves_done(worker.worker_meta().saves)  # type: ignore[union-attr]
    sched = SchedulerSide("e", BLOCK, "", 30.0, store=store)
    handle = TransferHandle("p", "127.0.0.1:1", "remote-c", [0, 1, 2, 3], 16, time.time() + 30)
    consumer = request("c", ids)
    consumer.kv_transfer_params = handle.to_params(CONSUME)
    assert sched.get_num_new_matched_tokens(consumer, 0) == (16, True)
    sched.update_state_after_alloc(consumer, SimpleNamespace(get_block_ids=lambda: [[20, 21, 22, 23]]), 16)
    meta = sched.build_connector_meta()
    assert not meta.loads and meta.releases == [handle] and meta.store_loads[0].block_ids == [20, 21, 22, 23]


def _saved(sched: StoreScheduler, worker: WorkerSide, ids: list[int], blocks: list[int]) -> None:
    save = sched.on_finished(request("a", ids, computed=len(ids)), block_ids=blocks, ended_early=False)
    assert save is not None
    step(worker, TandemConnectorMetadata(store_saves=[save]), lambda s: "a" in s[0])
    sched.saves_done(worker.worker_meta().saves)  # type: ignore[union-attr]


def test_a_sync_load_is_copied_before_the_step_and_reported_in_the_worker_metadata(tmp_path: Path) -> None:
    sched, worker, layers = halves(tmp_path)
    sched.sync_loads = True
    ids = list(range(100, 123))
    _saved(sched, worker, ids, [10, 11, 12, 13, 14, 15])
    again = request("b", ids)
    # Not async: vLLM counts the 12 tokens computed now and schedules the rest in this same step.
    assert sched.lookup(again, num_computed_tokens=4) == (12, False)
    job, failed = sched.after_alloc(again, [30, 31, 32, 33, 34, 35], 12)
    assert not failed and job is not None and job.sync and job.block_ids == [31, 32, 33]
    worker.start_step(TandemConnectorMetadata(store_loads=[job]))
    for t in layers:  # copied by the time the step's forward would run
        assert torch.equal(t[:, [31, 32, 33]], t[:, [11, 12, 13]])
    assert worker.transfer_results()[1] == set()  # not a receive vLLM waits for
    meta = worker.worker_meta()
    assert meta is not None and meta.loads == {"b": True} and worker.take_load_errors() == set()
    sched.loads_done(set(meta.loads))
    assert sched.store.index.drop_unpinned() == 0  # unpinned once the worker said so


def test_a_sync_load_that_fails_reports_its_blocks_and_turns_the_store_off_for_that_request(tmp_path: Path) -> None:
    sched, worker, _ = halves(tmp_path)
    sched.sync_loads = True
    ids = list(range(9))
    _saved(sched, worker, ids, [1, 2, 3])
    again = request("b", ids)
    assert sched.lookup(again, 0) == (8, False)
    job, _ = sched.after_alloc(again, [1, BLOCKS + 5, 7], 8)  # a block outside the cache: the copy raises
    worker.start_step(TandemConnectorMetadata(store_loads=[job]))
    assert worker.take_load_errors() == {1, BLOCKS + 5}  # vLLM's load-failure policy takes it from there
    meta = worker.worker_meta()
    assert meta is not None and meta.loads == {"b": False}
    sched.loads_done(set(meta.loads), failed={r for r, ok in meta.loads.items() if not ok})
    assert sched.lookup(again, 0) == (0, False)
    assert sched.store.index.drop_unpinned() == 0


def test_a_sync_hit_of_a_whole_prompt_leaves_its_last_block_to_compute(tmp_path: Path) -> None:
    sched, worker, _ = halves(tmp_path)
    ids = list(range(16))  # two whole chunks of 8: the whole prompt is stored
    _saved(sched, worker, ids, [1, 2, 3, 4])
    assert sched.lookup(request("b", ids), 0) == (16, True)  # async: vLLM recomputes the last token itself
    sched.sync_loads = True
    c = request("c", ids)
    assert sched.lookup(c, 0) == (15, False)  # all but its last token, which the step computes
    job, _ = sched.after_alloc(c, [20, 21, 22, 23], 15)
    assert job is not None and job.block_ids == [20, 21, 22, 23]  # the last block loaded whole


def test_tandems_lines_in_an_engine_process_come_out_in_the_daemons_format() -> None:
    # A fresh process like vLLM's engine core: nothing configures the tandem loggers there.
    code = ("import logging; from tandem.logs import ensure_engine_logging; ensure_engine_logging('kv-sched'); "
            "logging.getLogger('tandem.kvtransfer.store_side').info('request r: hello')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "INFO kv-sched tandem.kvtransfer.store_side: request r: hello" in out.stderr


def test_a_lookup_waits_in_its_step_for_chunks_coming_up_from_disk(tmp_path: Path) -> None:
    from tandem.kvstore.tiers import DiskTier

    sched, worker, layers = halves(tmp_path)
    disk_store = NodeStore(sched.store.arena, DiskTier(str(tmp_path / "disk"), 1 << 30))
    ids = list(range(100, 123))  # two whole chunks of 8, and a rest
    results = {}
    for inline in (0.0, 5.0):
        sched = StoreScheduler(disk_store, sched.ns, BLOCK, CHUNK_BLOCKS, save=True, promote_inline_s=inline)
        save = sched.on_finished(request("a", ids, computed=23), block_ids=[10, 11, 12, 13, 14, 15],
                                 ended_early=False)
        if save is not None:  # (the second round finds them stored already)
            step(worker, TandemConnectorMetadata(store_saves=[save]), lambda s: "a" in s[0])
            sched.saves_done(worker.worker_meta().saves)
        disk_store.flush()  # written behind to disk (and the last round's promotion ended)
        assert disk_store.drop_ram()  # out of RAM: on disk only
        # The chunks start up from disk; without waiting the request is asked again a step later, with
        # the wait it loads in this step.
        results[inline] = sched.lookup(request(f"b{inline}", ids), num_computed_tokens=0)
    assert results[0.0] == (None, False)
    assert results[5.0] == (16, True)
