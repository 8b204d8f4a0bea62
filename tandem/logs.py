"""Logging set-up shared by every daemon: one format, the request id on request lines."""

from __future__ import annotations

import logging
import os


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


def log_prompts_enabled() -> bool:
    """Prompt and output text are logged only when TANDEM_LOG_PROMPTS=1."""
    return os.environ.get("TANDEM_LOG_PROMPTS") == "1"
