"""`tandem drain NODE_ID`: ask one node (the process running now) to finish its work and leave;
`tandem role NODE_ID ROLE`: the same, and it comes back in the other role."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from .membership import ROLES, NodeRecord, drain_key, etcd_client, nodes_prefix, role_key


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
    """The node's record; of two (a role switch whose old record has not expired yet), the one not
    draining."""
    mine = [NodeRecord.from_json(kv.value) for kv in await client.get_prefix(nodes_prefix(cluster))  # type: ignore[attr-defined]
            if kv.key.decode().rsplit("/", 1)[-1] == node_id]
    return min(mine, key=lambda n: n.draining) if mine else None


async def switch_role(node_id: str, role: str, etcd_url: str, cluster: str, grace_s: float, wait: bool = True,
                      timeout_s: float = 600.0) -> int:
    """`tandem role NODE_ID prefill|decode`: give the node that role in etcd, then drain it with a
    restart: it finishes what it holds, leaves, and starts again (same process, same node id) in
    the new role. Waits until it has joined in that role, unless ``wait`` is off."""
    if not etcd_url:
        print("tandem role: --etcd (or TANDEM_ETCD) is required", file=sys.stderr)
        return 2
    if role not in ROLES:
        print(f"tandem role: the role must be one of {', '.join(ROLES)}, got {role!r}", file=sys.stderr)
        return 2
    client = etcd_client(etcd_url)
    try:
        record = await _find(client, cluster, node_id)
        if record is None:
            print(f"tandem role: no node {node_id!r} is registered in cluster {cluster!r} (`tandem status` lists "
                  "them; `tandem role --clear` forgets the role of one that is gone)", file=sys.stderr)
            return 1
        await client.put(role_key(cluster, node_id), json.dumps({"role": role}).encode())
        if record.role == role:
            pending = await client.get(drain_key(cluster, node_id))
            if record.draining:  # it began an earlier switch (or a drain): it ends as it began, in this role
                print(f"{node_id} is draining already; it starts again as a {role} node if a switch drains it",
                      flush=True)
            elif pending is not None and json.loads(pending.value).get("engine_id") == record.engine_id:
                await client.delete(drain_key(cluster, node_id))  # an earlier switch it had not begun: off
                print(f"{node_id} is a {role} node: the switch asked before is called off", flush=True)
            else:
                print(f"{node_id} is a {role} node already", flush=True)
            return 0
        await client.put(drain_key(cluster, node_id),
                         json.dumps({"engine_id": record.engine_id, "grace_s": grace_s, "restart": True}).encode())
        print(f"switching {node_id} from {record.role} to {role}: it takes no new work, finishes what it holds "
              f"(grace {grace_s:.0f} s), and starts again as a {role} node", flush=True)
        if not wait:
            return 0
        t0 = time.monotonic()
        said = ""
        while time.monotonic() - t0 < timeout_s:
            now = await _find(client, cluster, node_id)
            if now is not None and now.engine_id != record.engine_id and now.role == role and not now.draining:
                print(f"{node_id} joined as a {role} node after {time.monotonic() - t0:.1f} s", flush=True)
                return 0
            state = ("draining" if now is not None and now.engine_id == record.engine_id
                     else "starting its engine" if now is None else f"registered as {now.role}")
            if state != said:
                print(f"  {node_id}: {state} ({time.monotonic() - t0:.0f} s)", flush=True)
                said = state
            await asyncio.sleep(0.5)
        print(f"tandem role: {node_id} has not joined as a {role} node after {timeout_s:.0f} s; its log says why",
              file=sys.stderr)
        return 1
    finally:
        await client.close()


async def clear_role(node_id: str, etcd_url: str, cluster: str) -> int:
    """`tandem role NODE_ID --clear`: forget the role `tandem role` gave a node; it takes its command
    line's role at its next start (a running node keeps the one it has)."""
    if not etcd_url:
        print("tandem role: --etcd (or TANDEM_ETCD) is required", file=sys.stderr)
        return 2
    client = etcd_client(etcd_url)
    try:
        deleted = await client.delete(role_key(cluster, node_id))
        record = await _find(client, cluster, node_id)
    finally:
        await client.close()
    now = f"; it runs as a {record.role} node now" if record is not None else ""
    print(f"{node_id}: {'role forgotten' if deleted else 'no role was given'}: it takes its command line's role at "
          f"its next start{now}", flush=True)
    return 0
