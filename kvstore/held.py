"""Which KV store chunks a node holds, for routing (KV events).

The store (in vLLM's engine core) records what enters and leaves each tier
(``NodeStore.take_events``); the events ride the connector's stats to the
node's daemon, where ``HeldChunks`` keeps the node's picture: each chunk key in
RAM, on disk only, or gone. Every NodeMonitor stream (one per coordinator) gets
that picture whole once, then what changed since its last message
(``since``). On the coordinator, ``ChunkIndex`` mirrors it per node and says
how many prompt tokens of a request a node holds (``cached_tokens``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from .keys import chunk_keys

RAM, DISK = "ram", "disk"
LOG_MAX = 200_000  # changed keys kept for streams that lag; one further behind gets the whole picture


class HeldChunks:
    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.namespace = b""
        self.chunk_tokens = 0
        self.ram: set[bytes] = set()
        self.disk: set[bytes] = set()
        self.on_change = on_change
        self._log: list[bytes] = []  # keys in the order they changed
        self._base = 0  # the position of _log[0] since the start
        self._lock = threading.Lock()  # events come on vLLM's output thread, streams read on the loop

    def state(self, key: bytes) -> str:
        return RAM if key in self.ram else DISK if key in self.disk else ""

    def apply(self, events: Iterable[tuple[str, str, str]]) -> None:
        """``(op, key hex, tier)`` with op ``+`` or ``-``; ``("ns", namespace hex, chunk tokens)`` names
        the store's key space."""
        with self._lock:
            changed = self._apply(events)
        if changed and self.on_change is not None:
            self.on_change()

    def _apply(self, events: Iterable[tuple[str, str, str]]) -> bool:
        changed = False
        for op, key_hex, tier in events:
            if op == "ns":
                self.namespace, self.chunk_tokens = bytes.fromhex(key_hex), int(tier)
                continue
            key = bytes.fromhex(key_hex)
            held = self.ram if tier == RAM else self.disk
            if op == "+":
                held.add(key)
            else:
                held.discard(key)
            self._log.append(key)
            changed = True
        if len(self._log) > LOG_MAX:
            drop = len(self._log) - LOG_MAX // 2
            del self._log[:drop]
            self._base += drop
        return changed

    @property
    def position(self) -> int:
        return self._base + len(self._log)

    def since(self, pos: int | None) -> tuple[bool, dict[bytes, str], int]:
        """(whole picture?, key -> its state now (``""``: gone), the position to ask from next)."""
        with self._lock:
            if pos is None or pos < self._base:
                whole = {k: RAM for k in self.ram}
                whole.update({k: DISK for k in self.disk - self.ram})
                return True, whole, self.position
            return False, {k: self.state(k) for k in self._log[pos - self._base:]}, self.position


class ChunkIndex:
    """A coordinator's picture of one node's chunks (from its NodeMonitor stream)."""

    def __init__(self) -> None:
        self.namespace = b""
        self.chunk_tokens = 0
        self.held: dict[bytes, str] = {}

    def update(self, whole: bool, ram: Iterable[bytes], disk: Iterable[bytes], gone: Iterable[bytes],
               namespace: bytes, chunk_tokens: int) -> None:
        if whole:
            self.held = {}
        if namespace:
            self.namespace, self.chunk_tokens = namespace, chunk_tokens
        for k in ram:
            self.held[k] = RAM
        for k in disk:
            self.held[k] = DISK
        for k in gone:
            self.held.pop(k, None)

    def keys_for(self, token_ids: list[int], salt: str = "") -> list[bytes]:
        if not self.namespace or not self.chunk_tokens:
            return []
        return chunk_keys(self.namespace, token_ids, self.chunk_tokens, extra=salt.encode())

    def cached_tokens(self, keys: list[bytes]) -> tuple[int, int]:
        """(prompt tokens held from the start, of them on disk only) for a prompt's chunk keys."""
        n = disk = 0
        for k in keys:
            state = self.held.get(k)
            if not state:
                break
            n += 1
            disk += state == DISK
        return n * self.chunk_tokens, disk * self.chunk_tokens
