"""API keys at the coordinator's front door, each naming a tenant.

Keys come from a file (``--api-keys-file``, one ``TENANT=KEY`` a line, ``#``
comments) and/or the environment (``TANDEM_API_KEYS``, ``TENANT=KEY`` pairs
separated by commas); never from a flag, which would show in the process list
and the start-up log. Clients send ``Authorization: Bearer KEY`` (HTTP header or
gRPC metadata). With keys on, a request's tenant is its key's: a tenant the
client names itself is ignored. Presented keys are hashed and compared with every
known key's hash in constant time; the file is read again when it changes
(checked at most once a second): a file that no longer parses leaves the keys
as they were, with an error in the log; a file removed revokes its keys. No key ever goes into a log line
or a metric label.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

from tandem.errors import InvalidRequest, Unauthenticated

from .traffic import check_tenant

logger = logging.getLogger(__name__)

ENV = "TANDEM_API_KEYS"
RELOAD_CHECK_S = 1.0
MIN_KEY_CHARS = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str, where: str, sep: str = "\n") -> list[tuple[bytes, str]]:
    """(hash of the key, tenant) pairs; a ValueError names the line, never the key."""
    out: list[tuple[bytes, str]] = []
    for n, raw in enumerate(text.split(sep), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # An entry that fails is named by its number only: written the wrong way round, what
        # stands where the tenant should is a key.
        tenant, eq, key = line.partition("=")
        tenant, key = tenant.strip(), key.strip()
        if not eq or not tenant or not key:
            raise ValueError(f"{where}, entry {n}: expected TENANT=KEY")
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"{where}, entry {n}: a key needs at least {MIN_KEY_CHARS} characters")
        try:
            check_tenant(tenant)
        except InvalidRequest as exc:
            raise ValueError(f"{where}, entry {n}: {exc}") from None
        out.append((_digest(key), tenant))
    digests = [d for d, _ in out]
    if len(set(digests)) != len(digests):
        raise ValueError(f"{where}: the same key is given twice")
    return out


def check_keys(path: str) -> None:
    """Raise ValueError where the file or TANDEM_API_KEYS does not parse."""
    if path:
        parse_keys(Path(path).read_text(), path)
    parse_keys(os.environ.get(ENV, ""), ENV, sep=",")


class ApiKeys:
    """Off when neither the file nor the variable is given."""

    def __init__(self, path: str = "", env: str | None = None) -> None:
        self.path = Path(path) if path else None
        self._env = os.environ.get(ENV, "") if env is None else env
        self._from_env = parse_keys(self._env, ENV, sep=",") if self._env.strip() else []
        self._from_file: list[tuple[bytes, str]] = []
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._last_error = ""
        if self.path is not None:
            self._stamp = self._file_stamp()
            self._from_file = parse_keys(self.path.read_text(), str(self.path))  # a bad file stops the start
        # a set variable turns keys on even when it names none (then nothing gets in)
        self.enabled = self.path is not None or bool(self._env.strip())
        if self.enabled:
            self._log_counts("API keys on")

    def _file_stamp(self) -> tuple[float, int]:
        assert self.path is not None
        st = self.path.stat()
        return (st.st_mtime, st.st_size)

    def _log_counts(self, what: str) -> None:
        keys = self._from_env + self._from_file
        logger.info("%s: %d keys for %d tenants (%s)", what, len(keys), len({t for _, t in keys}),
                    ", ".join(x for x in (str(self.path) if self.path else "", ENV if self._from_env else "") if x))
        if not keys:
            logger.warning("API keys are on but none is given: every request is refused")

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            self._from_file = parse_keys(self.path.read_text(), str(self.path))
            self._stamp = stamp
            self._log_counts("API keys reloaded")
        except FileNotFoundError:  # removed: its keys are revoked
            if self._from_file or self._stamp is not None:
                logger.error("API keys file %s is gone: its keys no longer get in", self.path)
            self._from_file, self._stamp = [], None
            return
        except (OSError, ValueError) as exc:
            if str(exc) != self._last_error:  # once per problem, not once a second
                logger.error("API keys file %s changed but cannot be used (the previous keys stay): %s",
                             self.path, exc)
            self._last_error = str(exc)
            return
        self._last_error = ""

    def tenant(self, authorization: str | None, claimed: str) -> str:
        """The tenant a request runs as: ``claimed`` with keys off; else its key's, or Unauthenticated."""
        if not self.enabled:
            return claimed
        self._maybe_reload()
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthenticated("an API key is required: send 'Authorization: Bearer KEY'")
        # surrogateescape: aiohttp hands over a non-UTF-8 header byte as a surrogate
        d = hashlib.sha256(presented.strip().encode(errors="surrogateescape")).digest()
        found = ""
        for known, tenant in self._from_env + self._from_file:  # every entry, match or not: constant time
            if hmac.compare_digest(d, known):
                found = tenant
        if not found:
            raise Unauthenticated("the API key is not valid")
        return found
