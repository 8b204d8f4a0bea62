"""The simulator's caches (tandem/sim.py): an engine's prefix cache and a node's KV store tiers,
kept as keys of whole blocks or chunks (no KV), so the simulator knows what a node would hold."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BLOCK_TOKENS = 32  # a Tandem node's engine block (its --block-size default): prefix caches hold whole ones


class PrefixCache:
    """An engine's prefix cache as the simulator keeps it: block keys (a prompt's whole blocks, each
    key chained to the blocks before it: ``block_keys``), least recently used first."""

    def __init__(self, capacity_tokens: int = 0, block_tokens: int = BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        self.capacity = max(1, capacity_tokens // block_tokens) if capacity_tokens else 0  # blocks; 0: unbounded
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def cached(self, keys: Sequence[int], prompt_tokens: int, touch: bool = False) -> int:
        """Tokens of the prompt's longest cached prefix (whole blocks; never the whole prompt: the
        engine computes its last token in any case). ``touch``: the blocks found are used now."""
        n = 0
        for key in keys[:max(0, prompt_tokens - 1) // self.block_tokens]:
            if key not in self._blocks:
                break
            n += 1
        if touch:
            self._use(keys[:n])
        return n * self.block_tokens

    def add(self, keys: Sequence[int], capacity: int | None = None) -> None:
        """The blocks are in the cache now, the latest used; the least recently used go past
        ``capacity`` blocks (default: the cache's own; 0: unbounded)."""
        self._use(keys)
        self.trim(self.capacity if capacity is None else capacity)

    def _use(self, keys: Sequence[int]) -> None:
        # A prompt's last block first, as vLLM frees a request's blocks: of one prompt's blocks
        # the tail goes first, and the prefix its head is for others stays findable longest.
        for key in reversed(keys):
            self._blocks[key] = None
            self._blocks.move_to_end(key)

    def trim(self, capacity: int) -> None:
        if capacity > 0:
            while len(self._blocks) > capacity:
                self._blocks.popitem(last=False)


class StoreTiers:
    """A node's KV store as the simulator keeps it: chunk keys in a RAM tier (least recently used
    out first, to the disk tier when there is one) and a disk tier (unbounded)."""

    def __init__(self, ram_tokens: int, disk: bool, chunk_tokens: int) -> None:
        self.chunk_tokens = chunk_tokens
        self.ram_chunks = max(1, ram_tokens // chunk_tokens)
        self.ram: OrderedDict[int, None] = OrderedDict()
        self.disk: set[int] | None = set() if disk else None

    def held(self, keys: Sequence[int], prompt_tokens: int, touch: bool = False) -> tuple[int, int]:
        """(tokens of the prompt's longest stored run of whole chunks from its start, never the
        whole prompt; of them on disk only). ``touch``: loaded now (disk chunks back into RAM)."""
        n = on_disk = 0
        for key in keys[:max(0, prompt_tokens - 1) // self.chunk_tokens]:
            if key in self.ram:
                pass
            elif self.disk is not None and key in self.disk:
                on_disk += 1
            else:
                break
            n += 1
        if touch:
            self.save(keys[:n])
        return n * self.chunk_tokens, on_disk * self.chunk_tokens

    def save(self, keys: Sequence[int]) -> None:
        """The chunks into RAM, the latest used (a prompt's last chunk out first, as the engine's)."""
        for key in reversed(keys):
            self.ram[key] = None
            self.ram.move_to_end(key)
        while len(self.ram) > self.ram_chunks:
            key, _ = self.ram.popitem(last=False)
            if self.disk is not None:
                self.disk.add(key)


def block_keys(ids: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """A prompt's whole blocks, each named by its tokens and the key of the block before it (two
    prompts share a block's key only when they share everything up to its end)."""
    keys, h = [], 0
    for k in range(0, len(ids) - block_tokens + 1, block_tokens):
        h = hash((h, tuple(ids[k:k + block_tokens])))
        keys.append(h)
    return keys
