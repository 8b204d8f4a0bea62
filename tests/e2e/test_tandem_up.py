"""The README's main job: `tandem up` starts a real cluster, streams a demo completion, shuts down."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
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
    assert re.search(r"coordinator ready \(\d+ s\)", out) and re.search(r"decode-0 ready \(\d+ s\)", out), out
    assert (tmp_path / "home" / "models" / "tiny-llama-seed0" / "config.json").exists()
    assert "stopped" in out
    # every child is gone: no tandem daemon or vLLM engine was left behind
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "home")], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_ctrl_c_while_tandem_up_starts_stops_everything_it_started(tmp_path: Path) -> None:
    env = {**os.environ, "TANDEM_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", "--grpc-port", "0", "--http-port", "0",
                             "--log-dir", str(tmp_path / "logs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    seen = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # the engines take ~30 s: the coordinator is ready long before
        seen.append(line)
        if "coordinator ready" in line:
            break
        assert time.monotonic() < deadline, "".join(seen)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "stopped during start-up" in out and "Traceback" not in out
    assert time.monotonic() - t0 < 60
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "home")], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a daemon outlived tandem up"  # each has --model under home
