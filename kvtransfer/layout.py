"""The KV cache layout two engines must share before blocks can move between them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


class KVLayoutMismatch(ValueError):
    """Two engines' KV caches are laid out differently; their blocks are not interchangeable."""


@dataclass(frozen=True)
class KVLayout:
    """Per-engine KV layout: what one block of one layer looks like in memory."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: str
    block_shape: tuple[int, ...]

    @property
    def block_numel(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KVLayout:
        d = json.loads(text)
        d["block_shape"] = tuple(d["block_shape"])
        return cls(**d)

    def check_compatible(self, other: KVLayout) -> None:
        """Raise KVLayoutMismatch naming every field that differs."""
        diffs = [
            f"{name}: {getattr(self, name)!r} here vs {getattr(other, name)!r} there"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(other, name)
        ]
        if diffs:
            raise KVLayoutMismatch("KV layouts differ: " + "; ".join(diffs))
