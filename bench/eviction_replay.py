"""The KV store's RAM tier under each eviction policy: a workload's prompts replayed, in arrival
order, through the node store's own lookup and save calls (kvstore/nodestore.py over a tiny arena:
the same index and the same calls the connector makes, without an engine), at RAM caps smaller
than the workload's working set. Reported by `tandem bench kvstore` (issue 9: hit rate per policy).

What it leaves out: the engine's own prefix cache in front of the store (it takes the hottest
prefixes first, the same for every policy) and the disk tier under it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tandem.kvstore.arena import EVICTIONS, Arena
from tandem.kvstore.keys import chunk_keys, namespace
from tandem.kvstore.nodestore import NodeStore


def replay(prompts: list[list[int]], num_slots: int, chunk_tokens: int, policy: str) -> dict[str, Any]:
    """Each prompt's stored prefix looked up, then its missing whole chunks saved, as a request that
    runs to its end does. Returns hit and lookup counts in chunks and tokens."""
    ns = namespace("eviction-replay", {}, chunk_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        arena = Arena(Path(tmp) / "arena", num_slots, 8, create=True)
        store = NodeStore(arena, None, eviction=policy)
        hits = chunks = hit_tokens = tokens = 0
        for ids in prompts:
            keys = chunk_keys(ns, ids, chunk_tokens)
            n = store.count_ready(keys, 0)
            hits, chunks = hits + n, chunks + len(keys)
            hit_tokens, tokens = hit_tokens + n * chunk_tokens, tokens + len(ids)
            reserved = [k for k in keys[n:] if store.reserve_for_save(k) is not None]
            store.saved(reserved, True, run=keys)
        store.close()
        arena.close()
    return {"policy": policy, "slots": num_slots, "hit_chunks": hits, "chunks": chunks,
            "hit_rate": hits / chunks if chunks else 0.0, "hit_tokens": hit_tokens, "prompt_tokens": tokens,
            "token_hit_rate": hit_tokens / tokens if tokens else 0.0}


def working_set(prompts: list[list[int]], chunk_tokens: int) -> int:
    """Distinct whole chunks across the prompts (what a tier would need to hold them all)."""
    ns = namespace("eviction-replay", {}, chunk_tokens)
    return len({k for ids in prompts for k in chunk_keys(ns, ids, chunk_tokens)})


def policy_table(workloads: dict[str, list[list[int]]], chunk_tokens: int,
                 fractions: tuple[float, ...] = (0.1, 0.25, 0.5)) -> list[dict[str, Any]]:
    """Every policy on every workload at RAM caps of ``fractions`` of its working set."""
    rows = []
    for name, prompts in workloads.items():
        ws = working_set(prompts, chunk_tokens)
        for f in fractions:
            slots = max(1, round(ws * f))
            for policy in EVICTIONS:
                rows.append({"workload": name, "working_set_chunks": ws, "cap_fraction": f,
                             **replay(prompts, slots, chunk_tokens, policy)})
    return rows


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The Markdown table: one line per workload and cap, one column per policy (chunk hit rate)."""
    lines = ["| workload | RAM cap (chunks, of working set) | " + " | ".join(EVICTIONS) + " |",
             "|---|---|" + "---:|" * len(EVICTIONS)]
    seen: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for r in rows:
        seen.setdefault((r["workload"], r["cap_fraction"]), {})[r["policy"]] = r
    for (wl, f), by in seen.items():
        any_row = next(iter(by.values()))
        shown = {p: f"{by[p]['hit_rate']:.1%}" for p in EVICTIONS}
        best = shown[max(EVICTIONS, key=lambda p: by[p]["hit_rate"])]
        cells = [f"**{shown[p]}**" if shown[p] == best else shown[p] for p in EVICTIONS]
        lines.append(f"| {wl} | {any_row['slots']} ({f:.0%} of {any_row['working_set_chunks']}) | "
                     + " | ".join(cells) + " |")
    return lines
