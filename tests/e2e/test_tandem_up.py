"""The README's main job: `tandem up` starts a real cluster, streams a demo completion, shuts down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_tandem_up_serves_a_demo_completion_and_exits_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "TANDEM_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "up", "--exit-after-demo", "--grpc-port", "0", "--http-port", "0",
         "--max-tokens", "12", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(r"finish=length tokens=12 TTFT=\d+\.\d+s decode=\d+\.\d+ tok/s", out), out
    assert "prefill on prefill-0, decode on decode-0" in out
    assert (tmp_path / "home" / "models" / "tiny-llama-seed0" / "config.json").exists()
    assert "stopped" in out
    # every child is gone: no tandem daemon or vLLM engine was left behind
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "home")], capture_output=True, text=True)
    assert left.stdout.strip() == ""
