"""Shared fixtures: the seeded tiny model, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tandem.local.model import make_tiny_model

    cached = os.environ.get("TANDEM_TEST_MODEL")
    if cached and Path(cached, "tandem_model.json").exists():
        return Path(cached)
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)
