"""TandemConnector's two halves around the node's KV store, without an engine: the scheduler half
(StoreScheduler, NodeStore) and the worker half (WorkerSide with its StoreCopier) over one shared
arena, on CPU tensors laid out as vLLM's CPU backend lays them out. Real engines: tests/e2e."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

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


def test_a_saved_prompt_is_loaded_into_other_blocks_bit_for_bit(tmp_path: Path) -> None:
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
