"""On a GPU host (a stand-in nvidia-smi on PATH) setup says plainly that the KV path is host-memory
only, and a node refuses a device KV cache before it loads anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_setup_on_a_gpu_host_says_the_kv_path_is_host_memory_only(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: Stand-in H200 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TANDEM_SETUP_DRY_RUN": "1"}
    env.pop("TANDEM_EXTRA", None)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "would install tandem[gpu,dev]" in out.stdout
    assert "host-memory KV caches only" in out.stderr and "TANDEM_EXTRA=cpu" in out.stderr
    cpu = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True,
                         env={**env, "PATH": os.environ["PATH"]}, timeout=60)
    assert "would install tandem[cpu,dev]" in cpu.stdout and "host-memory" not in cpu.stderr
    assert "host-memory KV caches only" in (ROOT / "README.md").read_text()


def test_a_node_refuses_a_device_kv_cache_before_loading_anything() -> None:
    from tandem.node.engine import require_host_kv

    require_host_kv("cpu")
    with pytest.raises(RuntimeError, match="KV cache would be in device memory.*TANDEM_EXTRA=cpu"):
        require_host_kv("cuda")
