"""End to end on a real 1 prefill + 2 decode cluster with the TCP fallback transport:
equality over TCP, spreading over the decode pool, all of it over mutual TLS, and what happens when a decode node
freezes, is handed a lying KV handle, is killed, or loses its engine (in that order: the
last two tests leave the pool smaller)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tandem.local.cluster import ClusterSpec, Daemon, LocalCluster
from tandem.local.procs import process_tree
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc

from .helpers import metric, process_name, registered_nodes, scrape, wait_until

pytestmark = pytest.mark.e2e

MAX_MODEL_LEN = 512
TTL_S = 3
VLLM_FLAG_DIR = "/tmp/tandem-vllm-flag-seen"  # a vLLM engine flag on the nodes' command line (never written to)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    # mutual TLS on every gRPC port and the HTTP API: every test here goes through it
    spec = ClusterSpec(model=str(tiny_model), num_prefill=1, num_decode=2, transport="tcp",
                       max_model_len=MAX_MODEL_LEN, ttl_s=TTL_S, log_dir=str(tmp_path_factory.mktemp("logs-tcp")),
                       tls=True, extra_node_args=["--download-dir", VLLM_FLAG_DIR])
    with LocalCluster(spec) as c:
        yield c


# Greedy prompts whose plain-engine output the tests compare with; computed once for the module.
EQUALITY = [[(11 + 29 * i) % 590 + 5 for i in range(n)] for n in (20, 150)]
FROZEN = [(3 + 11 * i) % 590 + 5 for i in range(12)]
KILLED = [(5 + 13 * i) % 590 + 5 for i in range(10)]
SEEDED = [(7 + 19 * i) % 590 + 5 for i in range(25)]
SHORT = [(9 + 23 * i) % 590 + 5 for i in range(24)]
SEED, TEMPERATURE, SEEDED_TOKENS = 4242, 0.9, 40
LONG = 480


CASES = [(p, 16) for p in EQUALITY] + [(FROZEN, LONG), (KILLED, LONG), (SHORT, 16)]
_SEEDED = {"temperature": TEMPERATURE, "seed": SEED, "ignore_eos": True}
# A plain engine's outputs for these, computed once a session with the other modules' (conftest.py).
# A seeded request whose first decode node never answers runs two legs: the prefill's token t0;
# then, on another decode node, a prefill of prompt + [t0] (its token t1) and a decode of the rest.
REFERENCE_CASES = [{"prompt_token_ids": p, "max_tokens": n, "ignore_eos": True} for p, n in CASES] + [
    {"prompt_token_ids": SEEDED, "max_tokens": 1, **_SEEDED},
    {"prompt_token_ids": SEEDED, "max_tokens": 1, "extend_with": [len(CASES)], **_SEEDED},
    {"prompt_token_ids": SEEDED, "max_tokens": SEEDED_TOKENS - 2, "extend_with": [len(CASES), len(CASES) + 1],
     **_SEEDED}]


@pytest.fixture(scope="module")
def references(plain_outputs) -> dict[tuple[int, ...], list[int]]:
    outs = plain_outputs[__name__]
    refs = {tuple(p): out for (p, _), out in zip(CASES, outs)}
    refs[tuple(SEEDED)] = [t for out in outs[len(CASES):] for t in out]
    return refs


def request(ids: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def run(stub, ids: list[int], max_tokens: int) -> tuple[list[int], pb.Finish]:
    msgs = list(stub.Generate(request(ids, max_tokens), timeout=120))
    return [t for m in msgs for t in m.token_ids], msgs[-1].finish


def test_greedy_equality_over_tcp(cluster: LocalCluster, stub, references) -> None:
    got = [run(stub, p, 16)[0] for p in EQUALITY]
    assert got == [references[tuple(p)] for p in EQUALITY]
    logs = "".join((cluster.log_dir / f"decode-{i}.log").read_text() for i in (0, 1))
    assert "over tcp" in logs and "over ucx" not in logs


def test_requests_spread_over_the_decode_pool(cluster: LocalCluster, stub) -> None:
    prompts = [[(3 + 17 * i + k) % 590 + 5 for i in range(40)] for k in range(6)]
    with ThreadPoolExecutor(6) as pool:
        finishes = list(pool.map(lambda p: run(stub, p, 48)[1], prompts))
    assert all(f.reason == "length" for f in finishes)
    assert {f.timings.decode_node for f in finishes} == {"decode-0", "decode-1"}
    # Disaggregated, or (conditional disaggregation) prefilled on its own decode node.
    assert all(f.timings.prefill_node == ("prefill-0" if not f.timings.local_prefill else f.timings.decode_node)
               for f in finishes)


def test_a_short_prompt_prefills_on_a_decode_node_while_the_prefill_queue_is_long(cluster: LocalCluster, stub,
                                                                                 references) -> None:
    # The prefill node's engine is frozen with three 400-token prompts in it; the node itself still
    # answers and reports that queue, so the coordinator predicts seconds of wait there, and a
    # short prompt starts sooner on an idle decode node.
    prefill = cluster.node("prefill-0")
    before = {d.name: scrape(d.info["metrics"]) for d in cluster.nodes if d.role == "decode"}
    longs = [[(k * 17 + 3 * i) % 590 + 5 for i in range(400)] for k in range(3)]

    def prefill_queue() -> int:
        nodes = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10).nodes
        return next(n.prefill_queue for n in nodes if n.node_id == "prefill-0")

    frozen = engine_pids(prefill)
    with cluster.node_channel(prefill.info["grpc"]) as ch, ThreadPoolExecutor(3) as pool:
        direct = pb_grpc.PrefillNodeStub(ch)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            pending = [pool.submit(direct.Prefill, pb.PrefillRequest(
                request_id=f"queued-{k}", prompt_token_ids=ids, sampling=pb.SamplingParams(max_tokens=1)), timeout=120)
                for k, ids in enumerate(longs)]
            wait_until(lambda: prefill_queue() == 3, 10, "the prefill node to report its queue", every_s=0.05)
            got, fin = run(stub, SHORT, 16)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        assert all(f.result(timeout=120).first_token >= 0 for f in pending)
    t = fin.timings
    assert t.local_prefill and not t.colocated and t.prefill_node == t.decode_node and fin.reason == "length", fin
    assert t.predicted_ttft_s > 0
    assert got == references[tuple(SHORT)]  # greedy output as a plain engine's
    # Its decode node computed the prompt itself (vLLM's own count), and says it prefilled locally.
    after = scrape(cluster.node(t.decode_node).info["metrics"])
    was = before[t.decode_node]
    assert metric(after, "vllm:prompt_tokens_by_source_total", source="local_compute") >= \
        metric(was, "vllm:prompt_tokens_by_source_total", source="local_compute") + len(SHORT)
    assert metric(after, "tandem_decode_local_prefills_total") == metric(was, "tandem_decode_local_prefills_total") + 1
    # With the queue gone, the same prompt is disaggregated again.
    wait_until(lambda: prefill_queue() == 0, 10, "the prefill node's queue to drain")
    assert not run(stub, SHORT, 4)[1].timings.local_prefill


def test_batch_waits_for_spare_capacity_and_a_tenant_over_quota_is_refused(cluster: LocalCluster, tiny_model: Path,
                                                                           tmp_path: Path) -> None:
    # A second coordinator on the same cluster, always disaggregated (so the prefill node's queue is
    # the only way in), with a 200-token bucket for tenant "small".
    from tandem.netutil import free_port

    d = Daemon("coordinator-traffic", "coordinator",
               [sys.executable, "-m", "tandem.cli", "coordinator", "--etcd", cluster.etcd_url, "--model",
                str(tiny_model), "--grpc-port", str(free_port()), "--http-port", str(free_port()),
                "--max-model-len", str(MAX_MODEL_LEN), "--conditional-disagg", "off",
                "--tenant-quota", "small=20", "--quota-burst-s", "10", *cluster.tls_args(coordinator=True)],
               tmp_path / "coordinator-traffic.log")
    d.start()
    try:
        d.wait_ready(time.monotonic() + 60)
        with cluster.channel(d.info["grpc"]) as ch:
            front = pb_grpc.CoordinatorStub(ch)
            wait_until(lambda: (lambda nodes: len(nodes) == 3 and all(n.perf_samples > 0 for n in nodes))(
                front.ClusterStatus(pb.ClusterStatusRequest()).nodes), 30, "the nodes and their loads")
            # The prefill node's engine is frozen with work in it.
            prefill = cluster.node("prefill-0")
            frozen = engine_pids(prefill)
            first_at: dict[str, float] = {}

            def timed(name: str, req: pb.GenerateRequest) -> pb.Finish:
                msg = None
                for msg in front.Generate(req, timeout=120):
                    first_at.setdefault(name, time.monotonic())
                assert msg is not None
                return msg.finish

            with cluster.node_channel(prefill.info["grpc"]) as pch, ThreadPoolExecutor(4) as pool:
                direct = pb_grpc.PrefillNodeStub(pch)
                for pid in frozen:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    queued = [pool.submit(direct.Prefill, pb.PrefillRequest(
                        request_id=f"held-{k}", prompt_token_ids=[(k + 3 * i) % 590 + 5 for i in range(300)],
                        sampling=pb.SamplingParams(max_tokens=1)), timeout=120) for k in range(2)]
                    wait_until(lambda: next(n.prefill_queue for n in front.ClusterStatus(pb.ClusterStatusRequest()).nodes
                                            if n.node_id == "prefill-0") == 2, 10, "the queue to show")
                    batch = pool.submit(timed, "batch", pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=SHORT), priority="batch",
                        sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True)))
                    wait_until(lambda: metric(scrape(d.info["http"] + "/metrics", cluster.client_tls.client_ssl_context()), "tandem_batch_queue_depth") == 1,
                               10, "the batch request to wait at the coordinator")
                    interactive = pool.submit(timed, "interactive", pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=SHORT[:20]), sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True)))
                    wait_until(lambda: next(n.prefill_queue for n in front.ClusterStatus(pb.ClusterStatusRequest()).nodes
                                            if n.node_id == "prefill-0") == 3, 10, "the interactive request to queue")
                    time.sleep(0.5)
                    assert not batch.done()  # still waiting for spare capacity, not refused
                finally:
                    for pid in frozen:
                        os.kill(pid, signal.SIGCONT)
                assert all(f.result(timeout=60) for f in queued)
                assert interactive.result(timeout=60).reason == "length"
                assert batch.result(timeout=60).reason == "length"
            # Sent later, the interactive request had its first token first: the batch one waited for the
            # prefill node's queue (the interactive prefill included) to be empty.
            assert first_at["interactive"] < first_at["batch"]
            coord = scrape(d.info["http"] + "/metrics", cluster.client_tls.client_ssl_context())
            assert metric(coord, "tandem_admission_decisions_total", decision="batch_admitted") == 1
            # Tenant "small": 200 tokens per 10 s; 150 + 8 fit, the same again does not.
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=SHORT * 6 + SHORT[:6]), tenant="small",
                                     sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True))
            assert len(req.token_ids.ids) == 150
            assert list(front.Generate(req, timeout=60))[-1].finish.reason == "length"
            before = scrape(prefill.info["metrics"])
            with pytest.raises(grpc.RpcError) as err:
                list(front.Generate(req, timeout=60))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over its quota" in err.value.details() and int(dict(err.value.trailing_metadata())["retry-after"]) >= 1
            assert metric(scrape(prefill.info["metrics"]), "tandem_prefill_requests_total") == \
                metric(before, "tandem_prefill_requests_total")
            # Another tenant is not held back by it.
            other = pb.GenerateRequest(token_ids=req.token_ids, tenant="other", sampling=req.sampling)
            assert list(front.Generate(other, timeout=60))[-1].finish.reason == "length"
    finally:
        d.stop()


def busy_decode_node(cluster: LocalCluster, stub) -> Daemon:
    """The decode node the coordinator has the one running request on."""
    def busy() -> list[str]:
        status = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        return [n.node_id for n in status.nodes if n.role == "decode" and n.outstanding == 1]

    wait_until(lambda: len(busy()) == 1, 5, "the coordinator to pick a decode node", every_s=0.01)
    return cluster.node(busy()[0])


def drain(call) -> dict[str, object]:
    """Read a Generate stream to its end on a thread; what it ended with."""
    outcome: dict[str, object] = {"tokens": []}

    def read() -> None:
        try:
            for msg in call:
                outcome["tokens"].extend(msg.token_ids)  # type: ignore[union-attr]
                if msg.HasField("finish"):
                    outcome["finish"] = msg.finish
        except grpc.RpcError as exc:
            outcome["code"], outcome["details"] = exc.code(), exc.details()

    t = threading.Thread(target=read)
    t.start()
    t.join(90)
    assert not t.is_alive(), "the request hung after its decode node failed"
    return outcome


def blocks_held(cluster: LocalCluster) -> float:
    return metric(scrape(cluster.node("prefill-0").info["metrics"]), "tandem_kv_blocks_held")


def test_mutual_tls_refuses_a_client_without_the_clusters_certificate_before_any_work(
        cluster: LocalCluster, tmp_path: Path) -> None:
    from tandem.tls import make_certs

    prefill = next(d for d in cluster.nodes if d.role == "prefill")
    before = scrape(prefill.info["metrics"])
    other = make_certs(tmp_path / "other", ["127.0.0.1"])  # a CA the cluster does not know
    ca = Path(cluster.client_tls.ca).read_bytes()
    req = request(EQUALITY[0], 4)
    for address in (cluster.grpc_address, prefill.info["grpc"]):
        refused = [grpc.insecure_channel(address),
                   grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)),
                   grpc.secure_channel(address, grpc.ssl_channel_credentials(
                       ca, other["client_key"].read_bytes(), other["client"].read_bytes()))]
        if address != cluster.grpc_address:  # a client's own certificate opens the coordinator, never a node
            refused.append(cluster.channel(address))
        for ch in refused:
            with ch, pytest.raises(grpc.RpcError) as ei:
                if address == cluster.grpc_address:
                    list(pb_grpc.CoordinatorStub(ch).Generate(req, timeout=10))
                else:
                    pb_grpc.PrefillNodeStub(ch).Prefill(pb.PrefillRequest(request_id="x", prompt_token_ids=[5, 6]),
                                                        timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
    after = scrape(prefill.info["metrics"])
    assert metric(after, "tandem_prefill_requests_total") == metric(before, "tandem_prefill_requests_total")
    # HTTPS: with the client certificate a completion comes; without one the handshake fails
    assert cluster.http_url.startswith("https://")
    body = json.dumps({"prompt": EQUALITY[0], "max_tokens": 4, "temperature": 0, "ignore_eos": True}).encode()
    post = urllib.request.Request(cluster.http_url + "/v1/completions", data=body,
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, context=cluster.client_tls.client_ssl_context(), timeout=60) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] == 4
    with pytest.raises(OSError):  # the handshake, or under TLS 1.3 the first read, is refused
        urllib.request.urlopen(post, context=ssl.create_default_context(cafile=cluster.client_tls.ca), timeout=10)
    # a vLLM engine flag on the nodes' command line reached their engines
    for d in cluster.nodes:
        assert f"download_dir='{VLLM_FLAG_DIR}'" in d.log_path.read_text(), d.name
    # the CLI, with the client's files
    tls = cluster.client_tls
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "hello", "--target", cluster.grpc_address,
                          "--max-tokens", "3", "--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "finish=length tokens=3" in out.stderr, out.stderr[-2000:]


def test_kv_control_ports_take_only_tls_peers_and_the_tools_dial_with_the_clients_files(
        cluster: LocalCluster, tmp_path: Path) -> None:
    import socket

    from tandem.kvtransfer.wire import ChannelClosed, parse_address, recv_msg, send_msg

    # a prefill node's KV control port: plain text is hung up on at the handshake
    prefill = next(d for d in cluster.nodes if d.role == "prefill")
    with socket.create_connection(parse_address(prefill.info["kv"]), timeout=10) as raw:
        send_msg(raw, {"op": "release", "req": "x"})
        with pytest.raises((ChannelClosed, ConnectionResetError)):
            recv_msg(raw)
    tls = cluster.client_tls
    files = ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]
    # `tandem bench run` over HTTPS and over the coordinator's TLS gRPC port
    for target in (cluster.http_url, "tandem-grpc://" + cluster.grpc_address):
        out = subprocess.run([sys.executable, "-m", "tandem.cli", "bench", "run", "--target", target, "--workload",
                              "chat", "--rate", "4", "--duration", "1", "--max-model-len", "128",
                              "--out", str(tmp_path / "bench"), *files], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        s = json.loads((tmp_path / "bench" / "results.json").read_text())["summary"]
        assert s["completed"] == s["requests"] > 0, (target, s)
    # `tandem plan --live` reads the cluster's status and its HTTPS /metrics with them (with --fits
    # learned, every node's learned fits come in that status); without, it cannot
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"prefill": [0.05, 1e-4, 0.0], "decode": [0.02, 0.001, 0.0],
                                   "transfer": [0.005, 0.0]}))
    for name, extra in (("with", files), ("without", [])):
        out_dir = tmp_path / f"live-{name}"
        out = subprocess.run([sys.executable, "-m", "tandem.cli", "plan", "--live", "--profile", str(profile),
                              "--slo-ttft", "0.5", "--slo-tpot", "0.05", "--target", cluster.grpc_address,
                              "--metrics-url", cluster.http_url + "/metrics", "--every-s", "1", "--live-for-s", "1.5",
                              "--max-model-len", str(MAX_MODEL_LEN), "--fits", "learned", "--out", str(out_dir),
                              *extra],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        recs = [json.loads(x) for x in (out_dir / "live.jsonl").read_text().splitlines()]
        assert recs and all(("error" in r) == (name == "without") for r in recs), (name, recs)
        if name == "with":
            assert all(r["split"] == "1:2" and r["fits"] == "learned by 3 node(s)" for r in recs), recs


def test_frozen_decode_node_mid_stream_is_migrated_and_rejoins_when_it_resumes(cluster: LocalCluster, stub,
                                                                              references) -> None:
    call = stub.Generate(request(FROZEN, LONG), timeout=120)
    head = [next(call) for _ in range(3)]  # the prefill's token, then the decode is streaming
    victim = busy_decode_node(cluster, stub)
    victim.signal(signal.SIGSTOP)  # a hung host: its connections stay open, nothing answers
    frozen_at = time.monotonic()
    try:
        outcome = drain(call)
        survivor = "decode-1" if victim.name == "decode-0" else "decode-0"
        got = [t for m in head for t in m.token_ids] + outcome["tokens"]  # type: ignore[operator]
        fin = outcome.get("finish")
        assert fin is not None, outcome
        assert fin.reason == "length" and fin.migrations == 1 and fin.timings.decode_node == survivor
        # No token missing, none twice: the same greedy output as an undisturbed run.
        assert got == references[tuple(FROZEN)]
        # Its lease runs out while it is frozen ...
        wait_until(lambda: victim.name not in registered_nodes(cluster.etcd_url), TTL_S + 10,
                   "the frozen node's etcd lease to run out")
    finally:
        victim.signal(signal.SIGCONT)
    assert time.monotonic() - frozen_at > TTL_S
    # ... and once it runs again it registers with a new lease and takes requests again.
    wait_until(lambda: victim.name in registered_nodes(cluster.etcd_url), 15, "the resumed node to register again")
    wait_until(lambda: victim.name in {n.node_id for n in stub.ClusterStatus(pb.ClusterStatusRequest()).nodes},
               10, "the coordinator to see it again")
    prompts = [[(5 + 7 * i + k) % 590 + 5 for i in range(30)] for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        finishes = list(pool.map(lambda p: run(stub, p, 64)[1], prompts))
    assert {f.timings.decode_node for f in finishes} == {"decode-0", "decode-1"}
    wait_until(lambda: metric(scrape(victim.info["metrics"]), "vllm:num_requests_running") == 0, 20,
               "the resumed node to drop the request it held when it froze")
    wait_until(lambda: blocks_held(cluster) == 0, 20, "every held KV block to be freed")


def test_a_seeded_request_continues_deterministically_after_a_migration(cluster: LocalCluster, stub,
                                                                         references) -> None:
    # Both decode nodes are frozen while the request starts: its first token comes from the prefill
    # node and the decode node picked for it never answers, so it migrates with exactly that one
    # token sent. The tokens after the switch must be a plain engine's for prompt + [t0], same seed.
    decodes = [cluster.node("decode-0"), cluster.node("decode-1")]
    for d in decodes:
        d.signal(signal.SIGSTOP)
    victim = None
    try:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=SEEDED), sampling=pb.SamplingParams(
            max_tokens=SEEDED_TOKENS, temperature=TEMPERATURE, seed=SEED, ignore_eos=True))
        call = stub.Generate(req, timeout=120)
        first = next(call)
        victim = busy_decode_node(cluster, stub)
        for d in decodes:
            if d is not victim:
                d.signal(signal.SIGCONT)
        outcome = drain(call)
    finally:
        for d in decodes:
            if d is not victim:
                d.signal(signal.SIGCONT)
    assert victim is not None
    try:
        fin = outcome.get("finish")
        assert fin is not None, outcome
        assert fin.reason == "length" and fin.migrations == 1 and fin.timings.decode_node != victim.name
        assert list(first.token_ids) + outcome["tokens"] == references[tuple(SEEDED)]  # type: ignore[operator]
    finally:
        victim.signal(signal.SIGCONT)
    # It comes back (its lease may have lapsed meanwhile) before the next test needs both.
    wait_until(lambda: victim.name in registered_nodes(cluster.etcd_url), 15, "the resumed node to register")
    wait_until(lambda: any(n.node_id == victim.name and not n.down
                           for n in stub.ClusterStatus(pb.ClusterStatusRequest()).nodes),
               15, "the coordinator to route to it again")


def test_lying_kv_handles_fail_their_request_only(cluster: LocalCluster, stub) -> None:
    node = cluster.node("decode-0")
    prompt = [(13 + 3 * i) % 590 + 5 for i in range(70)]
    with cluster.node_channel(node.info["grpc"]) as ch:
        decode = pb_grpc.DecodeNodeStub(ch)

        def call(handle: pb.KVHandle) -> grpc.RpcError:
            req = pb.DecodeRequest(request_id=f"lie-{time.monotonic_ns()}", prompt_token_ids=prompt,
                                   sampling=pb.SamplingParams(max_tokens=4, temperature=0), handle=handle)
            with pytest.raises(grpc.RpcError) as info:
                list(decode.Decode(req, timeout=60))
            return info.value

        good = dict(engine_id="prefill-0-x", address=cluster.node("prefill-0").info["kv"], remote_request_id="nope",
                    block_ids=[0, 1, 2], num_tokens=69, lease_deadline=time.time() + 60)
        # Fewer blocks than its tokens need: this once raised inside vLLM's scheduler and killed the engine.
        err = call(pb.KVHandle(**{**good, "block_ids": [0, 1]}))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "need 3" in err.details()
        for bad in ({"address": "nowhere"}, {"block_ids": [0, 0, 1]}, {"num_tokens": 12}):
            assert call(pb.KVHandle(**{**good, **bad})).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert call(pb.KVHandle(**{**good, "lease_deadline": time.time() - 1})).code() == grpc.StatusCode.ABORTED
        # Well formed, but the prefill node holds no such blocks: vLLM's load-failure path fails it alone.
        err = call(pb.KVHandle(**good))
        assert err.code() == grpc.StatusCode.ABORTED and "KV transfer" in err.details()
    # The node, its engine and the cluster serve on.
    assert node.alive()
    for _ in range(2):
        _, fin = run(stub, [(9 + 5 * i) % 590 + 5 for i in range(40)], 8)
        assert fin.reason == "length"
    m = scrape(node.info["metrics"])
    assert metric(m, "tandem_decode_requests_total", outcome="error") >= 6


def engine_pids(node: Daemon) -> list[int]:
    assert node.proc is not None
    below = process_tree(node.proc.pid)[1:]
    pids = [p for p in below if "EngineCore" in process_name(p) or "multiprocessing" in process_name(p)]
    assert pids, f"no engine process under {node.name}: {[process_name(p) for p in below]}"
    return pids


def test_a_cancel_while_decode_waits_for_remote_kv_frees_both_sides(cluster: LocalCluster, stub) -> None:
    # A real handle from the prefill node, whose engine processes (its worker runs the KV block
    # server) are then frozen: the decode node's fetch waits on it, and the cancel lands then.
    pnode, dnode = cluster.node("prefill-0"), cluster.node("decode-0")
    prompt = [(17 + 5 * i) % 590 + 5 for i in range(70)]
    rid = f"kv-wait-{time.monotonic_ns()}"
    with cluster.node_channel(pnode.info["grpc"]) as pch, cluster.node_channel(dnode.info["grpc"]) as dch:
        resp = pb_grpc.PrefillNodeStub(pch).Prefill(
            pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, hold_kv=True,
                              sampling=pb.SamplingParams(max_tokens=50, temperature=0)), timeout=60)
        wait_until(lambda: blocks_held(cluster) == 3, 20, "the prefill node to hold 3 blocks")
        before = scrape(dnode.info["metrics"])
        assert pnode.proc is not None
        frozen = process_tree(pnode.proc.pid)[1:]  # everything below the node daemon
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            call = pb_grpc.DecodeNodeStub(dch).Decode(
                pb.DecodeRequest(request_id=rid, prompt_token_ids=[*prompt, resp.first_token], handle=resp.handle,
                                 sampling=pb.SamplingParams(max_tokens=49, temperature=0)), timeout=60)
            usage = lambda: metric(scrape(dnode.info["metrics"]), "vllm:kv_cache_usage_perc")  # noqa: E731
            wait_until(lambda: usage() > 0, 20, "the decode engine to allocate blocks and wait for the KV")
            time.sleep(1.0)  # the fetch is in flight: dialled, handshake sent, no answer
            assert usage() > 0
            call.cancel()
            t0 = time.monotonic()
            # Freed on the decode side at once, while the holder is still frozen.
            wait_until(lambda: usage() == 0, 10, "the decode engine to free the blocks it was filling")
            assert time.monotonic() - t0 < 5
            after = scrape(dnode.info["metrics"])
            assert (metric(after, "tandem_kv_transfer_aborts_total")
                    == metric(before, "tandem_kv_transfer_aborts_total") + 1)
            assert (metric(after, "tandem_decode_requests_total", outcome="cancelled")
                    == metric(before, "tandem_decode_requests_total", outcome="cancelled") + 1)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
    # ... and on the prefill side as soon as it answers again (the aborted fetch's release),
    # well before its lease would have freed them.
    wait_until(lambda: blocks_held(cluster) == 0, 10, "the prefill node to free the held blocks")
    _, fin = run(stub, [(9 + 11 * i) % 590 + 5 for i in range(30)], 8)
    assert fin.reason == "length"


def test_killed_decode_node_mid_request_is_migrated(cluster: LocalCluster, stub, references) -> None:
    # Both decode nodes are frozen (SIGSTOP) while the request starts, so it cannot finish before the
    # kill lands: the first token comes from the prefill node, the picked decode node never answers.
    # They stay frozen for well under the lease TTL.
    decodes = [cluster.node("decode-0"), cluster.node("decode-1")]
    for d in decodes:
        d.signal(signal.SIGSTOP)
    try:
        call = stub.Generate(request(KILLED, LONG), timeout=120)
        first = next(call)
        assert first.token_ids
        victim = busy_decode_node(cluster, stub)
        victim.signal(signal.SIGKILL)
    finally:
        for d in decodes:
            if d.alive():
                d.signal(signal.SIGCONT)
    survivor = "decode-1" if victim.name == "decode-0" else "decode-0"
    killed_at = time.monotonic()
    outcome = drain(call)
    fin = outcome.get("finish")
    assert fin is not None, outcome
    assert fin.reason == "length" and fin.migrations == 1 and fin.timings.decode_node == survivor
    assert list(first.token_ids) + outcome["tokens"] == references[tuple(KILLED)]  # type: ignore[operator]
    # Out of routing at once (the broken stream), long before its etcd lease runs out.
    for _ in range(3):
        _, fin = run(stub, [(9 + 7 * i) % 590 + 5 for i in range(30)], 8)
        assert fin.reason == "length" and fin.timings.decode_node == survivor and fin.migrations == 0
    wait_until(lambda: victim.name not in registered_nodes(cluster.etcd_url), TTL_S + 5,
               "the dead node's etcd key to expire")
    assert time.monotonic() - killed_at <= TTL_S + 5
    wait_until(lambda: victim.name not in {n.node_id for n in stub.ClusterStatus(pb.ClusterStatusRequest()).nodes},
               5, "the coordinator to drop the dead node")
    wait_until(lambda: blocks_held(cluster) == 0, 20, "every held KV block to be freed")


def test_a_node_whose_engine_dies_leaves_the_cluster_and_exits_nonzero(cluster: LocalCluster, stub) -> None:
    node = next(d for d in cluster.nodes if d.role == "decode" and d.alive())
    for pid in engine_pids(node):
        os.kill(pid, signal.SIGKILL)
    assert node.proc.wait(30) == 3  # ENGINE_DEAD_EXIT: the supervisor restarts it
    assert node.name not in registered_nodes(cluster.etcd_url)  # revoked on the way out, not left to expire
    log = (cluster.log_dir / f"{node.name}.log").read_text()
    assert "the vLLM engine died; leaving the cluster" in log

