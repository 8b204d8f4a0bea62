"""Gather and scatter whole KV blocks of every layer to and from one contiguous buffer."""

from __future__ import annotations

import numpy as np
import torch

from .layout import KVLayout


class PagedKV:
    """The engine's per-layer paged KV tensors, viewed with the block dimension first."""

    def __init__(self, layers: list[torch.Tensor], num_blocks: int, layout_fields: dict[str, object]) -> None:
        if not layers:
            raise ValueError("no KV cache layers were registered")
        shape = tuple(layers[0].shape)
        if num_blocks not in shape:
            raise ValueError(f"cannot find the block dimension ({num_blocks} blocks) in KV shape {shape}")
        block_dim = shape.index(num_blocks)
        self.views = [t.movedim(block_dim, 0) for t in layers]
        for v in self.views:
            if tuple(v.shape) != tuple(self.views[0].shape) or v.dtype != self.views[0].dtype:
                raise ValueError("KV cache layers differ in shape or dtype; not supported")
        self.num_blocks = num_blocks
        first = self.views[0]
        self.layout = KVLayout(
            num_layers=len(layers),
            dtype=str(first.dtype).removeprefix("torch."),
            block_shape=tuple(first.shape[1:]),
            **layout_fields,  # type: ignore[arg-type]
        )

    def empty(self, num_blocks: int) -> torch.Tensor:
        return torch.empty((len(self.views), num_blocks, *self.layout.block_shape), dtype=self.views[0].dtype)

    def check_ids(self, block_ids: list[int]) -> torch.Tensor:
        if any(b < 0 or b >= self.num_blocks for b in block_ids):
            raise ValueError(f"block id outside 0..{self.num_blocks - 1}")
        return torch.tensor(block_ids, dtype=torch.long)

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        idx = self.check_ids(block_ids)
        out = self.empty(len(block_ids))
        for i, v in enumerate(self.views):
            torch.index_select(v, 0, idx, out=out[i])
        return out

    def scatter(self, block_ids: list[int], src: torch.Tensor) -> None:
        idx = self.check_ids(block_ids)
        for i, v in enumerate(self.views):
            v.index_copy_(0, idx, src[i])


def as_bytes_array(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor (no copy)."""
    return t.view(torch.uint8).reshape(-1).numpy()
