"""Per-handle KV capabilities: proof that a fetch (or release) of a request's held blocks was
authorized by the prefill engine that holds them.

With a cluster secret (``--kv-secret-file`` on every node, the same file), the
prefill engine's scheduler signs each handle it issues: an HMAC-SHA256 over its
engine id, the request id inside that engine, the token count and the lease
deadline. A fetch or release names the handle's request and carries the
capability; the block server recomputes it with the same secret and sends no
byte unless it matches and the lease has not passed. The blocks it can reach are
those the engine itself holds for that request (``HoldTable``): nothing for a
handle it never issued, nothing after a release or after the lease.

What this does not do: encrypt anything. The control connection is TLS when the
nodes have certificates (secure.py); over UCX the KV bytes cross unencrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path

MIN_SECRET_BYTES = 32


class CapabilityRefused(ValueError):
    """A fetch or release whose capability is missing, forged or expired."""


def load_secret(path: str | Path) -> bytes:
    """The secret's bytes (surrounding whitespace dropped); ValueError when short or readable by
    others (group-readable passes: Kubernetes mounts a secret so for a pod's fsGroup)."""
    p = Path(path)
    data = p.read_bytes().strip()
    if len(data) < MIN_SECRET_BYTES:
        raise ValueError(f"{p}: a KV secret needs at least {MIN_SECRET_BYTES} bytes (tandem up writes one; or "
                         "`head -c 48 /dev/urandom | base64 > FILE`)")
    if p.stat().st_mode & stat.S_IRWXO:
        raise ValueError(f"{p}: a KV secret must not be readable by others (chmod 600 {p})")
    return data


def write_secret(path: str | Path) -> Path:
    """A new random secret in a file only its owner can read."""
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(48).hex() + "\n")
    os.chmod(p, 0o600)
    return p


def sign(secret: bytes, engine_id: str, req_id: str, num_tokens: int, deadline: float) -> str:
    body = json.dumps([engine_id, req_id, int(num_tokens), repr(float(deadline))]).encode()
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def check(secret: bytes | None, engine_id: str, msg: dict) -> None:
    """Raise CapabilityRefused unless ``msg`` (a fetch or release) carries a valid, unexpired
    capability for its request; with no secret every message passes (an unauthenticated plane)."""
    if secret is None:
        return
    cap, deadline, num_tokens = msg.get("cap"), msg.get("deadline"), msg.get("num_tokens")
    if not isinstance(cap, str) or not cap or not isinstance(deadline, (int, float)) or \
            not isinstance(num_tokens, int):
        raise CapabilityRefused(f"request {str(msg.get('req'))[:80]}: no KV capability (this block server "
                                "requires one: every node needs the cluster's --kv-secret-file)")
    if time.time() > float(deadline):
        raise CapabilityRefused(f"request {str(msg.get('req'))[:80]}: the KV capability expired "
                                f"{time.time() - float(deadline):.1f} s ago")
    want = sign(secret, engine_id, str(msg.get("req")), num_tokens, float(deadline))
    if not hmac.compare_digest(want, cap):
        raise CapabilityRefused(f"request {str(msg.get('req'))[:80]}: the KV capability does not match "
                                "(not issued by this engine, or for another request)")


def fields(capability: str, num_tokens: int, deadline: float) -> dict[str, object]:
    """What a fetch or release message carries for its handle."""
    return {"cap": capability, "num_tokens": int(num_tokens), "deadline": float(deadline)} if capability else {}
