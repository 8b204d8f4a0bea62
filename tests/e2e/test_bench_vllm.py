"""`tandem bench run` against a real vLLM OpenAI server (the colocated baseline a user would pick)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tandem.netutil import free_port

pytestmark = pytest.mark.e2e


def test_bench_run_against_plain_vllm_writes_a_well_formed_report(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "vllm.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
         "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM's server did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        out = subprocess.run([sys.executable, "-m", "tandem.cli", "bench", "run", "--target",
                              f"http://127.0.0.1:{port}", "--workload", "chat", "--rate", "2", "--duration", "2",
                              "--seed", "1", "--slo-ttft", "10", "--slo-tpot", "1", "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    s = res["summary"]
    assert s["completed"] == s["requests"] > 0 and s["failed"] == 0
    assert all(r["output_tokens"] > 1 and len(r["token_times"]) >= 1 for r in res["requests"])
    assert s["ttft_s"]["p50"] > 0 and s["tpot_s"]["p50"] > 0 and s["slo_attainment"] == 1.0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "SLO attainment | 100.0%" in report and "latency_cdf.png" in report
    assert (tmp_path / "out" / "latency_cdf.png").stat().st_size > 1000
