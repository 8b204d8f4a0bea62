"""Shared fixtures: the seeded tiny model, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def profile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nodes' startup profiles, cached for this session only: the first cluster profiles (about a
    second on the tiny model), every later node start and restart finds the file."""
    path = tmp_path_factory.mktemp("profiles")
    os.environ["TANDEM_PROFILE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tandem.local.model import make_tiny_model

    cached = os.environ.get("TANDEM_TEST_MODEL")
    if cached and Path(cached, "tandem_model.json").exists():
        return Path(cached)
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)
