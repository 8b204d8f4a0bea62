"""The coordinator's flags as `tandem coordinator` reads them (coordinator/main.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from tandem.coordinator.main import add_coordinator_args, config_from_args


def _config(tmp_path: Path, *flags: str):  # type: ignore[no-untyped-def]
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    ap = argparse.ArgumentParser()
    add_coordinator_args(ap)
    return config_from_args(ap.parse_args(["--model", str(tmp_path), "--etcd", "http://127.0.0.1:2379", *flags]))


def test_the_coordinator_pins_itself_only_to_cores_it_may_use(tmp_path: Path) -> None:
    mine = sorted(os.sched_getaffinity(0))
    assert _config(tmp_path).cores == ""  # default: unpinned
    assert _config(tmp_path, "--cores", str(mine[0])).cores == str(mine[0])
    with pytest.raises(ValueError, match=r"--cores 9999: cores \[9999\] are not available to this process"):
        _config(tmp_path, "--cores", "9999")
    with pytest.raises(ValueError, match="is not a core or a range"):
        _config(tmp_path, "--cores", "x")
