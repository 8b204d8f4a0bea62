"""`tandem bench compare` end to end, kept small: real Tandem and vLLM's own NIXL P/D (two vLLM
servers behind its proxy), one rate. Colocated vLLM starts through the same server code
(bench/systems.py `_vllm_server`, `Processes`) and test_bench_vllm.py runs `tandem bench run` against a
plain vLLM server; vLLM's NIXL as shipped differs from the fixed one only in its command line
(tests/test_bench_goodput.py checks it). Each costs an engine start on two busy cores, so they run in
the benchmarks, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_compare_writes_one_report_for_every_system(tiny_model: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "bench", "compare", "--model", str(tiny_model), "--rates", "2",
         "--duration", "3", "--reps", "1", "--max-model-len", "1024", "--slo-ttft", "2", "--slo-tpot", "0.5",
         "--systems", "tandem,vllm-nixl-fixed",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    names = [s["name"] for s in doc["systems"]]
    assert names == ["tandem-1:1", "vllm-nixl-fixed"]
    for s in doc["systems"]:
        (row,) = s["sweep"]
        rep = row["reps"][0]
        assert rep["completed"] == rep["requests"] > 0 and rep["failed"] == 0
        assert s["commands"] and s["version"]
        assert s["goodput_rps"] in (0.0, 2.0)
    # Tandem's responses said what its admission predicted (checked against what the client saw).
    tandem = doc["systems"][0]["sweep"][0]["reps"][0]
    assert tandem["rejected"] == 0 and tandem["prediction_error"]["ttft"]["n"] == tandem["completed"]
    # ... per node: the nodes its headers named.
    by_node = tandem["prediction_error_by_node"]
    assert sum(e["n"] for e in by_node["ttft"].values()) == tandem["completed"] and by_node["tpot"]
    for s in doc["systems"][1:]:
        # vLLM's P/D really disaggregated: the decode server took the prompts' KV over NIXL.
        by_source = s["facts"]["decode_prompt_tokens_by_source"]
        assert by_source["external_kv_transfer"] > 0 and by_source["local_compute"] == 0, by_source
    assert any("sitecustomize" in n for n in doc["systems"][1]["notes"])
    assert any("PYTHONPATH=" in " ".join(c) for c in doc["systems"][1]["commands"])
    assert doc["failed"] == []
    report = (tmp_path / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    assert "TTFT error p50 / p90" in report and "Prediction error per node" in report
    assert "given on the command line" in report and "load generator" in report
    for png in ("attainment_vs_rate.png", "latency_cdfs.png", "goodput.png"):
        assert (tmp_path / png).stat().st_size > 1000
