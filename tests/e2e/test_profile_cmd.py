"""`tandem profile` on the real engine: progress shown, a profile with transfer timings cached
where a node with the same settings looks for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.e2e


def test_tandem_profile_measures_and_caches_where_a_node_finds_it(tiny_model: Path, tmp_path: Path) -> None:
    from tandem.node.config import NodeConfig
    from tandem.profile import cache_file, node_cores, node_settings, profile_key
    from tandem.timings import Timings

    cache = tmp_path / "profiles"
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "profile", "--model", str(tiny_model), "--cores", "0",
                           "--kv-cache-gib", "0.25", "--max-model-len", "512", "--profile-cache", str(cache),
                           "--transfer-mib", "1,4"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    from tandem.profile import DECODE_RUNS, PREFILL_LENGTHS, PREFILL_REPEATS, PREFIX_RUNS

    steps = (sum(1 for n in PREFILL_LENGTHS if n + 8 <= 512) * PREFILL_REPEATS + len(DECODE_RUNS)
             + sum(1 for h, n in PREFIX_RUNS if h + n + 8 <= 512))
    assert "profile  [" in out and f"{steps}/{steps} decode batch" in out and "transfer [" in out and "2/2 4 MiB" in out
    assert "cached in" in out and out.splitlines()[-1].startswith("transfer ") and "not measured" not in out
    files = list(cache.glob("profile-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["model"]["transfer"]["samples"] == 2 and doc["model"]["prefill"]["samples"] > 0
    t = Timings.load(files[0])
    assert any(t.transfer) and t.transfer_s(4 << 20) > 0
    # the key a prefill node with these flags computes names this very file
    cfg = NodeConfig(role="prefill", model=str(tiny_model), etcd="x", cores="0", kv_cache_gib=0.25,
                     max_model_len=512, profile_cache=str(cache)).finish()
    engine = SimpleNamespace(block_size=cfg.block_size, max_model_len=512)
    assert cache_file(cache, profile_key(str(tiny_model), node_settings(cfg, engine), node_cores(cfg))) == files[0]
