"""Helpers for the end-to-end tests: metrics scraping, a reference engine, waiting."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def scrape(address: str, context: object = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """All samples of a /metrics endpoint, keyed by (name, sorted labels); ``context``: an SSL
    context for an https one."""
    url = address if address.startswith("http") else f"http://{address}/metrics"
    with urllib.request.urlopen(url, timeout=10, context=context) as r:  # type: ignore[arg-type]
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for (n, lab), v in samples.items():
        d = dict(lab)
        if n == name and all(d.get(k) == val for k, val in labels.items()):
            total += v
    return total


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


REF_SCRIPT = Path(__file__).with_name("reference_engine.py")


def reference_outputs(model: Path, cases: list[dict], max_model_len: int) -> list[list[int]]:
    """Token ids from one plain vLLM engine (no connector), run in its own process."""
    proc = subprocess.run([sys.executable, str(REF_SCRIPT), str(model), str(max_model_len)],
                          input=json.dumps(cases), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"reference engine failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REF ")][-1]
    return json.loads(line[4:])


def registered_nodes(etcd_url: str, cluster: str = "default") -> set[str]:
    """Node ids registered in etcd now (read straight from etcd, not through a coordinator)."""
    import asyncio

    from tandem.membership import etcd_client

    async def read() -> set[str]:
        client = etcd_client(etcd_url)
        try:
            kvs = await client.get_prefix(f"/tandem/{cluster}/nodes/".encode())
            return {kv.key.decode().rsplit("/", 1)[-1] for kv in kvs}
        finally:
            await client.close()

    return asyncio.run(read())


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
