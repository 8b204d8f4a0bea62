"""`tandem bench kvstore` end to end, kept small: a real 1:1 cluster with the KV store on, two prompts
through the four phases (recompute, engine cache, RAM tier, disk tier), one report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_bench_kvstore_measures_every_tier_with_the_same_tokens(tiny_model: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "bench", "kvstore", "--model", str(tiny_model), "--prompts", "2",
         "--rounds", "1", "--prefix-tokens", "256", "--suffix-tokens", "8", "--max-model-len", "512",
         "--ram-gib", "0.05", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["token_mismatches"] == 0
    phases = [r["phase"] for r in doc["rows"]]
    assert phases == [p for p in ("recompute", "engine", "ram", "disk") for _ in range(2)]
    assert all(r["prefill_node"] == "prefill-0" for r in doc["rows"])
    assert set(doc["summary"]) == {"recompute", "engine", "ram", "disk"}
    assert list((tmp_path / "kvstore-disk" / "prefill-0").glob("*/*"))  # the disk tier was written
    report = (tmp_path / "report.md").read_text()
    assert "| ram |" in report and "| disk |" in report and "(must be 0)" in report
    assert (tmp_path / "ttft_by_tier.png").stat().st_size > 1000
    # Each prompt (and the warm-up) saved once, in the recompute phase; the cost of it measured.
    assert doc["save_cost"]["saves"] >= 2 and doc["save_cost"]["step_s_per_save"] > 0
    assert doc["save_cost"]["copy_s_per_save"] > 0 and "on the engine's step" in report
    # The eviction policies' replay, before the cluster.
    assert {r["policy"] for r in doc["eviction"]} == {"tail-first", "lru", "fifo"} and "| tail-first |" in report
