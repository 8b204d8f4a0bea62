"""Prefix-aware routing's arithmetic: what each prefill node holds of a prompt, in its engine's own
prefix cache (the blocks its KV events report, kvstore/engine_events.py) and in its KV store (the
chunks its store's events report, kvstore/held.py), both from its NodeMonitor stream; and what a
prefill costs when that much of the prompt is cached or loaded instead of computed. Admission
(admission.py) credits each node with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from tandem.perfmodel import LOAD_MIN_SAMPLES, LOAD_S_PER_TOKEN, ModelView

from tandem.kvstore.held import ChunkIndex

from .nodeclient import NodeClient

ROUTINGS = ("prefix", "least-loaded", "random")


class Held(NamedTuple):
    """What a node holds of a prompt, from its start."""

    tokens: int = 0  # prompt tokens held: in the engine's prefix cache or in the KV store
    disk: int = 0  # of them, to load from the KV store's disk tier
    engine: int = 0  # of them, in the engine's own prefix cache (nothing to load)

    def capped(self, tokens: int) -> Held:
        """At most ``tokens`` (the last prompt token is always computed), the engine's part first."""
        held = min(self.tokens, tokens)
        engine = min(self.engine, held)
        return Held(held, min(self.disk, held - engine), engine)

    @property
    def loaded(self) -> int:
        """Tokens to copy in from the KV store (RAM or disk)."""
        return self.tokens - self.engine


def held_prefixes(nodes: list[NodeClient], prompt_ids: list[int]) -> dict[str, Held]:
    """Per node, what it holds of the prompt: the engine's cached blocks, and past them the KV store's
    chunks (loaded). Nodes of one model and KV layout share a key space: the keys are computed once
    per key space."""
    keys: dict[tuple[bytes, int], list[bytes]] = {}

    def cached(ix: ChunkIndex) -> tuple[int, int]:
        space = (ix.namespace, ix.chunk_tokens)
        if space not in keys:
            keys[space] = ix.keys_for(prompt_ids)
        return ix.cached_tokens(keys[space])

    out = {}
    for n in nodes:
        if not (n.chunks.held or n.blocks.held) or n.fresh_load() is None:  # a quiet stream: maybe stale
            continue
        store, disk = cached(n.chunks) if n.chunks.held else (0, 0)
        engine = cached(n.blocks)[0] if n.blocks.held else 0
        tokens = max(store, engine)
        out[n.node_id] = Held(tokens, min(disk, tokens - engine), engine)
    return out


def prefill_after_load(model: ModelView, tokens: int, held: int) -> float:
    """A prefill of ``tokens`` whose first ``held`` are loaded: the new tokens' linear part and
    their attention over the whole prompt (tandem/perfmodel.py's form with ``cached``)."""
    held = max(0, held)
    return model.prefill_s(tokens - held, held)


def load_s(held: int, on_disk: int, model: ModelView | None = None) -> float:
    """Loading ``held`` prompt tokens, ``on_disk`` of them from the disk tier, on the node whose
    model this is: its learned load fit once it has timed ``LOAD_MIN_SAMPLES`` loads, else the
    per-token constants (``LOAD_S_PER_TOKEN``, the fit's prior)."""
    learned = model.store_load_s if model is not None and model.load.samples >= LOAD_MIN_SAMPLES else None
    return load_cost_s(held, on_disk, learned)


def load_cost_s(held: int, on_disk: int, learned: Callable[[int, int], float] | None = None) -> float:
    """What loading ``held`` prompt tokens, ``on_disk`` of them from the disk tier, adds to a
    prefill: ``learned(held, on_disk)`` (a node's load fit) or the per-token constants. (The
    simulator's too.)"""
    if held <= 0:
        return 0.0
    if learned is not None:
        return learned(held, on_disk)
    return (held - on_disk) * LOAD_S_PER_TOKEN["ram"] + on_disk * LOAD_S_PER_TOKEN["disk"]
