"""The engine's own prefix cache as KV events, for routing.

vLLM publishes what its prefix cache gains and loses (``BlockStored``,
``BlockRemoved``, ``AllBlocksCleared``) over ZMQ when the engine runs with a
``kv_events_config``; the node's daemon subscribes (``EngineEventsSubscriber``)
and ``EngineBlocks`` keys each stored block by Tandem's own chained hash of its
token ids (kvstore/keys.py, one chunk = one KV block) in a key space of its
own. The coordinator computes the same keys from a prompt's token ids, so it
can tell how much of a prompt an engine's cache holds without knowing vLLM's
hash function or seed. The picture goes to the coordinators beside the KV
store's (a ``HeldChunks`` of its own, every block "in RAM").

A block with extra keys (LoRA, images, a cache salt) is left out: its KV
depends on more than the token ids. A gap in the publisher's sequence numbers
(a lost message) drops the whole picture: a block left in it after its
removal was lost would draw requests to a node that no longer has it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .held import RAM, HeldChunks
from .keys import next_key

logger = logging.getLogger(__name__)

# KV cache kinds whose cached blocks do not stand for a whole prefix (a window drops early blocks;
# state-space and cross-attention caches are not per token of the prompt).
NOT_A_PREFIX = {"sliding_window", "sliding_window_mla", "chunked_local_attention", "mamba", "cross_attention",
                "encoder_only_attention"}


class EngineBlocks:
    """vLLM's block hashes -> Tandem's keys, and the picture they make (``held``)."""

    def __init__(self, namespace: bytes, block_tokens: int, held: HeldChunks) -> None:
        self.namespace = namespace
        self.block_tokens = block_tokens
        self.held = held
        held.apply([("ns", namespace.hex(), str(block_tokens))])
        self._ours: dict[Any, bytes] = {}  # vLLM's hash -> our key
        self._last_seq: int | None = None
        self._odd_sizes: set[int] = set()

    def batch(self, seq: int, events: list[Any]) -> None:
        """One published batch (``seq``: the publisher's sequence number)."""
        out: list[tuple[str, str, str]] = []
        if self._last_seq is not None and seq != self._last_seq + 1:
            logger.warning("engine KV events: messages %d..%d lost; dropping the engine cache's picture",
                           self._last_seq + 1, seq - 1)
            out += self._clear()
        self._last_seq = seq
        for ev in events:
            kind = type(ev).__name__
            if kind == "BlockStored":
                out += self._stored(ev)
            elif kind == "BlockRemoved":
                if getattr(ev, "group_idx", None) not in (None, 0):
                    continue
                for h in ev.block_hashes:
                    key = self._ours.pop(h, None)
                    if key is not None:
                        out.append(("-", key.hex(), RAM))
            elif kind == "AllBlocksCleared":
                out += self._clear()
        if out:
            self.held.apply(out)

    def _clear(self) -> list[tuple[str, str, str]]:
        gone = [("-", k.hex(), RAM) for k in self._ours.values()]
        self._ours.clear()
        return gone

    def _stored(self, ev: Any) -> list[tuple[str, str, str]]:
        if getattr(ev, "group_idx", None) not in (None, 0) or ev.lora_id is not None:
            return []
        if getattr(ev, "kv_cache_spec_kind", None) in NOT_A_PREFIX:
            return []
        if ev.block_size != self.block_tokens:
            if ev.block_size > self.block_tokens and ev.block_size not in self._odd_sizes:
                self._odd_sizes.add(ev.block_size)
                logger.warning("engine KV events: blocks of %d tokens, expected %d; left out of routing",
                               ev.block_size, self.block_tokens)
            return []  # (smaller: a partial block's hash, not a cached block)
        if len(ev.token_ids) != len(ev.block_hashes) * self.block_tokens:
            return []  # not one run of whole blocks: nothing to key safely
        if ev.parent_block_hash is None:
            prev = self.namespace
        elif ev.parent_block_hash in self._ours:
            prev = self._ours[ev.parent_block_hash]
        else:
            return []  # its parent was left out (or is unknown): so is it
        extra = getattr(ev, "extra_keys", None) or []
        bs, out = self.block_tokens, []
        for i, h in enumerate(ev.block_hashes):
            if i < len(extra) and extra[i] is not None:
                break  # this block and every one after it depend on more than their tokens
            prev = next_key(prev, ev.token_ids[i * bs:(i + 1) * bs])
            self._ours[h] = prev
            out.append(("+", prev.hex(), RAM))
        return out


class EngineEventsSubscriber:
    """A thread that reads vLLM's KV event stream from ``endpoint`` and hands each batch to
    ``on_batch(seq, events)``. Connects before the engine binds (ZMQ reconnects), so nothing the
    engine publishes from its start is missed."""

    def __init__(self, endpoint: str, on_batch: Callable[[int, list[Any]], None]) -> None:
        import zmq

        self.endpoint = endpoint
        self.on_batch = on_batch
        self._ctx = zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-kv-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                if not sock.poll(200):
                    continue
                parts = sock.recv_multipart()
                if len(parts) != 3:
                    continue
                try:
                    batch = decoder.decode(parts[2])
                    self.on_batch(int.from_bytes(parts[1], "big"), list(batch.events))
                except Exception:  # one bad message must not end the stream
                    logger.exception("engine KV events: a message could not be read")
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
