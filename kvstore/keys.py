"""Content addresses for KV chunks: a chained hash of the token ids, bound to the model and layout.

A chunk is ``chunk_tokens`` consecutive prompt tokens (a whole number of KV
blocks). Its key is SHA-256 over the previous chunk's key and its own token
ids, so a key names the whole prefix up to the chunk's end, not only the
chunk: two prompts share a key exactly when they share every token up to
there. The chain starts from a namespace that binds what makes KV bytes
mean something (the model's identity, the KV layout and dtype, the block
and chunk sizes), so two models or two layouts never share a key.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

KEY_BYTES = 32


def namespace(model: str, layout: Mapping[str, object], chunk_tokens: int) -> bytes:
    """The chain's start for one model (its identity: name and weights' fingerprint, as the
    caller knows it) and one KV layout (layers, KV heads, head size, dtype, block size)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    doc = {"model": model, "layout": {k: layout[k] for k in sorted(layout)}, "chunk_tokens": chunk_tokens,
           "v": 1}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).digest()


def next_key(prev: bytes, chunk: Sequence[int]) -> bytes:
    """The key of ``chunk`` following the key ``prev`` (the namespace for a prompt's first chunk)."""
    return hashlib.sha256(prev + struct.pack(f"<{len(chunk)}q", *chunk)).digest()


def chunk_keys(ns: bytes, token_ids: Sequence[int], chunk_tokens: int, extra: bytes = b"") -> list[bytes]:
    """One key per whole chunk of ``token_ids`` (a partial last chunk has none: it is not stored).
    ``extra``: whatever else makes this request's KV differ for the same token ids (a LoRA
    adapter, the hashes of images behind placeholder tokens, a cache salt), hashed into every
    key, so such requests share KV only with their own kind."""
    keys = []
    prev = hashlib.sha256(ns + hashlib.sha256(extra).digest()).digest() if extra else ns
    for start in range(0, len(token_ids) - chunk_tokens + 1, chunk_tokens):
        prev = next_key(prev, token_ids[start:start + chunk_tokens])
        keys.append(prev)
    return keys


def model_identity(model_dir: str | Path) -> str:
    """What names a model's weights for the namespace: its directory, its config and, per weight
    file, name, size and modification time (weights replaced in place get a new identity, without
    reading gigabytes at start)."""
    root = Path(model_dir).resolve()
    h = hashlib.sha256()
    cfg = root / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for p in sorted(root.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".pt", ".gguf") and p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"{root}#{h.hexdigest()[:16]}"
