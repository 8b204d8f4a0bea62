"""The coordinator daemon: membership view + router + pipeline behind gRPC and OpenAI HTTP."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from tandem.grpcserve import StopSignals, start_grpc
from tandem.membership import MembershipView, add_etcd_tls_args, check_etcd_tls, use_etcd_tls
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.tls import TlsConfig, add_tls_args

from .admission import COLOCATE, MODES, Admission, Slo
from .callstream import call_mode_of
from .nodeclient import PACES
from .prefillq import ORDERS, PrefillOrder
from .traffic import BatchQueue, Quotas, parse_quotas
from .pressure import DEFAULT_MARGIN
from .trials import DEFAULT_TRIAL_S
from .grpc_api import SERVICE_NAME, CoordinatorServicer
from .http_api import OpenAIHttp
from .pipeline import Pipeline
from .request import PipelineConfig
from .router import Router
from .workers import worker_index
from . import metrics
from .auth import ApiKeys, check_keys
from .textcodec import TextCodec

logger = logging.getLogger(__name__)


@dataclass
class CoordinatorConfig:
    model: str
    etcd: str
    cluster: str = "default"
    served_model_name: str = ""
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    max_model_len: int = 0
    prefill_timeout_s: float = 120.0
    decode_timeout_s: float = 1800.0
    stall_s: float = 3.0
    migration_limit: int = 2
    stream_interval: int = 1
    workers: int = 1
    node_calls: str = "stream"  # its calls to the nodes: on one stream a node, or a gRPC call each (callstream.py)
    pool_wait_s: float = 10.0
    probe_timeout_s: float = 1.0
    admission: str = "on"
    pace: str = "on"  # scale TTFT predictions by how fast each node runs now (nodeclient.py, PACES)
    admission_headroom: float = 0.0  # admit against the TPOT objective less this share
    protect_streams: str = "on"  # a newcomer may not push a running stream past its TPOT objective
    kv_room: str = "on"  # admission predicts the wait for room in a decode node's KV cache
    admission_candidates: int = 8  # the most nodes of each pool a request's predictions look at (0: all)
    admission_overload_margin: float = DEFAULT_MARGIN  # TPOT share kept free, x the recent share refused for load
    admission_trial_s: float = DEFAULT_TRIAL_S  # at most one close miss each this many seconds tried on idle nodes (0: none)
    conditional_disagg: str = "on"  # a decode node may prefill a request itself when that is predicted faster
    colocate: str = "on"  # a prefill node may serve a request whole (admission.COLOCATE)
    prefill_order: str = "slack"  # where the prefill queue lives and its order (prefillq.py)
    prefill_depth: int = 1  # with slack: requests each prefill node runs at a time
    routing: str = "prefix"  # how a prefill node is picked (prefix.py ROUTINGS)
    slo_ttft_ms: float = 0.0  # cluster default SLOs for requests that set none; 0: none
    slo_tpot_ms: float = 0.0
    tenant_quota: str = ""  # TENANT=TOKENS_PER_S,...
    default_tenant_quota: float = 0.0  # tokens/s for each tenant not named; 0: unlimited
    quota_burst_s: float = 10.0
    batch_queue: int = 256
    batch_max_wait_s: float = 300.0
    api_keys_file: str = ""  # TENANT=KEY lines (auth.py); TANDEM_API_KEYS adds keys from the environment
    tls_cert: str = ""  # tandem/tls.py: TLS on the gRPC and HTTP ports, mutual TLS to the nodes
    tls_key: str = ""
    tls_ca: str = ""
    tls_client_auth: str = "required"
    tls_server_name: str = ""
    tls_client_ca: str = ""
    etcd_ca: str = ""  # an https:// etcd (membership.py)
    etcd_cert: str = ""
    etcd_key: str = ""
    cores: str = ""  # CPU cores the coordinator (its workers too) runs on; empty: wherever the OS puts it

    @property
    def tls(self) -> TlsConfig:
        return TlsConfig(self.tls_cert, self.tls_key, self.tls_ca, self.tls_client_auth, self.tls_server_name,
                         self.tls_client_ca)

    def finish(self) -> CoordinatorConfig:
        if not self.model or not Path(self.model).is_dir():
            raise ValueError(f"--model must be the served model's local directory (for its tokenizer), got {self.model!r}")
        if not self.etcd:
            raise ValueError("--etcd (or TANDEM_ETCD) is required, e.g. http://127.0.0.1:2379")
        for name in ("prefill_timeout_s", "decode_timeout_s", "stall_s", "probe_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.admission not in MODES:
            raise ValueError(f"--admission must be on or off, got {self.admission!r}")
        if self.prefill_order not in ORDERS:
            raise ValueError(f"--prefill-order must be one of {', '.join(ORDERS)}, got {self.prefill_order!r}")
        from .prefix import ROUTINGS

        if self.routing not in ROUTINGS:
            raise ValueError(f"--routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.prefill_depth < 1:
            raise ValueError(f"--prefill-depth must be at least 1, got {self.prefill_depth}")
        if not 0.0 <= self.admission_headroom < 1.0:
            raise ValueError(f"--admission-headroom must be in [0, 1), got {self.admission_headroom}")
        if not 0.0 <= self.admission_overload_margin < 1.0:
            raise ValueError(f"--admission-overload-margin must be in [0, 1), got {self.admission_overload_margin}")
        if self.admission_headroom + self.admission_overload_margin >= 1.0:
            raise ValueError("--admission-headroom plus --admission-overload-margin must be below 1")
        if self.protect_streams not in ("on", "off"):
            raise ValueError(f"--protect-streams must be on or off, got {self.protect_streams!r}")
        if self.admission_candidates < 0:
            raise ValueError(f"--admission-candidates must be >= 0, got {self.admission_candidates}")
        if not (self.admission_trial_s >= 0 and math.isfinite(self.admission_trial_s)):
            raise ValueError(f"--admission-trial-s must be >= 0, got {self.admission_trial_s}")
        if self.kv_room not in ("on", "off"):
            raise ValueError(f"--kv-room must be on or off, got {self.kv_room!r}")
        if self.conditional_disagg not in ("on", "off"):
            raise ValueError(f"--conditional-disagg must be on or off, got {self.conditional_disagg!r}")
        if self.colocate not in COLOCATE:
            raise ValueError(f"--colocate must be one of {', '.join(COLOCATE)}, got {self.colocate!r}")
        parse_quotas(self.tenant_quota)  # ValueError naming the bad part
        if self.default_tenant_quota < 0 or self.quota_burst_s <= 0:
            raise ValueError("--default-tenant-quota must be >= 0 and --quota-burst-s positive")
        if self.batch_queue < 0 or self.batch_max_wait_s <= 0:
            raise ValueError("--batch-queue must be >= 0 and --batch-max-wait-s positive")
        if self.slo_ttft_ms < 0 or self.slo_tpot_ms < 0:
            raise ValueError("--slo-ttft-ms and --slo-tpot-ms must be >= 0 (0: no default SLO)")
        if self.migration_limit < 0 or self.pool_wait_s < 0:
            raise ValueError("--migration-limit and --pool-wait-s must be >= 0")
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be at least 1, got {self.stream_interval}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        call_mode_of(self.node_calls)  # ValueError naming the flag
        if self.pace not in PACES:
            raise ValueError(f"--pace must be on or off, got {self.pace!r}")
        if self.cores:
            from tandem.node.config import check_cores

            check_cores(self.cores)
        if self.api_keys_file and not Path(self.api_keys_file).is_file():
            raise ValueError(f"--api-keys-file {self.api_keys_file!r} is not a file")
        check_keys(self.api_keys_file)  # ValueError naming the entry, never the key
        self.tls.check("coordinator")
        check_etcd_tls(self.etcd, self.etcd_cert, self.etcd_key, self.etcd_ca)
        if not (Path(self.model) / "tokenizer.json").exists():
            import importlib.util

            if importlib.util.find_spec("transformers") is None:
                raise ValueError(f"{self.model} has no tokenizer.json, and transformers (which reads other "
                                 "tokenizers) is not installed: pip install 'tandem-serve[node]', or save the "
                                 "tokenizer as tokenizer.json")
        if not self.served_model_name:
            self.served_model_name = Path(self.model).name
        if not self.max_model_len:
            cfg = json.loads((Path(self.model) / "config.json").read_text())
            self.max_model_len = int(cfg.get("max_position_embeddings") or 2048)
        return self


def add_coordinator_args(ap: argparse.ArgumentParser) -> None:
    env = os.environ.get
    ap.add_argument("--model", default=env("TANDEM_MODEL", ""), help="served model dir, for its tokenizer")
    ap.add_argument("--etcd", default=env("TANDEM_ETCD", ""))
    ap.add_argument("--cluster", default=env("TANDEM_CLUSTER", "default"))
    ap.add_argument("--served-model-name", default=env("TANDEM_SERVED_MODEL_NAME", ""))
    ap.add_argument("--host", default=env("TANDEM_HOST", "127.0.0.1"))
    ap.add_argument("--grpc-port", type=int, default=env("TANDEM_GRPC_PORT", "50051"))
    ap.add_argument("--http-port", type=int, default=env("TANDEM_HTTP_PORT", "8000"))
    ap.add_argument("--max-model-len", type=int, default=env("TANDEM_MAX_MODEL_LEN", "0"))
    ap.add_argument("--prefill-timeout-s", type=float, default=env("TANDEM_PREFILL_TIMEOUT_S", "120"),
                    help="deadline of one Prefill call")
    ap.add_argument("--decode-timeout-s", type=float, default=env("TANDEM_DECODE_TIMEOUT_S", "1800"),
                    help="deadline of one Decode stream")
    ap.add_argument("--stall-s", type=float, default=env("TANDEM_STALL_S", "3"),
                    help="a call without progress this long gets a health probe; a node that fails it is "
                         "treated as dead")
    ap.add_argument("--migration-limit", type=int, default=env("TANDEM_MIGRATION_LIMIT", "2"),
                    help="times one request may move to another decode node after a failure (0: off)")
    ap.add_argument("--stream-interval", type=int, default=env("TANDEM_STREAM_INTERVAL", "1"),
                    help="tokens per streamed message after the first (vLLM's --stream-interval): 1 sends each "
                         "token at once; more relays more tokens per CPU second (the decode node's stream and "
                         "the client's) at the cost of burstier inter-token times")
    ap.add_argument("--workers", type=int, default=env("TANDEM_WORKERS", "1"),
                    help="coordinator processes behind the same gRPC and HTTP ports (SO_REUSEPORT), one core "
                         "each at most; /metrics sums them (coordinator/workers.py)")
    ap.add_argument("--node-calls", default=env("TANDEM_NODE_CALLS", "stream"),
                    help="stream: the Prefill and Decode calls to each node go as messages on one long-lived "
                         "stream (a message costs the coordinator ~30 us of CPU, a gRPC call ~1 ms) | call: a "
                         "gRPC call each (for comparison)")
    ap.add_argument("--pool-wait-s", type=float, default=env("TANDEM_POOL_WAIT_S", "10"),
                    help="how long a request waits for a node when its pool is briefly empty")
    ap.add_argument("--probe-timeout-s", type=float, default=env("TANDEM_PROBE_TIMEOUT_S", "1"))
    ap.add_argument("--admission", default=env("TANDEM_ADMISSION", "on"),
                    help="on: refuse (RESOURCE_EXHAUSTED / HTTP 429) a request that no node is predicted to "
                         "serve within its SLO | off: admit everything (for comparison)")
    ap.add_argument("--pace", default=env("TANDEM_PACE", "on"), choices=PACES,
                    help="on: scale each TTFT prediction by how fast the node has run over the last second "
                         "or so against its fitted model (what its load messages say) | off: by its fit "
                         "and learned calibration only (the reading is still logged, for comparison)")
    ap.add_argument("--admission-headroom", type=float, default=env("TANDEM_ADMISSION_HEADROOM", "0"),
                    help="admit only what is predicted to meet its TPOT objective less this share (a "
                         "decode batch grows after a request joins it; 0.1 measured no better than 0 "
                         "on the bench, see docs/PERFORMANCE.md)")
    ap.add_argument("--protect-streams", default=env("TANDEM_PROTECT_STREAMS", "on"),
                    help="on: admission refuses (or sends elsewhere) a request that would push a running stream "
                         "past its TPOT objective, from what each has left of it | off: each request is checked "
                         "against its own objective only (for comparison)")
    ap.add_argument("--kv-room", default=env("TANDEM_KV_ROOM", "on"),
                    help="on: admission predicts the wait for room in a decode node's KV cache (a prompt whose "
                         "blocks do not fit waits until running streams end) | off: not (for comparison)")
    ap.add_argument("--admission-candidates", type=int, default=env("TANDEM_ADMISSION_CANDIDATES", "8"),
                    help="the most nodes of each pool a request's predictions look at: those holding the most "
                         "of its prompt, then the least loaded; 0: every node (admission's cost per request "
                         "grows with the pool)")
    ap.add_argument("--admission-overload-margin", type=float,
                    default=env("TANDEM_ADMISSION_OVERLOAD_MARGIN", f"{DEFAULT_MARGIN:g}"),
                    help="under overload, admit against a tighter TPOT objective: less this share of it times the "
                         "share of the last ~10 s of requests refused for load (so ~0 at light load, near this "
                         "when nearly all are refused), for the served ones to keep their objective when the batch "
                         "is held at its edge, e.g. 0.25 (default 0: never; not shown to help on this project's "
                         "2-core runs)")
    ap.add_argument("--admission-trial-s", type=float, default=env("TANDEM_ADMISSION_TRIAL_S", f"{DEFAULT_TRIAL_S:g}"),
                    help="a request predicted to miss its SLO by at most 1.5x, whose nodes are idle, is served "
                         "anyway as a trial, at most one each this many seconds: a node's model learns only from "
                         "what it serves, so one that reads the node slow would otherwise refuse for good "
                         "(0: never: every predicted miss is refused)")
    ap.add_argument("--conditional-disagg", default=env("TANDEM_CONDITIONAL_DISAGG", "on"),
                    help="on: a decode node prefills a request itself when that is predicted to start it "
                         "clearly sooner (or to meet its SLO where the prefill pool would not) without "
                         "pushing its running streams past the TPOT objective | off: always disaggregated")
    ap.add_argument("--colocate", default=env("TANDEM_COLOCATE", "on"),
                    help="on (default): a prefill node serves a request whole (prefills and decodes it, no KV "
                         "moved) when the disaggregated choice is predicted to miss its SLO and that is not, without pushing "
                         "the node's running streams past their TPOT objective: the prefill pool's spare time "
                         "decodes | always: every request a prefill node is predicted to serve within its SLO "
                         "that way (the prefill pool as colocated engines, for comparison) | off: never (always "
                         "disaggregated, or prefilled on a decode node: --conditional-disagg)")
    ap.add_argument("--prefill-order", default=env("TANDEM_PREFILL_ORDER", "slack"),
                    help="slack: requests wait here and each prefill node gets --prefill-depth at a time, "
                         "earliest deadline first among those that can still meet their TTFT objective | "
                         "engine: sent at once with the deadline as vLLM priority (prefill nodes run "
                         "--scheduling-policy priority) | fifo: sent at once, run in arrival order")
    ap.add_argument("--routing", default=env("TANDEM_ROUTING", "prefix"),
                    help="how a prefill node is picked: prefix (the lowest predicted TTFT, counting the "
                         "prompt's prefix its KV store holds as loaded, not computed) | least-loaded (the "
                         "same without that credit) | random (for comparison)")
    ap.add_argument("--prefill-depth", type=int, default=env("TANDEM_PREFILL_DEPTH", "1"),
                    help="with --prefill-order slack: prefills each node runs at a time")
    ap.add_argument("--cores", default=env("TANDEM_CORES", ""),
                    help="CPU cores the coordinator runs on, its --workers too, e.g. 0 or 0-1 (default: any). "
                         "Where it shares a host with nodes pinned by their --cores, pin it too, beside the "
                         "prefill nodes: left free it takes the decode nodes' cores when the prefill cores are "
                         "busy, and their streams' steps slow")
    ap.add_argument("--tenant-quota", default=env("TANDEM_TENANT_QUOTA", ""),
                    help="token quotas, TENANT=TOKENS_PER_SECOND,... (a request costs prompt + max_tokens)")
    ap.add_argument("--default-tenant-quota", type=float, default=env("TANDEM_DEFAULT_TENANT_QUOTA", "0"),
                    help="tokens/s for each tenant --tenant-quota does not name, each on its own (0: unlimited)")
    ap.add_argument("--quota-burst-s", type=float, default=env("TANDEM_QUOTA_BURST_S", "10"),
                    help="a tenant may burst this many seconds of its quota")
    ap.add_argument("--batch-queue", type=int, default=env("TANDEM_BATCH_QUEUE", "256"),
                    help="batch requests that may wait for spare capacity; more are refused")
    ap.add_argument("--batch-max-wait-s", type=float, default=env("TANDEM_BATCH_MAX_WAIT_S", "300"),
                    help="a batch request that found no spare capacity this long is refused")
    ap.add_argument("--api-keys-file", default=env("TANDEM_API_KEYS_FILE", ""),
                    help="require an API key (Authorization: Bearer KEY) on every request; the file has one "
                         "TENANT=KEY a line and is read again when it changes. TANDEM_API_KEYS (TENANT=KEY,...) "
                         "adds keys from the environment. A request's tenant is its key's.")
    add_tls_args(ap, front_door=True)
    add_etcd_tls_args(ap)
    ap.add_argument("--slo-ttft-ms", type=float, default=env("TANDEM_SLO_TTFT_MS", "0"),
                    help="default TTFT objective for requests that set none (0: none)")
    ap.add_argument("--slo-tpot-ms", type=float, default=env("TANDEM_SLO_TPOT_MS", "0"),
                    help="default TPOT objective for requests that set none (0: none)")


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    fields = CoordinatorConfig.__dataclass_fields__
    return CoordinatorConfig(**{k: v for k, v in vars(args).items() if k in fields}).finish()


async def run_coordinator(cfg: CoordinatorConfig) -> None:
    logger.info("starting coordinator: %s", " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    signals = StopSignals()
    keys = ApiKeys(cfg.api_keys_file)  # before anything starts: a bad file is a clear error
    use_etcd_tls(cfg.etcd_cert, cfg.etcd_key, cfg.etcd_ca)
    metrics.bind(cfg.served_model_name)
    codec = TextCodec(cfg.model)
    # after a certificate rotation the old channels to the nodes close once no call on them can be left
    router = Router(cfg.served_model_name, pool_wait_s=cfg.pool_wait_s, probe_timeout_s=cfg.probe_timeout_s,
                    tls=cfg.tls, retire_channels_after_s=max(cfg.decode_timeout_s, cfg.prefill_timeout_s) + 60,
                    node_calls=cfg.node_calls, pace=cfg.pace)
    view = MembershipView(cfg.etcd, cfg.cluster, on_change=router.on_membership)
    await view.start()

    def max_model_len() -> int:
        return min([cfg.max_model_len] + [n.record.max_model_len for n in router.nodes()])

    admission = Admission(router, cfg.admission,
                          Slo.from_ms(cfg.slo_ttft_ms or None, cfg.slo_tpot_ms or None, "--slo-"),
                          local=cfg.conditional_disagg == "on", headroom=cfg.admission_headroom,
                          order=PrefillOrder(router, cfg.prefill_order, cfg.prefill_depth), routing=cfg.routing,
                          protect=cfg.protect_streams == "on", kv_room=cfg.kv_room == "on",
                          candidates=cfg.admission_candidates, trial_s=cfg.admission_trial_s,
                          overload_margin=cfg.admission_overload_margin, colocate=cfg.colocate)
    pipeline = Pipeline(router, codec, max_model_len, cfg.served_model_name, PipelineConfig(
        prefill_timeout_s=cfg.prefill_timeout_s, decode_timeout_s=cfg.decode_timeout_s, stall_s=cfg.stall_s,
        migration_limit=cfg.migration_limit, stream_interval=cfg.stream_interval), admission,
        Quotas(parse_quotas(cfg.tenant_quota), cfg.default_tenant_quota, cfg.quota_burst_s),
        BatchQueue(admission, cfg.batch_queue, cfg.batch_max_wait_s))

    grpc_server = await start_grpc(
        cfg.host, cfg.grpc_port, SERVICE_NAME,
        lambda server: pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(pipeline, cfg.cluster, keys), server),
        tls=cfg.tls)

    http = OpenAIHttp(pipeline, keys)
    runner = web.AppRunner(http.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    ssl_ctx = cfg.tls.server_ssl_context() if cfg.tls.on else None
    loop = asyncio.get_running_loop()
    reloading = [loop.create_task(cfg.tls.keep_reloading(ssl_ctx))] if ssl_ctx else []
    if cfg.tls.dials_tls:  # and the certificate it shows the nodes
        reloading.append(loop.create_task(router.keep_certificate_fresh()))
    # a worker of several (--workers): the port is shared with its siblings
    site = web.TCPSite(runner, cfg.host, cfg.http_port, ssl_context=ssl_ctx, reuse_port=worker_index() is not None)
    await site.start()
    http_port = runner.addresses[0][1]
    scheme = "https" if ssl_ctx else "http"
    print(f"TANDEM_READY role=coordinator grpc={cfg.host}:{grpc_server.port} http={scheme}://{cfg.host}:{http_port}",
          flush=True)
    try:
        await signals.first.wait()
        logger.info("shutting down coordinator")
    finally:
        for task in reloading:
            task.cancel()
        await grpc_server.stop()
        await runner.cleanup()
        await view.close()
        await router.close()
