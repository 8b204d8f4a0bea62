"""Gather and scatter whole KV blocks, layer by layer, to and from a reusable staging buffer."""

from __future__ import annotations

import numpy as np
import torch

from .layout import KVLayout


class PagedKV:
    """The engine's per-layer paged KV tensors, viewed with the block dimension first."""

    def __init__(self, layers: list[torch.Tensor], num_blocks: int, layout_fields: dict[str, object]) -> None:
        if not layers:
            raise ValueError("no KV cache layers were registered")
        if any(t.device.type != "cpu" for t in layers):
            # Device KV (cuda_ipc / RDMA through UCX) is not built yet; refuse rather than misbehave.
            raise NotImplementedError(
                f"Tandem's KV transfer handles host-memory KV caches only; this engine's is on "
                f"{layers[0].device}")
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
        self.dtype = first.dtype
        self.layout = KVLayout(
            num_layers=len(layers),
            dtype=str(first.dtype).removeprefix("torch."),
            block_shape=tuple(first.shape[1:]),
            **layout_fields,  # type: ignore[arg-type]
        )

    @property
    def direct_ok(self) -> bool:
        """Whether a run of consecutive blocks of one layer is one contiguous piece of memory."""
        return all(v.is_contiguous() for v in self.views)

    def run_views(self, starts: list[int], lengths: list[int]) -> list[np.ndarray]:
        """Byte views straight into the cache: for each layer, each run of blocks."""
        for st, n in zip(starts, lengths):
            if st < 0 or st + n > self.num_blocks:
                raise ValueError(f"block id outside 0..{self.num_blocks - 1}")
        return [as_bytes_array(v[st:st + n]) for v in self.views for st, n in zip(starts, lengths)]

    def index(self, block_ids: list[int]) -> torch.Tensor:
        if any(b < 0 or b >= self.num_blocks for b in block_ids):
            raise ValueError(f"block id outside 0..{self.num_blocks - 1}")
        return torch.tensor(block_ids, dtype=torch.long)

    def gather_layer(self, layer: int, idx: torch.Tensor, out: torch.Tensor) -> None:
        torch.index_select(self.views[layer], 0, idx, out=out)

    def scatter_layer(self, layer: int, idx: torch.Tensor, src: torch.Tensor) -> None:
        self.views[layer].index_copy_(0, idx, src)

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """All layers' blocks in a new [layers, n, *block] tensor (tests and tools)."""
        idx = self.index(block_ids)
        out = torch.empty((len(self.views), len(block_ids), *self.layout.block_shape), dtype=self.dtype)
        for i in range(len(self.views)):
            self.gather_layer(i, idx, out[i])
        return out

    def scatter(self, block_ids: list[int], src: torch.Tensor) -> None:
        idx = self.index(block_ids)
        for i in range(len(self.views)):
            self.scatter_layer(i, idx, src[i])


def runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Split a block mapping into runs consecutive on both sides: (src start, dst start, length)."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if out and s == out[-1][0] + out[-1][2] and d == out[-1][1] + out[-1][2]:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


class Staging:
    """A staging buffer kept across transfers: fresh memory costs page faults that
    would otherwise cut copy speed several times over. One per transferring thread."""

    def __init__(self, kv: PagedKV) -> None:
        self.kv = kv
        self._buf = torch.empty(0, dtype=kv.dtype)

    def layers(self, num_blocks: int) -> list[torch.Tensor]:
        """One contiguous [num_blocks, *block] tensor per layer, views into the buffer."""
        per_layer = num_blocks * self.kv.layout.block_numel
        need = per_layer * self.kv.layout.num_layers
        if self._buf.numel() < need:
            self._buf = torch.empty(max(need, 2 * self._buf.numel()), dtype=self.kv.dtype)
            self._buf.view(torch.uint8)[:: 4096].zero_()  # touch every page now, once
        return [self._buf[i * per_layer:(i + 1) * per_layer].view(num_blocks, *self.kv.layout.block_shape)
                for i in range(self.kv.layout.num_layers)]


def as_bytes_array(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor (no copy)."""
    return t.view(torch.uint8).reshape(-1).numpy()
