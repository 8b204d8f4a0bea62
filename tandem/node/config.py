"""Configuration of a prefill or decode node: one dataclass, filled from flags and environment."""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tandem.kvstore.arena import EVICTIONS
from tandem.membership import DEFAULT_TTL_S, add_etcd_tls_args, check_etcd_tls
from tandem.tls import TlsConfig, add_tls_args


DECODE_STEP_TOKENS = 256
# The lines a supervisor (tandem up, tests) follows in a node's output: ready (with its addresses),
# and starting again in place (a role switch; not ready until its next READY line).
READY_LINE = "TANDEM_READY"
RESTARTING_LINE = "TANDEM_RESTARTING"
# What a node still holds, by its own metrics: while any of these is above 0, a drain waits.
BUSY_METRICS = ("tandem_prefill_inflight", "tandem_decode_inflight", "tandem_kv_blocks_held")


@dataclass
class NodeConfig:
    role: str
    model: str
    etcd: str
    cluster: str = "default"
    node_id: str = ""
    served_model_name: str = ""
    host: str = "127.0.0.1"
    grpc_port: int = 0
    kv_port: int = 0
    kv_advertise: str = ""  # host:port put in KV handles; empty: host:kv_port
    kv_secret_file: str = ""  # the cluster's KV secret (kvtransfer/capability.py); empty: unauthenticated
    tls_cert: str = ""  # tandem/tls.py: TLS on the node's gRPC port, clients' certificates required with a CA
    tls_key: str = ""
    tls_ca: str = ""
    tls_server_name: str = ""  # a decode node verifies prefill nodes' KV ports as this name (kvtransfer/secure.py)
    etcd_ca: str = ""  # an https:// etcd (membership.py)
    etcd_cert: str = ""
    etcd_key: str = ""
    metrics_port: int = 0
    cores: str = ""
    kv_cache_gib: float = 1.0  # fractions too (benchmarks shrink the engine's cache below a working set)
    # A decode engine's, when it differs (it holds the running batch): a node `tandem role` switches
    # takes the size of its new role. 0: kv_cache_gib.
    decode_kv_cache_gib: float = 0.0
    max_model_len: int = 0
    block_size: int = 32
    dtype: str = "float32"
    transport: str = "auto"
    lease_s: float = 30.0
    ttl_s: int = DEFAULT_TTL_S
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 0  # tokens one engine step may take; 0: decode 256, prefill vLLM's default
    enable_prefix_caching: bool = True
    engine_args: dict = field(default_factory=dict)  # vLLM's own flags from the command line (engine_args.py)
    kv_load_failure_policy: str = "fail"
    scheduling_policy: str = "fcfs"  # the engine's: fcfs | priority (the coordinator's --prefill-order engine)
    prompt_steps: str = "own"  # own: a prompt starts in a step no other prompt's chunk is in | shared (vLLM's)
    drain_grace_s: float = 30.0
    profile: str = "auto"  # startup profile: auto (cached or run) | fresh | off
    profile_cache: str = ""  # directory of cached profiles; empty: ~/.cache/tandem/profiles
    # The node's KV store (tandem.kvstore): a RAM tier shared by the engine's processes, and a disk
    # tier under it. 0 GiB of RAM: off.
    kvstore_ram_gib: float = 0.0
    kvstore_dir: str = ""
    kvstore_disk_gib: float = 10.0
    kvstore_chunk_tokens: int = 256
    kvstore_save: bool = True
    kvstore_eviction: str = "tail-first"
    kvstore_load: str = "async"  # a hit in the KV store's RAM tier: copied in beside the step (async) or before it
    kvstore_promote_wait_ms: float = 20.0  # how long a lookup waits in the step for chunks coming up from disk
    # Publish the engine's prefix cache (vLLM's KV events) to coordinators, for prefix-aware routing.
    engine_kv_events: bool = True
    # A simulated node (tandem/node/simengine.py): no engine, times from this profile file.
    simulate: str = ""

    @property
    def tls(self) -> TlsConfig:
        return TlsConfig(self.tls_cert, self.tls_key, self.tls_ca, server_name=self.tls_server_name)

    def finish(self) -> NodeConfig:
        """Fill derived defaults and check everything; raise ValueError with a clear message."""
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {self.role!r}")
        if not self.model or not Path(self.model).is_dir():
            raise ValueError(f"--model must be a local Hugging Face model directory, got {self.model!r}")
        if not self.etcd:
            raise ValueError("--etcd (or TANDEM_ETCD) is required, e.g. http://127.0.0.1:2379")
        if self.transport not in ("auto", "ucx", "tcp"):
            raise ValueError(f"--kv-transport must be auto, ucx or tcp, got {self.transport!r}")
        if self.kv_load_failure_policy not in ("fail", "recompute"):
            raise ValueError(f"--kv-load-failure-policy must be fail or recompute, got {self.kv_load_failure_policy!r}")
        if self.prompt_steps not in ("own", "shared"):
            raise ValueError(f"--prompt-steps must be own or shared, got {self.prompt_steps!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"--scheduling-policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if self.max_num_batched_tokens < 0:
            raise ValueError(f"--max-num-batched-tokens must be >= 0, got {self.max_num_batched_tokens}")
        if not self.max_num_batched_tokens and self.role == "decode":
            # A prefill on the decode node (conditional disaggregation) goes in chunks this size,
            # so the streams it decodes meanwhile keep their pace.
            self.max_num_batched_tokens = max(DECODE_STEP_TOKENS, self.max_num_seqs)
        if self.max_num_batched_tokens and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be at least "
                             f"--max-num-seqs ({self.max_num_seqs})")
        if self.kv_cache_gib <= 0 or self.decode_kv_cache_gib < 0:
            raise ValueError(f"--kv-cache-gib must be positive and --decode-kv-cache-gib >= 0, got "
                             f"{self.kv_cache_gib} and {self.decode_kv_cache_gib}")
        if self.role == "decode" and self.decode_kv_cache_gib:
            self.kv_cache_gib = self.decode_kv_cache_gib
        if self.lease_s <= 0 or self.ttl_s <= 0:
            raise ValueError("--kv-lease-s and --ttl-s must be positive")
        self.tls.check("node")
        check_etcd_tls(self.etcd, self.etcd_cert, self.etcd_key, self.etcd_ca)
        if self.kv_secret_file:
            from tandem.kvtransfer.capability import load_secret

            try:
                load_secret(self.kv_secret_file)  # ValueError: short, or readable by others
            except OSError as exc:
                raise ValueError(f"--kv-secret-file: {exc}") from exc
        if self.kv_advertise:
            from tandem.kvtransfer.wire import parse_address

            parse_address(self.kv_advertise)  # ValueError names the expected form
        if self.profile not in ("auto", "fresh", "off"):
            raise ValueError(f"--profile must be auto, fresh or off, got {self.profile!r}")
        if not self.profile_cache:
            from tandem.profile import default_cache_dir

            self.profile_cache = str(default_cache_dir())
        if self.drain_grace_s < 0:
            raise ValueError(f"--drain-grace-s must be >= 0, got {self.drain_grace_s}")
        if self.cores:
            check_cores(self.cores)
        if self.kvstore_ram_gib < 0 or self.kvstore_disk_gib < 0:
            raise ValueError("--kvstore-ram-gib and --kvstore-disk-gib must be >= 0")
        if self.kvstore_promote_wait_ms < 0:
            raise ValueError(f"--kvstore-promote-wait-ms must be >= 0, got {self.kvstore_promote_wait_ms}")
        if self.kvstore_load not in ("sync", "async"):
            raise ValueError(f"--kvstore-load must be sync or async, got {self.kvstore_load!r}")
        if self.kvstore_dir and not self.kvstore_ram_gib:
            raise ValueError("--kvstore-dir needs a RAM tier too (--kvstore-ram-gib): disk chunks are "
                             "loaded through it")
        if self.kvstore_ram_gib and (self.kvstore_chunk_tokens <= 0 or self.kvstore_chunk_tokens % self.block_size):
            raise ValueError(f"--kvstore-chunk-tokens ({self.kvstore_chunk_tokens}) must be a positive multiple "
                             f"of --block-size ({self.block_size})")
        if self.kvstore_dir:
            self.kvstore_dir = str(Path(self.kvstore_dir).expanduser().resolve())
        if self.simulate:
            if self.kvstore_ram_gib:
                raise ValueError("--simulate: a simulated node has no KV store (--kvstore-ram-gib must be 0)")
            from tandem.timings import Timings

            from tandem.node.simengine import model_facts

            try:
                Timings.load(self.simulate)
            except (OSError, ValueError) as exc:
                raise ValueError(f"--simulate {self.simulate}: {exc}") from None
            model_facts(self.model)  # the model's shape, which the node announces (ValueError names the file)
        if not self.node_id:
            self.node_id = f"{self.role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        if not self.served_model_name:
            self.served_model_name = Path(self.model).name
        return self

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def parse_cores(spec: str) -> set[int]:
    """'0', '0-3', '0,2,4-5' -> a set of core ids; ValueError naming the bad part."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--cores {spec!r}: {part!r} is not a core or a range like 0-3") from None
        if a < 0 or b < a:
            raise ValueError(f"--cores {spec!r}: {part!r} is not a valid range")
        out.update(range(a, b + 1))
    return out


def check_cores(spec: str) -> None:
    """ValueError unless ``spec`` parses and every core in it is one this process may run on."""
    missing = parse_cores(spec) - set(os.sched_getaffinity(0))
    if missing:
        raise ValueError(f"--cores {spec}: cores {sorted(missing)} are not available to this "
                         f"process (it may use {sorted(os.sched_getaffinity(0))})")


def pin_threads(pid: int | str, cores: set[int]) -> None:
    """Every thread of a process on ``cores`` (processes it starts later inherit them)."""
    for tid in os.listdir(f"/proc/{pid}/task"):  # threads started by imports too, not only the main one
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def pin_process(spec: str) -> None:
    """This process whole on the cores of ``spec``: a node, its engine's core and worker
    processes included."""
    pin_threads("self", parse_cores(spec))


def core_spec(cores: list[int] | set[int]) -> str:
    """The inverse of parse_cores: [0, 1, 2, 5] -> '0-2,5' (what --cores and vLLM's
    VLLM_CPU_OMP_THREADS_BIND take)."""
    spans: list[list[int]] = []
    for c in sorted(cores):
        if spans and c == spans[-1][1] + 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)


def _env(name: str, default: object) -> object:
    return os.environ.get(f"TANDEM_{name.upper()}", default)


def add_node_args(ap: argparse.ArgumentParser) -> None:
    """Flags of `tandem prefill` / `tandem decode`; each has a TANDEM_<NAME> variable."""
    ap.add_argument("--model", default=_env("model", ""), help="local HF model dir (TANDEM_MODEL)")
    ap.add_argument("--etcd", default=_env("etcd", ""), help="etcd URL (TANDEM_ETCD)")
    ap.add_argument("--cluster", default=_env("cluster", "default"))
    ap.add_argument("--node-id", default=_env("node_id", ""))
    ap.add_argument("--served-model-name", default=_env("served_model_name", ""))
    ap.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to listen on and advertise")
    ap.add_argument("--grpc-port", type=int, default=_env("grpc_port", 0))
    ap.add_argument("--kv-port", type=int, default=_env("kv_port", 0))
    ap.add_argument("--kv-advertise", default=_env("kv_advertise", ""),
                    help="HOST:PORT that decode nodes dial for this node's KV, when they reach it through "
                         "something in between (a NAT, a proxy); default HOST:KV_PORT")
    add_tls_args(ap)
    add_etcd_tls_args(ap)
    ap.add_argument("--kv-secret-file", default=_env("kv_secret_file", ""),
                    help="the cluster's KV secret (the same file on every node, mode 600): each KV handle "
                         "carries a capability signed with it, and this node's block server sends blocks only "
                         "for a valid one. Without it the KV port serves anyone who names a held request.")
    ap.add_argument("--metrics-port", type=int, default=_env("metrics_port", 0))
    ap.add_argument("--cores", default=_env("cores", ""), help="CPU cores the whole node runs on (daemon, vLLM engine core and worker), e.g. 0 or 0-3")
    ap.add_argument("--kv-cache-gib", type=float, default=_env("kv_cache_gib", 1),
                    help="the engine's KV cache, GiB, fractions too (VLLM_CPU_KVCACHE_SPACE on CPU)")
    ap.add_argument("--decode-kv-cache-gib", type=float, default=_env("decode_kv_cache_gib", 0),
                    help="the engine's KV cache while the node is a decode node, when that should differ "
                         "(the running batch lives there; `tandem role` may switch the node); 0: --kv-cache-gib")
    ap.add_argument("--max-model-len", type=int, default=_env("max_model_len", 0))
    ap.add_argument("--block-size", type=int, default=_env("block_size", 32))
    ap.add_argument("--dtype", default=_env("dtype", "float32"))
    ap.add_argument("--kv-transport", dest="transport", default=_env("kv_transport", "auto"),
                    help="auto (UCX, else TCP with a warning) | ucx | tcp")
    ap.add_argument("--kv-lease-s", dest="lease_s", type=float, default=_env("kv_lease_s", 30.0))
    ap.add_argument("--ttl-s", type=int, default=_env("ttl_s", DEFAULT_TTL_S))
    ap.add_argument("--max-num-seqs", type=int, default=_env("max_num_seqs", 64))
    ap.add_argument("--max-num-batched-tokens", type=int, default=_env("max_num_batched_tokens", 0),
                    help="tokens one engine step may take (vLLM's chunked-prefill budget); decode nodes "
                         f"default to {DECODE_STEP_TOKENS}, so a prompt they prefill themselves goes in "
                         "chunks beside the streams they decode; prefill nodes to vLLM's default")
    ap.add_argument("--drain-grace-s", type=float, default=_env("drain_grace_s", 30.0),
                    help="on SIGTERM, how long to finish what the node holds before it exits")
    ap.add_argument("--profile", default=_env("profile", "auto"),
                    help="the engine's startup profile, which the coordinator predicts TTFT and TPOT from: "
                         "auto (use the cached one for this model, hardware and settings, or profile now, "
                         "a few seconds, and cache it) | fresh (profile again) | off")
    ap.add_argument("--profile-cache", default=_env("profile_cache", ""),
                    help="directory of cached profiles (default ~/.cache/tandem/profiles)")
    ap.add_argument("--scheduling-policy", default=_env("scheduling_policy", "fcfs"),
                    help="the engine's queue order: fcfs (arrival) | priority (lowest PrefillRequest.priority "
                         "first: run prefill nodes so for the coordinator's --prefill-order engine)")
    ap.add_argument("--prompt-steps", default=_env("prompt_steps", "own"), choices=["own", "shared"],
                    help="own: a prompt the engine computes starts in a step that carries no other prompt's "
                         "chunk, so its first token never waits for a prompt sent after it "
                         "(kvtransfer/scheduler_side.py: PromptSteps) | shared: vLLM's own scheduling, a new "
                         "prompt fills whatever budget the step has left")
    ap.add_argument("--kv-load-failure-policy", default=_env("kv_load_failure_policy", "fail"),
                    help="decode nodes, when a request's KV cannot be fetched: fail (that request ends with "
                         "ABORTED and the coordinator prefills it again elsewhere) | recompute (prefill it here)")
    ap.add_argument("--kvstore-ram-gib", type=float, default=_env("kvstore_ram_gib", 0.0),
                    help="the KV store's RAM tier (shared memory, reserved at start): prompts' KV kept after "
                         "their requests end and loaded instead of recomputed when a prompt starts the same "
                         "way; 0: no KV store")
    ap.add_argument("--kvstore-dir", default=_env("kvstore_dir", ""),
                    help="the KV store's disk tier: a directory of its own per node (survives restarts; "
                         "see `tandem kvstore stats|clear`); empty: RAM only")
    ap.add_argument("--kvstore-disk-gib", type=float, default=_env("kvstore_disk_gib", 10.0),
                    help="the disk tier's cap (least recently used chunks go first)")
    ap.add_argument("--kvstore-chunk-tokens", type=int, default=_env("kvstore_chunk_tokens", 256),
                    help="tokens per stored chunk, a multiple of --block-size (a prompt's partial last chunk "
                         "is not stored)")
    ap.add_argument("--kvstore-save", default=_env("kvstore_save", "on"), choices=["on", "off"],
                    help="off: only load what the store holds, never add to it")
    ap.add_argument("--engine-kv-events", default=_env("engine_kv_events", "on"), choices=["on", "off"],
                    help="tell coordinators what the engine's own prefix cache holds (vLLM's KV events), "
                         "so prefix-aware routing credits it")
    ap.add_argument("--kvstore-eviction", default=_env("kvstore_eviction", "tail-first"), choices=list(EVICTIONS),
                    help="the RAM tier's eviction policy: tail-first (least recently used first, a prompt's "
                         "later chunks before its earlier ones, which other prompts share), lru, fifo")
    ap.add_argument("--kvstore-load", default=_env("kvstore_load", "async"), choices=["async", "sync"],
                    help="a prompt's chunks found in the KV store's RAM tier: copied into its blocks beside the "
                         "step, the prompt waiting a step for them (async), or before the step that computes "
                         "the rest (sync; measured no better yet, see docs/PERFORMANCE.md)")
    ap.add_argument("--kvstore-promote-wait-ms", type=float, default=_env("kvstore_promote_wait_ms", 20.0),
                    help="a prompt's chunks found on the KV store's disk tier: how long the engine's step waits "
                         "for them to come up to RAM, so they load in that step (the step's other requests "
                         "wait with it); 0: the request is asked again each step until they are up")
    ap.add_argument("--simulate", default=_env("simulate", ""), metavar="PROFILE",
                    help="a simulated node for load tests and the simulator's checks: the real daemon, API "
                         "and registration, no engine; its times come from PROFILE (a node's cached profile "
                         "file or {prefill, decode, transfer} coefficients) and its KV handles are fake "
                         "(only simulated decode nodes take them)")


def config_from_args(role: str, args: argparse.Namespace) -> NodeConfig:
    fields = NodeConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields and k != "role"}
    for flag in ("kvstore_save", "engine_kv_events"):
        if flag in values:
            values[flag] = values[flag] in ("on", True)
    if "enable_prefix_caching" in values.get("engine_args", {}):  # vLLM's flag: the node's setting too
        values["enable_prefix_caching"] = bool(values["engine_args"]["enable_prefix_caching"])
    return NodeConfig(role=role, **values).finish()
