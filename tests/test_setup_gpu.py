"""On a GPU host (a stand-in nvidia-smi on PATH) setup says plainly that the KV path is host-memory
only, and a node refuses a device KV cache before it loads anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_setup_on_a_gpu_host_says_the_kv_path_is_host_memory_only(tmp_path: Path) -> None:
    def path_with(answer: int) -> str:
        d = tmp_path / f"bin{answer}"
        d.mkdir(exist_ok=True)
        (d / "nvidia-smi").write_text(f"#!/bin/sh\necho 'GPU 0: Stand-in H200 (UUID: GPU-0)'\nexit {answer}\n")
        (d / "nvidia-smi").chmod(0o755)
        return f"{d}:{os.environ['PATH']}"

    def setup(path: str, **more: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": path, "TANDEM_SETUP_DRY_RUN": "1", **more}
        if "TANDEM_EXTRA" not in more:
            env.pop("TANDEM_EXTRA", None)
        return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, env=env,
                              timeout=60)

    gpu = setup(path_with(0))
    assert gpu.returncode == 0, gpu.stderr
    # the engine whose nodes can run, and why, in plain words
    assert "would install tandem[cpu,dev]" in gpu.stdout
    assert "host-memory KV caches only" in gpu.stderr and "TANDEM_EXTRA=gpu" in gpu.stderr
    asked = setup(path_with(0), TANDEM_EXTRA="gpu")
    assert "would install tandem[gpu,dev]" in asked.stdout and "refuses to start" in asked.stderr
    cpu = setup(path_with(1))  # an nvidia-smi that finds no GPU
    assert "would install tandem[cpu,dev]" in cpu.stdout and "host-memory" not in cpu.stderr
    assert "host-memory KV caches only" in (ROOT / "README.md").read_text()


def test_a_node_refuses_a_device_kv_cache_before_loading_anything() -> None:
    from tandem.node.engine import require_host_kv

    require_host_kv("cpu")
    with pytest.raises(RuntimeError, match="KV cache would be in device memory.*TANDEM_EXTRA=cpu"):
        require_host_kv("cuda")
