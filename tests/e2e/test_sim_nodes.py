"""Simulated nodes (`--simulate PROFILE`) on the real protocol: they register in etcd, serve
through the real coordinator with their profile's times and fake KV handles, and leave. No
engine runs here (these nodes are for load tests and the simulator's checks only)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from tandem.local.cluster import ClusterSpec, LocalCluster
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc

from .helpers import metric, registered_nodes, scrape, wait_until

pytestmark = pytest.mark.e2e

# prefill 50 ms + 0.1 ms per token; decode steps 20 ms + 1 ms per request; transfer 5 ms
PROFILE = {"prefill": [0.05, 1e-4, 0.0], "decode": [0.02, 0.001, 0.0], "transfer": [0.005, 0.0]}


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("sim")
    (tmp / "profile.json").write_text(json.dumps(PROFILE))
    # always disaggregated: every request's KV goes through a (fake) handle
    spec = ClusterSpec(model=str(tiny_model), num_prefill=1, num_decode=2, max_model_len=512, ttl_s=3,
                       log_dir=str(tmp / "logs"), extra_node_args=["--simulate", str(tmp / "profile.json")],
                       extra_coordinator_args=["--conditional-disagg", "off", "--admission", "off"])
    with LocalCluster(spec) as c:
        yield c


def generate(stub: pb_grpc.CoordinatorStub, ids: list[int], n: int) -> tuple[list[int], pb.Finish]:
    msgs = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(
        max_tokens=n, temperature=0, ignore_eos=True)), timeout=60))
    return [t for m in msgs for t in m.token_ids], msgs[-1].finish


def test_simulated_nodes_serve_through_the_coordinator_with_their_profiles_times(cluster: LocalCluster, stub) -> None:
    assert registered_nodes(cluster.etcd_url) == {"prefill-0", "decode-0", "decode-1"}
    prompt = [(7 + 13 * i) % 590 + 5 for i in range(200)]
    a, fin = generate(stub, prompt, 30)
    assert len(a) == 30 and fin.reason == "length" and fin.usage.completion_tokens == 30
    # the profile's times: one prefill of 200 tokens is 70 ms; 29 steps at batch 1 of 21 ms each
    t = fin.timings
    assert t.prefill_s == pytest.approx(0.07, abs=0.02) and not t.local_prefill
    assert t.decode_s >= 29 * 0.021
    # the tokens a simulated engine makes for this prompt on one node: the prefill node's first
    # token and the decode node's continuation (which got the first token in its prompt) agree
    from tandem.node.simengine import _Seq, model_facts

    one = _Seq("r", prompt, 30)
    want = []
    for _ in range(30):
        want.append(one.token(model_facts(str(cluster.spec.model))["vocab_size"]))
        one.produced += 1
    assert a == want
    # a (fake) KV handle went from the prefill node to a decode node: nothing is fetched
    decode_ok = sum(metric(scrape(d.info["metrics"]), "tandem_decode_requests_total", outcome="ok")
                    for d in cluster.nodes if d.role == "decode")
    assert decode_ok == 1
    assert metric(scrape(cluster.node("prefill-0").info["metrics"]), "tandem_prefill_requests_total",
                  outcome="ok") == 1
    for d in cluster.nodes:  # no engine was started
        log = d.log_path.read_text()
        assert "simulated: times from" in log and "vLLM engine ready" not in log


def test_decode_steps_batch_requests_on_a_simulated_node(cluster: LocalCluster, stub) -> None:
    from concurrent.futures import ThreadPoolExecutor

    prompts = [[(3 + 7 * i + k) % 590 + 5 for i in range(40)] for k in range(8)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda p: generate(stub, p, 50), prompts))
    took = time.monotonic() - t0
    assert all(len(toks) == 50 for toks, _ in outs)
    # one at a time these would take 8 x (49 steps x 21 ms) = 8.2 s of decoding; batched on two
    # decode nodes, about 49 steps of ~24 ms each (plus prefills of 54 ms each, one at a time)
    assert took < 4.0


def test_the_coordinator_bench_streams_over_http_and_counts_every_token(cluster: LocalCluster) -> None:
    """`tandem bench coordinator --api http`'s probe: /v1/completions as server-sent events."""
    import uvloop

    from tandem.bench.coordinator_load import probe_http

    row = uvloop.run(probe_http(cluster.http_url, rate=8, duration_s=1.0, prompt_tokens=12, output_tokens=5, seed=3))
    assert row["requests"] >= 1 and row["errors"] == 0
    assert row["tokens"] == 5 * row["requests"]  # each stream's usage chunk: its 5 tokens
    # a chunk a token (--stream-interval 1) and the finish's
    assert row["messages"] == 6 * row["requests"]
    assert row["ttft_p50_ms"] >= 50  # the simulated prefill of 50 ms is in it
    assert row["added_ttft_p50_ms"] is None


def test_the_live_planner_reads_the_real_coordinator_and_recommends_a_prefill_node(cluster: LocalCluster, stub,
                                                                                    tmp_path: Path) -> None:
    """`tandem plan --live` (recommending only) on this 1:2 cluster under prompts of 400 tokens and
    outputs of 2: prefill-bound, so it asks for a decode node to become a prefill node, and checks
    its last prediction against what the coordinator measured."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    planner = subprocess.Popen(
        [sys.executable, "-m", "tandem.cli", "plan", "--live", "--profile", str(profile), "--slo-ttft", "0.5",
         "--slo-tpot", "0.05", "--target", cluster.grpc_address, "--metrics-url", cluster.http_url + "/metrics",
         "--window-s", "30", "--every-s", "1", "--confirm", "1", "--min-requests", "10", "--max-model-len", "512",
         "--live-for-s", "20", "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)  # its first read: the window starts there
    prompts = [[(5 + 11 * i + k) % 590 + 5 for i in range(400)] for k in range(60)]

    def send(ids: list[int]) -> float:  # with a TTFT objective that the requests queued longest miss
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), slo=pb.Slo(ttft_ms=150), sampling=pb.SamplingParams(
            max_tokens=2, temperature=0, ignore_eos=True))
        msgs = list(stub.Generate(req, timeout=60))
        assert sum(len(m.token_ids) for m in msgs) == 2
        return msgs[-1].finish.timings.ttft_s

    with ThreadPoolExecutor(4) as ex:
        ttfts = list(ex.map(send, prompts))
    met = sum(1 for t in ttfts if t <= 0.15) / len(ttfts)
    assert 0 < met < 1, ttfts
    said, _ = planner.communicate(timeout=60)
    assert planner.returncode == 0, said
    recs = [json.loads(x) for x in (tmp_path / "live.jsonl").read_text().splitlines()]
    moves = [r["move"] for r in recs if r.get("move")]
    assert moves and all(m[0].startswith("decode-") and m[1] == "prefill" for m in moves), said
    decided = next(r for r in recs if r.get("move"))
    assert decided["split"] == "1:2" and decided["best"] == "2:1" and decided["mix"]["mean_prompt"] == 400
    # the attainment the coordinator measured is the clients' (requests judged by its own clock)
    assert 0 < decided["mix"]["attainment"] < 1
    last = recs[-1]["mix"]
    assert last["requests"] == 60 and last["attainment"] == pytest.approx(met, abs=0.05), (last, met)
    checks = [r["check"] for r in recs if "check" in r]  # predictions checked against the next window
    assert checks and all(c["measured_attainment"] is not None for c in checks), said
    assert "switch decode-" in said and "to prefill" in said


def test_simulated_nodes_leave_the_cluster_when_stopped(cluster: LocalCluster, stub) -> None:
    node = cluster.node("decode-1")
    node.signal(signal.SIGTERM)
    assert node.proc.wait(timeout=30) == 0
    wait_until(lambda: "decode-1" not in registered_nodes(cluster.etcd_url), 10, "decode-1 to deregister")
    toks, fin = generate(stub, [11, 12, 13, 14], 5)  # the other decode node serves on
    assert len(toks) == 5 and fin.timings.decode_node == "decode-0"


def sim_tokens(cluster: LocalCluster, prompt: list[int], n: int) -> list[int]:
    """What a simulated engine makes for ``prompt`` prefilled and decoded on one node."""
    from tandem.node.simengine import _Seq, model_facts

    seq, vocab = _Seq("r", prompt, n), model_facts(str(cluster.spec.model))["vocab_size"]
    out = []
    for _ in range(n):
        out.append(seq.token(vocab))
        seq.produced += 1
    return out


def test_with_no_prefill_pool_the_decode_nodes_prefill_and_a_killed_one_is_migrated(tiny_model: Path,
                                                                                    tmp_path: Path) -> None:
    """P:D 0:2: every request prefills on its decode node, a one-token one too; a decode node killed
    mid-stream hands its request to the other, which prefills what the client has seen."""
    import threading
    import urllib.error
    import urllib.request

    import grpc

    (tmp_path / "profile.json").write_text(json.dumps(PROFILE))
    spec = ClusterSpec(model=str(tiny_model), num_prefill=0, num_decode=2, max_model_len=512, ttl_s=3,
                       log_dir=str(tmp_path / "logs"), extra_node_args=["--simulate", str(tmp_path / "profile.json")])
    with LocalCluster(spec) as c, grpc.insecure_channel(c.grpc_address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        def ready() -> dict:
            try:
                with urllib.request.urlopen(c.http_url + "/ready", timeout=10) as r:  # the decode pool alone serves
                    return json.loads(r.read())
            except urllib.error.HTTPError as not_ready:  # 503 until it sees a decode node
                return json.loads(not_ready.read())

        wait_until(lambda: ready()["nodes"]["decode"] == 2, 10, "the coordinator to see both decode nodes")
        assert ready() == {"status": "ready", "nodes": {"prefill": 0, "decode": 2}}
        prompt = [(7 + 13 * i) % 590 + 5 for i in range(100)]
        for n in (8, 1):
            toks, fin = generate(stub, prompt, n)
            assert toks == sim_tokens(c, prompt, n) and fin.reason == "length"
            assert fin.timings.local_prefill and fin.timings.prefill_node == fin.timings.decode_node
        # 200 tokens of ~21 ms steps: killed after its first tokens, the request goes on elsewhere.
        call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
            max_tokens=200, temperature=0, ignore_eos=True)), timeout=60)
        got: list[int] = []
        finish: list[pb.Finish] = []
        started = threading.Event()

        def read() -> None:
            for msg in call:
                got.extend(msg.token_ids)
                if len(got) >= 3:
                    started.set()
                if msg.HasField("finish"):
                    finish.append(msg.finish)

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(30)
        busy = [n.node_id for n in stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10).nodes if n.outstanding]
        assert len(busy) == 1, busy
        c.node(busy[0]).signal(signal.SIGKILL)
        reader.join(60)
        (fin,) = finish
        assert fin.reason == "length" and fin.migrations == 1 and fin.timings.local_prefill
        assert fin.timings.decode_node != busy[0] and len(got) == 200
        # The first leg's tokens, then the second leg's: a prefill of the prompt and those tokens.
        first = sim_tokens(c, prompt, 200)
        assert any(got[:k] == first[:k] and got[k:] == sim_tokens(c, prompt + got[:k], 200 - k)
                   for k in range(3, 200))


def test_a_real_node_refuses_a_bad_simulate_profile(tiny_model: Path, tmp_path: Path) -> None:
    import subprocess

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "prefill", "--model", str(tiny_model), "--etcd",
                           "http://127.0.0.1:1", "--simulate", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--simulate" in proc.stderr and "not a profile" in proc.stderr


def test_a_node_switched_with_tandem_role_execs_itself_in_the_new_role_and_keeps_it(tiny_model: Path,
                                                                                    tmp_path: Path) -> None:
    """`tandem role` on a lone simulated node with a made-up id: it drains, execs itself as a decode
    node under the same id (same pid), and a fresh start of the same command line comes up as
    decode too, until `tandem role --clear`."""
    import subprocess

    from tandem.local.cluster import Daemon
    from tandem.local.etcd_server import LocalEtcd

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    with LocalEtcd() as etcd:
        argv = [sys.executable, "-m", "tandem.cli", "prefill", "--model", str(tiny_model), "--etcd", etcd.url,
                "--simulate", str(profile), "--ttl-s", "3"]
        node = Daemon("lone", "prefill", argv, tmp_path / "lone.log")
        node.start()
        try:
            node.wait_ready(time.monotonic() + 60)
            node_id, pid = node.info["node_id"], node.proc.pid
            assert node_id.startswith("prefill-")  # made up at start: the exec must keep it

            def role(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([sys.executable, "-m", "tandem.cli", "role", node_id, *args, "--etcd",
                                       etcd.url], capture_output=True, text=True, timeout=120)

            out = role("decode", "--timeout-s", "60")
            assert out.returncode == 0 and "joined as a decode node" in out.stdout, out.stdout + out.stderr
            wait_until(lambda: node.is_ready(), 30, "the READY line of its new start")
            assert node.info["role"] == "decode" and node.info["node_id"] == node_id and node.role == "decode"
            assert node.proc.pid == pid and node.alive()  # the same process, exec'd
            assert role("decode").stdout.startswith(f"{node_id} is a decode node already")
            node.stop()
            assert node.proc.returncode == 0
            # The same command line again (a supervisor's restart): etcd's role wins, with a warning.
            again = Daemon("lone", "prefill", [*argv, "--node-id", node_id], tmp_path / "again.log")
            again.start()
            try:
                again.wait_ready(time.monotonic() + 60)
                assert again.info["role"] == "decode"
                assert "`tandem role` gave it that role" in again.log_path.read_text()
            finally:
                again.stop()
            cleared = role("--clear")
            assert cleared.returncode == 0 and "role forgotten" in cleared.stdout
            assert "no role was given" in role("--clear").stdout
            assert role().returncode == 2  # neither a role nor --clear
        finally:
            node.kill()
