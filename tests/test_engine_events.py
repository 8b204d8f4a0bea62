"""The engine's prefix-cache events (vLLM's KV events) as routing keys: EngineBlocks on vLLM's own event
types, and the subscriber on a real ZMQ stream encoded as vLLM's publisher encodes it."""

from __future__ import annotations

import time
from pathlib import Path

from tandem.kvstore.engine_events import EngineBlocks, EngineEventsSubscriber
from tandem.kvstore.held import ChunkIndex, HeldChunks
from tandem.kvstore.keys import chunk_keys, namespace

BS = 4


def stored(hashes, parent, tokens, **kw):  # type: ignore[no-untyped-def]
    from vllm.distributed.kv_events import BlockStored

    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=kw.pop("bs", BS),
                       lora_id=kw.pop("lora_id", None), medium="GPU", lora_name=None, **kw)


def picture(held: HeldChunks) -> ChunkIndex:
    ix = ChunkIndex()
    whole, changes, _ = held.since(None)
    ix.update(whole, [k for k, s in changes.items() if s == "ram"], [], [], held.namespace, held.chunk_tokens)
    return ix


def test_stored_blocks_are_keyed_as_the_coordinator_keys_a_prompt_and_removals_and_clears_drop_them() -> None:
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved

    ns = namespace("m", {"engine_block": BS}, BS)
    held = HeldChunks()
    eng = EngineBlocks(ns, BS, held)
    prompt = list(range(10, 24))  # 14 tokens: three whole blocks
    # vLLM's hashes are opaque here (its seed, its function): only the chain matters.
    eng.batch(0, [stored([b"h1", b"h2"], None, prompt[:8])])
    eng.batch(1, [stored([b"h3"], b"h2", prompt[8:12])])
    ix = picture(held)
    assert ix.cached_tokens(ix.keys_for(prompt)) == (12, 0)
    assert ix.keys_for(prompt) == chunk_keys(ns, prompt, BS)
    other = prompt[:4] + [99] * 8  # shares the first block only
    assert ix.cached_tokens(ix.keys_for(other)) == (4, 0)
    # A block with its parent unknown, or with extra keys (a LoRA, images, a salt), is left out.
    eng.batch(2, [stored([b"x1"], b"never-seen", [1, 2, 3, 4]), stored([b"l1"], None, [5, 6, 7, 8], lora_id=3),
                  stored([b"e1", b"e2"], None, [5, 6, 7, 8, 9, 9, 9, 9], extra_keys=[None, ("salt",)])])
    assert len(held.ram) == 4  # h1-h3 and e1 (e2 has an extra key)
    eng.batch(3, [BlockRemoved(block_hashes=[b"h2"], medium="GPU")])
    assert picture(held).cached_tokens(ix.keys_for(prompt)) == (4, 0)  # h3 needs h2: the run stops at h1
    eng.batch(4, [AllBlocksCleared()])
    assert not held.ram


def test_a_lost_message_drops_the_whole_picture() -> None:
    held = HeldChunks()
    eng = EngineBlocks(namespace("m", {}, BS), BS, held)
    eng.batch(7, [stored([b"a"], None, [1, 2, 3, 4])])
    eng.batch(8, [stored([b"b"], b"a", [5, 6, 7, 8])])
    assert len(held.ram) == 2
    eng.batch(10, [])  # 9 never came: a removal in it would leave a stale block
    assert not held.ram


def test_the_subscriber_reads_a_zmq_stream_as_vllms_publisher_sends_it(tmp_path: Path) -> None:
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    endpoint = f"ipc://{tmp_path}/events"
    got: list = []
    sub = EngineEventsSubscriber(endpoint, lambda seq, events: got.append((seq, events)))  # before the publisher
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(endpoint)
    enc = msgspec.msgpack.Encoder()
    try:
        deadline = time.monotonic() + 10
        seq = 0
        while not got:  # a SUB that just connected misses what was sent before: send until one arrives
            assert time.monotonic() < deadline
            batch = KVEventBatch(ts=time.time(), events=[stored([b"h"], None, [1, 2, 3, 4])])
            pub.send_multipart((b"", seq.to_bytes(8, "big"), enc.encode(batch)))
            seq += 1
            time.sleep(0.05)
        s, events = got[0]
        assert s < seq and type(events[0]).__name__ == "BlockStored" and events[0].token_ids == [1, 2, 3, 4]
    finally:
        sub.close()
        pub.close()


def test_partial_blocks_odd_sizes_and_runs_that_do_not_add_up_are_left_out() -> None:
    held = HeldChunks()
    eng = EngineBlocks(namespace("m", {}, BS), BS, held)
    eng.batch(0, [stored([b"p"], None, [1, 2], bs=2),  # a partial block's hash
                  stored([b"big"], None, list(range(8)), bs=8),  # another block size
                  stored([b"short"], None, [1, 2, 3]),  # tokens that do not fill its blocks
                  stored([b"w"], None, [1, 2, 3, 4], kv_cache_spec_kind="sliding_window")])
    assert not held.ram
