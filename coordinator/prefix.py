"""Prefix-aware routing's arithmetic: what each prefill node's KV store holds of a prompt (from the
chunks its NodeMonitor stream reports, kvstore/held.py), and what a prefill costs when that much of
the prompt is loaded instead of computed. Admission (admission.py) credits each node with it."""

from __future__ import annotations

from tandem.perfmodel import ModelView

from .router import NodeClient

ROUTINGS = ("prefix", "least-loaded", "random")
# A prompt token loaded from a KV store instead of computed: its copy into the engine's blocks (and from
# disk, its read, check and promotion first). Measured with `tandem bench kvstore` (2 cores, fp32,
# 16 KiB of KV per token): a RAM hit about 6 ms per 1K tokens over the engine's own cache, a disk
# hit about 37 ms more.
LOAD_S_PER_TOKEN = {"ram": 6e-6, "disk": 4.2e-5}


def held_prefixes(nodes: list[NodeClient], prompt_ids: list[int]) -> dict[str, tuple[int, int]]:
    """Per node: (prompt tokens its KV store holds from the start, of them on disk only). Nodes of
    one model and KV layout share a key space: the keys are computed once per key space."""
    keys: dict[tuple[bytes, int], list[bytes]] = {}
    out = {}
    for n in nodes:
        ix = n.chunks
        if not ix.held or n.fresh_load() is None:  # a stream gone quiet: its picture may be stale
            continue
        space = (ix.namespace, ix.chunk_tokens)
        if space not in keys:
            keys[space] = ix.keys_for(prompt_ids)
        out[n.node_id] = ix.cached_tokens(keys[space])
    return out


def prefill_after_load(model: ModelView, tokens: int, held: int) -> float:
    """A prefill of ``tokens`` whose first ``held`` are loaded, by the fit const + a·n + b·n²: the
    new tokens' linear part and their attention over the whole prompt (n² - held²), once the const."""
    if held <= 0:
        return model.prefill_s(tokens)
    return model.prefill_s(tokens) - model.prefill_s(held) + model.prefill_s(0)


def load_s(held: int, on_disk: int) -> float:
    """Loading ``held`` prompt tokens, ``on_disk`` of them from the disk tier."""
    return (held - on_disk) * LOAD_S_PER_TOKEN["ram"] + on_disk * LOAD_S_PER_TOKEN["disk"]
