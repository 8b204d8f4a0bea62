"""`tandem drain NODE_ID`: ask one node (the process running now) to finish its work and leave."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from .membership import NodeRecord, drain_key, etcd_client, nodes_prefix


async def drain_node(node_id: str, etcd_url: str, cluster: str, grace_s: float, wait: bool = True) -> int:
    if not etcd_url:
        print("tandem drain: --etcd (or TANDEM_ETCD) is required", file=sys.stderr)
        return 2
    client = etcd_client(etcd_url)
    try:
        record = await _find(client, cluster, node_id)
        if record is None:
            print(f"tandem drain: no node {node_id!r} is registered in cluster {cluster!r}", file=sys.stderr)
            return 1
        await client.put(drain_key(cluster, node_id),
                         json.dumps({"engine_id": record.engine_id, "grace_s": grace_s}).encode())
        print(f"draining {record.role} node {node_id} (grace {grace_s:.0f} s): it takes no new work and exits "
              "once what it holds is done", flush=True)
        if not wait:
            return 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < grace_s + 30:
            now = await _find(client, cluster, node_id)
            if now is None or now.engine_id != record.engine_id:
                print(f"{node_id} drained and left after {time.monotonic() - t0:.1f} s", flush=True)
                return 0
            await asyncio.sleep(0.5)
        print(f"tandem drain: {node_id} is still registered after {grace_s + 30:.0f} s", file=sys.stderr)
        return 1
    finally:
        await client.close()


async def _find(client: object, cluster: str, node_id: str) -> NodeRecord | None:
    for kv in await client.get_prefix(nodes_prefix(cluster)):  # type: ignore[attr-defined]
        if kv.key.decode().rsplit("/", 1)[-1] == node_id:
            return NodeRecord.from_json(kv.value)
    return None
