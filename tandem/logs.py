"""Logging set-up shared by every daemon: one format, the request id on request lines."""

from __future__ import annotations

import logging
import os
import threading
import time


def setup_logging(component: str, level: str | None = None) -> None:
    level = (level or os.environ.get("TANDEM_LOG_LEVEL") or "INFO").upper()
    fmt = f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s"
    root = logging.getLogger()
    if not any(getattr(h, "_tandem", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter(fmt))
        h._tandem = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)
    for noisy in ("grpc", "aetcd", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"  # logging's %(asctime)s, as the lines above start


def log_time(stamp: str) -> float:
    """Epoch seconds of a log line's "2026-12-07 05:41:26,456" (its first two fields), local time."""
    import datetime

    return datetime.datetime.strptime(stamp, LOG_TIME_FORMAT).timestamp()


def ensure_engine_logging(label: str) -> None:
    """In a vLLM engine process (its core: the connector's scheduler half; its worker), which
    configures only vLLM's loggers: a handler for Tandem's, in the daemons' format, ``label``
    in the component's place (kv-sched, kv-worker). Without it their INFO lines were lost and
    their errors came out bare (Python's last-resort handler)."""
    lg = logging.getLogger("tandem")
    if lg.handlers or logging.getLogger().handlers:
        return
    h = logging.StreamHandler()
    h.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {label} %(name)s: %(message)s"))
    lg.addHandler(h)
    lg.setLevel((os.environ.get("TANDEM_LOG_LEVEL") or "INFO").upper())
    lg.propagate = False


def log_prompts_enabled() -> bool:
    """Prompt and output text are logged only when TANDEM_LOG_PROMPTS=1."""
    return os.environ.get("TANDEM_LOG_PROMPTS") == "1"


class RateLimitedLog:
    """At most one line per ``every_s`` seconds; the next line says how many were left out.
    For events an outsider can trigger at will (malformed requests), so they cannot flood the log."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self._logger = logger
        self._every_s = every_s
        self._last = -float("inf")
        self._skipped = 0
        self._lock = threading.Lock()

    def warning(self, msg: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self._every_s:
                self._skipped += 1
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        if skipped:
            msg += f" ({skipped} more like it in the last {self._every_s:.0f} s not logged)"
        self._logger.warning(msg, *args)
