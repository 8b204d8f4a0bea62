"""The systems `tandem bench compare` starts, each on the cores it is given:
Tandem at a P:D ratio, colocated vLLM, and vLLM's own P/D (NixlConnector, a
kv_producer and a kv_consumer behind bench/pd_proxy.py), as shipped and with
the CPU fixes in bench/nixl-fixes/.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tandem.local.cluster import ClusterSpec, LocalCluster, core_plan
from tandem.kvtransfer.transport import DEFAULT_CPU_UCX_TLS
from tandem.netutil import free_port, reserve_port
from tandem.node.config import core_spec

if TYPE_CHECKING:
    from prometheus_client.samples import Sample

NIXL_FIXES = Path(__file__).with_name("nixl-fixes")


@dataclass
class Memory:
    """KV memory every system of a run gets (set once by `tandem bench compare`)."""

    kv_cache_gib: float = 2.0  # each engine's own KV cache (each prefill engine's, with decode_kv_cache_gib)
    kvstore_ram_gib: float = 0.0  # Tandem's nodes: a KV store RAM tier each (0: no store)
    kvstore_root: str = ""  # Tandem's nodes: a disk tier each, under this directory ("": none)
    decode_kv_cache_gib: float = 0.0  # each decode engine's own KV cache (0: kv_cache_gib)
    layouts: tuple[tuple[int, int], ...] = ((1, 1),)  # the P:D layouts of the run's Tandem systems

    @property
    def decode_gib(self) -> float:
        return self.decode_kv_cache_gib or self.kv_cache_gib

    def tandem_gib(self, num_prefill: int, num_decode: int) -> float:
        """All of a Tandem P:D cluster's KV memory: every engine's cache and every node's RAM tier."""
        return (num_prefill * self.kv_cache_gib + num_decode * self.decode_gib
                + (num_prefill + num_decode) * self.kvstore_ram_gib)

    @property
    def colocated_gib(self) -> float:
        """Colocated vLLM's one cache: as much KV memory as the largest Tandem cluster of the run
        holds in all its engines' caches and RAM tiers together (the disk tier is not memory)."""
        return max(self.tandem_gib(p, d) for p, d in self.layouts)

    @staticmethod
    def vllm_flags(gib: float) -> tuple[list[str], dict[str, str | None]]:
        """vLLM server flags and env for a KV cache of ``gib`` (fractions too: VLLM_CPU_KVCACHE_SPACE,
        whole GiB only, is unset (None) so it cannot override)."""
        return ["--kv-cache-memory-bytes", str(int(gib * 2**30))], {"VLLM_CPU_KVCACHE_SPACE": None}


MEMORY = Memory()


@dataclass
class System:
    name: str
    target: str
    commands: list[list[str]]
    version: str
    stop: Callable[[], None]
    notes: list[str] = field(default_factory=list)
    # Called after the measurements: facts for the report (e.g. where prompt tokens came from).
    facts: Callable[[], dict[str, Any]] = dict
    nodes: dict[str, str] = field(default_factory=dict)  # Tandem: node name -> its gRPC address


def _installed(name: str, *dists: str) -> str:
    """'<dist> <version>' of the first of ``dists`` that is installed."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in dists:
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return f"{name} (unknown version)"


def vllm_version() -> str:
    return _installed("vllm", "vllm-cpu", "vllm")


def nixl_version() -> str:
    return _installed("nixl", "nixl-cu12")


def _log_tails(logs: list[Path], lines: int = 15) -> str:
    """The last lines of each log, for an error message that has to explain itself (CI keeps no files)."""
    parts = []
    for log in logs:
        try:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            tail = [f"(unreadable: {exc})"]
        parts.append(f"--- last {len(tail)} lines of {log}:\n" + "\n".join(tail))
    return "\n".join(parts)


def _wait_http(url: str, procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"a server exited with {proc.returncode} before {url} was up\n"
                                   + _log_tails([log]))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up in {timeout_s:.0f} s (its /health, last: {last})\n"
                               + _log_tails(logs))
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
            time.sleep(1)
        except urllib.error.HTTPError as exc:  # the proxy's 503 says which server is not up yet
            try:
                body = exc.read()[:200].decode(errors="replace")
            except OSError:
                body = ""
            last = f"HTTP {exc.code}: {body}"
            time.sleep(1)
        except (OSError, http.client.HTTPException) as exc:
            last = repr(exc)
            time.sleep(1)


class Processes:
    """Servers started in their own sessions, stopped together (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def spawn(self, cmd: list[str], env: dict[str, str | None], log: Path) -> None:
        """``env`` over this process's environment; a None value unsets that variable."""
        full = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                               env=full, start_new_session=True))
        self.logs.append(log)

    def wait(self, url: str) -> None:
        try:
            _wait_http(url, self.procs, self.logs)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()


def _shown(env: dict[str, str | None], cmd: list[str]) -> list[str]:
    """A command line as a user would type it: its env vars, then the command, ``python`` for the interpreter."""
    unset = [w for k, v in env.items() if v is None for w in ("-u", k)]
    return ((["env", *unset] if unset else []) + [f"{k}={v}" for k, v in env.items() if v is not None]
            + ["python" if c == sys.executable else c for c in cmd])


def _vllm_server(model: str, max_model_len: int, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
            "--enforce-eager", "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(port),
            *extra]


def start_vllm_colocated(model: str, cores: list[int], max_model_len: int, log_dir: Path) -> System:
    port = free_port()
    kv_flags, kv_env = Memory.vllm_flags(MEMORY.colocated_gib)
    cmd = _vllm_server(model, max_model_len, port, "--enable-chunked-prefill", *kv_flags)
    env = {**kv_env, "VLLM_CPU_OMP_THREADS_BIND": core_spec(cores)}
    procs = Processes()
    procs.spawn(cmd, env, log_dir / "vllm-colocated.log")
    url = f"http://127.0.0.1:{port}"
    procs.wait(url)
    started = prompt_tokens_by_source(url)
    return System("vllm-colocated", url, [_shown(env, cmd)], vllm_version(), procs.stop,
                  facts=lambda: engine_cache_facts(scrape(url.removeprefix("http://")), started))


def engine_cache_facts(samples: list[Sample], started: dict[str, float]) -> dict[str, Any]:
    """A colocated vLLM's ``cache_facts``: where its prompt tokens came from by its own count (less
    ``started``, the counts when it was up), computed already being its prefix cache's hits, and
    the streams it preempted."""
    prompt, cached = engine_prompt_tokens(samples, started)
    return {"prefill_prompt_tokens": int(prompt), "prefill_cached_tokens": int(cached),
            "prefill_token_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
            "engine_preemptions": int(metric_sum(samples, "vllm:num_preemptions_total"))}


def check_nixl() -> None:
    try:
        import nixl._api  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"vLLM's NIXL baseline needs NIXL ({exc}). `scripts/setup.sh` installs it "
                         "(nixl-cu12==1.5.1 and nixl==1.5.1 --no-deps); or leave the vllm-nixl systems "
                         "out with --systems") from None


def prompt_tokens_by_source(url: str) -> dict[str, float]:
    """vllm:prompt_tokens_by_source_total from a vLLM server's /metrics (http://host:port), summed per source."""
    return tokens_by_source(scrape(url.removeprefix("http://")))


def engine_prompt_tokens(samples: list[Sample], started: dict[str, float]) -> tuple[float, float]:
    """(prompt tokens, of them found computed already) by a vLLM engine's own count of each prompt
    token's source, less ``started`` (its counts at a start line); a KV load counts as computed."""
    by = {k: v - started.get(k, 0.0) for k, v in tokens_by_source(samples).items()}
    return sum(by.values()), by.get("local_cache_hit", 0.0) + by.get("external_kv_transfer", 0.0)


def tokens_by_source(samples: list[Sample]) -> dict[str, float]:
    """vllm:prompt_tokens_by_source_total among ``scrape``'s samples, summed per source."""
    out: dict[str, float] = {}
    for s in samples:
        if s.name == "vllm:prompt_tokens_by_source_total" and "source" in s.labels:
            out[s.labels["source"]] = out.get(s.labels["source"], 0.0) + s.value
    return out


def nixl_servers(model: str, cores: list[int], max_model_len: int, fixed: bool
                 ) -> list[tuple[str, list[str], dict[str, str], int]]:
    """vLLM's NixlConnector kv_producer (prefill) and kv_consumer (decode), each on its half of the
    cores like Tandem's 1:1: (role, command, env, port) for each. ``fixed`` loads bench/nixl-fixes/
    (affinity kept, NIXL's progress thread paced instead of busy-polling) and Tandem's UCX transports."""
    pre_cores, dec_cores = core_plan(1, 1, cores)
    servers = []
    for role, bind in (("producer", pre_cores), ("consumer", dec_cores)):
        port = free_port()
        kv = ('{"kv_connector":"NixlConnector","kv_role":"kv_%s","kv_buffer_device":"cpu"}' % role)
        kv_flags, kv_env = Memory.vllm_flags(MEMORY.kv_cache_gib if role == "producer" else MEMORY.decode_gib)
        cmd = _vllm_server(model, max_model_len, port, "--kv-transfer-config", kv, *kv_flags)
        if fixed:  # the whole server on its cores, as Tandem pins its nodes (see tandem.cli.cmd_node)
            cmd = ["taskset", "-c", bind, *cmd]
        env = {**kv_env, "VLLM_CPU_OMP_THREADS_BIND": bind,
               "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}
        if fixed:  # the UCX transports Tandem uses; as shipped, UCX picks its own
            env["UCX_TLS"] = DEFAULT_CPU_UCX_TLS
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(NIXL_FIXES), os.environ.get("PYTHONPATH")) if p)
        servers.append((role, cmd, env, port))
    return servers


def start_vllm_nixl(model: str, cores: list[int], max_model_len: int, log_dir: Path, fixed: bool) -> System:
    """vLLM's own disaggregation (see nixl_servers) behind the P/D proxy."""
    check_nixl()
    name = "vllm-nixl-fixed" if fixed else "vllm-nixl"
    procs = Processes()
    commands, urls = [], []
    for role, cmd, env, port in nixl_servers(model, cores, max_model_len, fixed):
        procs.spawn(cmd, env, log_dir / f"{name}-{role}.log")
        commands.append(_shown(env, cmd))
        urls.append(f"http://127.0.0.1:{port}")
    # held until the proxy listens on it (SO_REUSEPORT): the two servers starting beside it pick ports
    # of their own (ZMQ, NIXL's side channel) and must not take this one in the meantime
    with reserve_port() as reservation:
        port = reservation.getsockname()[1]
        cmd = [sys.executable, "-m", "tandem.bench.pd_proxy", "--prefill", urls[0], "--decode", urls[1],
               "--port", str(port)]
        procs.spawn(cmd, {}, log_dir / f"{name}-proxy.log")
        commands.append(_shown({}, cmd))
        url = f"http://127.0.0.1:{port}"
        procs.wait(url)
    notes = ["the decode server computes every output token, the first included, after pulling the KV: "
             "its TTFT includes the transfer (vLLM's toy-proxy flow)"]
    if fixed:
        notes.append("each server runs whole on its cores (taskset), as Tandem's nodes do, and UCX gets "
                     f"Tandem's transports (UCX_TLS={DEFAULT_CPU_UCX_TLS})")
        notes.append("fixes loaded from bench/nixl-fixes/sitecustomize.py: the worker's sched_setaffinity may "
                     "only narrow its cores (as shipped it moves the forward thread to the machine's last "
                     "core), and NIXL's progress thread sleeps 100 us between polls (as shipped it polls "
                     "without pause and keeps a core busy, idle or not)")
    return System(name, url, commands, f"{vllm_version()}, {nixl_version()}", procs.stop, notes,
                  facts=lambda: {"decode_prompt_tokens_by_source": prompt_tokens_by_source(urls[1])})


DECODE_CORES = "@decode"  # in a variant's coordinator flags: the first decode node's cores, once planned

# variant -> (coordinator flags, node flags)
TANDEM_VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    # as shipped: admission on (by each request's SLO), conditional disaggregation and colocation
    # on, the prefill queue held at the coordinator in deadline-slack order
    "": ([], []),
    "-noadmit": (["--admission", "off"], []),
    "-headroom": (["--admission-headroom", "0.1"], []),  # TPOT checked against 90 % of its objective
    "-margin": (["--admission-overload-margin", "0.25"], []),  # a TPOT margin under overload (pressure.py)
    # each newcomer checked against its own objective only (running streams' budgets not protected)
    "-unprotected": (["--protect-streams", "off"], []),
    # admission that does not predict the wait for room in a decode node's KV cache
    "-roomblind": (["--kv-room", "off"], []),
    # nodes whose KV store hits load before the step that computes the prompt's rest, not beside it
    "-syncload": ([], ["--kvstore-load", "sync"]),
    # nodes whose engine step does not wait for chunks coming up from disk (asked again each step)
    "-nopromotewait": ([], ["--kvstore-promote-wait-ms", "0"]),
    "-disagg": (["--admission", "off", "--conditional-disagg", "off", "--colocate", "off"], []),
    "-nolocal": (["--conditional-disagg", "off", "--colocate", "off"], []),  # admission on, always disaggregated
    # a prefill node serves a request whole when the disaggregated choice would miss its SLO (as
    # shipped since the forty-first sitting; the variant names it)
    "-colocate": (["--colocate", "on"], []),
    "-nocolocate": (["--colocate", "off"], []),  # never: the shipped code until then
    # with no prefill on the decode node: overflow goes to the prefill node's spare time only
    "-colocateonly": (["--colocate", "on", "--conditional-disagg", "off"], []),
    "-fifo": (["--prefill-order", "fifo"], []),  # every prefill sent at once, the engine's arrival order
    # every prefill sent at once, vLLM's priority scheduling by deadline
    "-engine": (["--prefill-order", "engine"], ["--scheduling-policy", "priority"]),
    # prefix-aware routing (the default) against routing that ignores what the nodes' KV stores hold
    "-leastloaded": (["--routing", "least-loaded"], []),
    "-random": (["--routing", "random"], []),
    # decode engines that take vLLM's own per-step budget on this backend (2048 tokens, as colocated
    # vLLM's) instead of Tandem's 256: a prompt they prefill goes in fewer, longer steps
    "-bigstep": ([], ["--max-num-batched-tokens", "2048"]),
    # engines that start a prompt in whatever budget a step has left, beside another prompt's last
    # chunk (vLLM's own scheduling; Tandem's nodes until the forty-sixth sitting)
    "-sharedsteps": ([], ["--prompt-steps", "shared"]),
    # TTFT predictions from the fit and its calibration only, not scaled by how fast the node runs
    # now (its pace, logged all the same; as shipped until the forty-seventh sitting)
    "-nopace": (["--pace", "off"], []),
    # the coordinator on the first decode node's cores instead of the first prefill node's: whether
    # its work (admission, the token relay) slows the prefills it shares a core with
    "-coordondecode": (["--cores", DECODE_CORES], []),
}


def scrape(address: str) -> list[Sample]:
    """Every sample on a daemon's metrics endpoint (host:port)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of a metric's samples (``scrape``'s) with these labels."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def cache_facts(cluster: LocalCluster, started: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Where the prefill nodes' prompt tokens came from, and how the prefills were spread over them
    (with no prefill pool, 0:N: the decode nodes', by their engines' own count of each prompt
    token's source, less ``started``, those counts when the cluster was up: the engines' startup
    profile; every prompt there is theirs to prefill, so a KV-store load counts as cached)."""
    prompt = cached = preempted = load_s = loads = 0.0
    per_node, hits, misses = {}, 0.0, 0.0
    alone = not any(d.role == "prefill" for d in cluster.nodes)
    for d in cluster.nodes:
        url = d.info["metrics"]
        got = scrape(url)
        # Streams the engines preempted (out of KV blocks: recomputed later), every node's.
        preempted += metric_sum(got, "vllm:num_preemptions_total")
        # What the KV store's loads took (copies between its RAM tier and the engine's blocks).
        load_s += metric_sum(got, "tandem_kvstore_copy_seconds_sum", direction="load")
        loads += metric_sum(got, "tandem_kvstore_copy_seconds_count", direction="load")
        if d.role != ("decode" if alone else "prefill"):
            continue
        if alone:
            p, c = engine_prompt_tokens(got, (started or {}).get(d.name, {}))
            prompt, cached = prompt + p, cached + c
            per_node[d.name] = int(metric_sum(got, "tandem_decode_local_prefills_total"))
        else:
            prompt += metric_sum(got, "tandem_prefill_prompt_tokens_total")
            cached += metric_sum(got, "tandem_prefill_cached_tokens_total")
            per_node[d.name] = int(metric_sum(got, "tandem_prefill_requests_total", outcome="ok"))
        hits += metric_sum(got, "tandem_kvstore_hits_total", tier="ram")  # a disk hit is loaded from RAM too
        misses += metric_sum(got, "tandem_kvstore_misses_total")
    out: dict[str, Any] = {"prefill_prompt_tokens": int(prompt), "prefill_cached_tokens": int(cached),
                           "prefill_token_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
                           "prefills_per_node": per_node, "engine_preemptions": int(preempted)}
    if hits or misses:
        out["kvstore_chunk_hit_rate"] = round(hits / (hits + misses), 4)
    if loads:
        out["kvstore_load_copy_ms_mean"] = round(load_s / loads * 1000, 3)
    return out


def replay_facts(log: Path) -> dict[str, Any]:
    """Admission's TTFT error replayed on the run's own requests with each calibration form
    (bench/forecast_ttft.py's ``replay_ttft``), from the coordinator's log: what the report's
    calibration table shows. Nothing when the log has too few finished requests."""
    from tandem.bench.forecast_ttft import replay_ttft

    if not log.exists():
        return {}
    try:
        replay = replay_ttft(str(log))
    except Exception as exc:  # (a log it cannot read must not cost the system's other facts)
        return {"ttft_replay_error": repr(exc)}
    return {"ttft_replay": {where: {k: round(v, 4) for k, v in r.items()} for where, r in replay.items()}} \
        if replay else {}


def prefills_on_decode_nodes(flags: list[str]) -> bool:
    """Whether a coordinator started with these flags (and this environment) lets its decode nodes
    prefill: read by the coordinator's own argument parser, as the coordinator will read them."""
    import argparse

    from tandem.coordinator.main import add_coordinator_args

    ap = argparse.ArgumentParser(prog="tandem coordinator", add_help=False)
    add_coordinator_args(ap)
    return ap.parse_known_args(flags)[0].conditional_disagg != "off"


def coordinator_argv(variant: str, plan: list[str], num_prefill: int, extra: list[str]) -> list[str]:
    """The coordinator's flags for a variant on nodes pinned by ``plan`` (prefill nodes' cores
    first): the variant's, then ``extra``; ``--cores`` the first prefill node's unless they say."""
    flags = [plan[num_prefill] if f == DECODE_CORES else f for f in TANDEM_VARIANTS[variant][0] + extra]
    if num_prefill and not any(f == "--cores" or f.startswith("--cores=") for f in flags):
        flags += ["--cores", plan[0]]
    return flags


def start_tandem(model: str, num_prefill: int, num_decode: int, max_model_len: int, log_dir: Path,
                 cores: list[int], variant: str = "", coordinator_flags: list[str] | None = None) -> System:
    """Tandem at P:D, its variant's flags, then ``coordinator_flags`` (compare's --tandem-flags). Its
    coordinator runs on the first prefill node's cores unless those flags say where (``--cores``):
    left to float on a host whose nodes are pinned, it took the decode node's core whenever the
    prefill core was busy, and the decode node's streams missed TPOT more often (the fortieth
    sitting's runs with colocation); 0:N, no prefill node: it floats."""
    plan = core_plan(num_prefill, num_decode, cores)
    flags = coordinator_argv(variant, plan, num_prefill, coordinator_flags or [])
    store_dir = Path(MEMORY.kvstore_root) / f"{num_prefill}p{num_decode}d{variant}" if MEMORY.kvstore_root else None
    if store_dir is not None:
        shutil.rmtree(store_dir, ignore_errors=True)  # every system starts cold: nothing from a run before
    spec = ClusterSpec(model=model, num_prefill=num_prefill, num_decode=num_decode, max_model_len=max_model_len,
                       kv_cache_gib=MEMORY.kv_cache_gib, decode_kv_cache_gib=MEMORY.decode_kv_cache_gib,
                       cores=plan,
                       log_dir=str(log_dir / f"tandem-{num_prefill}p{num_decode}d{variant}"),
                       kvstore_ram_gib=MEMORY.kvstore_ram_gib,
                       kvstore_root=str(store_dir or ""),
                       extra_coordinator_args=flags,
                       extra_node_args=TANDEM_VARIANTS[variant][1])
    cluster = LocalCluster(spec).start()
    # 0:N: the decode engines' own prompt-token counts already hold their startup profile's
    started = {d.name: prompt_tokens_by_source(f"http://{d.info['metrics']}") for d in cluster.nodes} \
        if num_prefill == 0 else {}
    cmds = [cluster.coordinator.argv[1:]] + [d.argv[1:] for d in cluster.nodes]  # type: ignore[union-attr]
    from tandem import __version__

    log = Path(spec.log_dir) / "coordinator.log"
    return System(f"tandem-{num_prefill}:{num_decode}{variant}", cluster.http_url, cmds,
                  f"tandem {__version__} on {vllm_version()}", cluster.stop,
                  facts=lambda: {**cache_facts(cluster, started), **replay_facts(log)},
                  nodes={d.name: d.info["grpc"] for d in cluster.nodes})
