"""End to end on a real 1 prefill + 2 decode cluster with the TCP fallback transport:
equality over TCP, spreading over the decode pool, and a decode node killed mid-stream."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tandem.cluster import ClusterSpec, LocalCluster
from tandem.membership import etcd_client
from tandem.proto import tandem_pb2 as pb

from .helpers import reference_outputs, wait_until

pytestmark = pytest.mark.e2e

MAX_MODEL_LEN = 512
TTL_S = 3


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    spec = ClusterSpec(model=str(tiny_model), num_prefill=1, num_decode=2, transport="tcp",
                       max_model_len=MAX_MODEL_LEN, ttl_s=TTL_S, log_dir=str(tmp_path_factory.mktemp("logs-tcp")))
    with LocalCluster(spec) as c:
        yield c


def request(ids: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def run(stub, ids: list[int], max_tokens: int) -> tuple[list[int], pb.Finish]:
    msgs = list(stub.Generate(request(ids, max_tokens), timeout=120))
    return [t for m in msgs for t in m.token_ids], msgs[-1].finish


def test_greedy_equality_over_tcp(cluster: LocalCluster, stub, tiny_model: Path) -> None:
    prompts = [[(11 + 29 * i) % 590 + 5 for i in range(n)] for n in (20, 150)]
    got = [run(stub, p, 16)[0] for p in prompts]
    ref = reference_outputs(tiny_model, [{"prompt_token_ids": p, "max_tokens": 16, "ignore_eos": True}
                                         for p in prompts], MAX_MODEL_LEN)
    assert got == ref
    logs = "".join((cluster.log_dir / f"decode-{i}.log").read_text() for i in (0, 1))
    assert "over tcp" in logs and "over ucx" not in logs


def test_requests_spread_over_the_decode_pool(cluster: LocalCluster, stub) -> None:
    prompts = [[(3 + 17 * i + k) % 590 + 5 for i in range(40)] for k in range(6)]
    with ThreadPoolExecutor(6) as pool:
        finishes = list(pool.map(lambda p: run(stub, p, 48)[1], prompts))
    assert all(f.reason == "length" for f in finishes)
    assert {f.timings.decode_node for f in finishes} == {"decode-0", "decode-1"}
    assert {f.timings.prefill_node for f in finishes} == {"prefill-0"}


def test_killed_decode_node_ends_its_request_and_leaves_the_pool(cluster: LocalCluster, stub) -> None:
    # Both decode nodes are frozen (SIGSTOP) while the request starts, so it cannot finish before the
    # kill lands: the first token comes from the prefill node, the picked decode node never answers.
    # They stay frozen for well under the lease TTL.
    decodes = [cluster.node("decode-0"), cluster.node("decode-1")]
    for d in decodes:
        d.signal(signal.SIGSTOP)
    try:
        call = stub.Generate(request([(5 + 13 * i) % 590 + 5 for i in range(10)], 480), timeout=120)
        first = next(call)
        assert first.token_ids

        def busy() -> list[str]:
            status = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
            return [n.node_id for n in status.nodes if n.role == "decode" and n.outstanding == 1]

        wait_until(lambda: len(busy()) == 1, 1.5, "the coordinator to pick a decode node", every_s=0.02)
        victim = cluster.node(busy()[0])
        victim.signal(signal.SIGKILL)
    finally:
        for d in decodes:
            if d.alive():
                d.signal(signal.SIGCONT)
    survivor = "decode-1" if victim.name == "decode-0" else "decode-0"

    outcome: dict[str, object] = {}

    def drain() -> None:
        try:
            for _ in call:
                pass
            outcome["ended"] = "ok"
        except grpc.RpcError as exc:
            outcome["code"], outcome["details"] = exc.code(), exc.details()

    t = threading.Thread(target=drain)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the in-flight request hung after its decode node died"
    assert outcome.get("code") == grpc.StatusCode.UNAVAILABLE, outcome
    assert victim.name in str(outcome["details"])

    async def registered() -> set[str]:
        client = etcd_client(cluster.etcd_url)
        try:
            return {kv.key.decode().rsplit("/", 1)[-1] for kv in await client.get_prefix(b"/tandem/default/nodes/")}
        finally:
            await client.close()

    killed_at = time.monotonic()
    wait_until(lambda: victim.name not in asyncio.run(registered()), TTL_S + 5, "the dead node's etcd key to expire")
    assert time.monotonic() - killed_at <= TTL_S + 5
    wait_until(lambda: victim.name not in {n.node_id for n in stub.ClusterStatus(pb.ClusterStatusRequest()).nodes},
               5, "the coordinator to drop the dead node")
    for _ in range(3):
        _, fin = run(stub, [(9 + 7 * i) % 590 + 5 for i in range(30)], 8)
        assert fin.reason == "length" and fin.timings.decode_node == survivor
