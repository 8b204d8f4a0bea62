from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "min_tokens")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    min_tokens: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., min_tokens: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "sampling", "model", "slo", "priority", "tenant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: TokenIds
    sampling: SamplingParams
    model: str
    slo: Slo
    priority: str
    tenant: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., model: _Optional[str] = ..., slo: _Optional[_Union[Slo, _Mapping]] = ..., priority: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class Slo(_message.Message):
    __slots__ = ("ttft_ms", "tpot_ms")
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    ttft_ms: float
    tpot_ms: float
    def __init__(self, ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("ttft_s", "e2e_s", "prefill_s", "decode_s", "prefill_node", "decode_node", "predicted_ttft_s", "predicted_tpot_s", "local_prefill", "dispatch_s", "prefill_call_s", "colocated")
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    E2E_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NODE_FIELD_NUMBER: _ClassVar[int]
    DECODE_NODE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TPOT_S_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CALL_S_FIELD_NUMBER: _ClassVar[int]
    COLOCATED_FIELD_NUMBER: _ClassVar[int]
    ttft_s: float
    e2e_s: float
    prefill_s: float
    decode_s: float
    prefill_node: str
    decode_node: str
    predicted_ttft_s: float
    predicted_tpot_s: float
    local_prefill: bool
    dispatch_s: float
    prefill_call_s: float
    colocated: bool
    def __init__(self, ttft_s: _Optional[float] = ..., e2e_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., prefill_node: _Optional[str] = ..., decode_node: _Optional[str] = ..., predicted_ttft_s: _Optional[float] = ..., predicted_tpot_s: _Optional[float] = ..., local_prefill: _Optional[bool] = ..., dispatch_s: _Optional[float] = ..., prefill_call_s: _Optional[float] = ..., colocated: _Optional[bool] = ...) -> None: ...

class Finish(_message.Message):
    __slots__ = ("reason", "usage", "timings", "stop_reason", "migrations")
    REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    usage: Usage
    timings: Timings
    stop_reason: str
    migrations: int
    def __init__(self, reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., stop_reason: _Optional[str] = ..., migrations: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish: Finish
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish: _Optional[_Union[Finish, _Mapping]] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "role", "grpc_address", "kv_address", "model", "outstanding", "served", "draining", "down", "prefill_queue", "decode_batch", "perf_samples", "load_age_s", "kv_chunks_ram", "kv_chunks_disk", "kv_engine_blocks", "fits", "speeds")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    PREFILL_QUEUE_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCH_FIELD_NUMBER: _ClassVar[int]
    PERF_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOAD_AGE_S_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNKS_RAM_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNKS_DISK_FIELD_NUMBER: _ClassVar[int]
    KV_ENGINE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    SPEEDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    grpc_address: str
    kv_address: str
    model: str
    outstanding: int
    served: int
    draining: bool
    down: bool
    prefill_queue: int
    decode_batch: int
    perf_samples: int
    load_age_s: float
    kv_chunks_ram: int
    kv_chunks_disk: int
    kv_engine_blocks: int
    fits: _containers.RepeatedCompositeFieldContainer[PerfFit]
    speeds: _containers.RepeatedCompositeFieldContainer[PerfFit]
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., grpc_address: _Optional[str] = ..., kv_address: _Optional[str] = ..., model: _Optional[str] = ..., outstanding: _Optional[int] = ..., served: _Optional[int] = ..., draining: _Optional[bool] = ..., down: _Optional[bool] = ..., prefill_queue: _Optional[int] = ..., decode_batch: _Optional[int] = ..., perf_samples: _Optional[int] = ..., load_age_s: _Optional[float] = ..., kv_chunks_ram: _Optional[int] = ..., kv_chunks_disk: _Optional[int] = ..., kv_engine_blocks: _Optional[int] = ..., fits: _Optional[_Iterable[_Union[PerfFit, _Mapping]]] = ..., speeds: _Optional[_Iterable[_Union[PerfFit, _Mapping]]] = ...) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("cluster", "model", "nodes")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    model: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, cluster: _Optional[str] = ..., model: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetCacheRequest(_message.Message):
    __slots__ = ("store_ram",)
    STORE_RAM_FIELD_NUMBER: _ClassVar[int]
    store_ram: bool
    def __init__(self, store_ram: _Optional[bool] = ...) -> None: ...

class ResetCacheResponse(_message.Message):
    __slots__ = ("reset", "detail")
    RESET_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    detail: str
    def __init__(self, reset: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class PerfFit(_message.Message):
    __slots__ = ("name", "terms", "coefficients", "samples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    terms: _containers.RepeatedScalarFieldContainer[str]
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    samples: int
    def __init__(self, name: _Optional[str] = ..., terms: _Optional[_Iterable[str]] = ..., coefficients: _Optional[_Iterable[float]] = ..., samples: _Optional[int] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("node_id", "engine_id", "prefill_queue", "decode_batch", "decode_context", "decode_waiting", "fits", "sent_at", "step_tokens", "prefill_busy", "decode_batch_mean", "decode_context_mean", "kv_whole", "kv_ram", "kv_disk", "kv_gone", "kv_namespace", "kv_chunk_tokens", "eng_whole", "eng_held", "eng_gone", "eng_namespace", "eng_block_tokens", "kv_tokens", "kv_free_tokens", "engine_waiting", "speeds", "paces")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_QUEUE_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCH_FIELD_NUMBER: _ClassVar[int]
    DECODE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DECODE_WAITING_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BUSY_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCH_MEAN_FIELD_NUMBER: _ClassVar[int]
    DECODE_CONTEXT_MEAN_FIELD_NUMBER: _ClassVar[int]
    KV_WHOLE_FIELD_NUMBER: _ClassVar[int]
    KV_RAM_FIELD_NUMBER: _ClassVar[int]
    KV_DISK_FIELD_NUMBER: _ClassVar[int]
    KV_GONE_FIELD_NUMBER: _ClassVar[int]
    KV_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENG_WHOLE_FIELD_NUMBER: _ClassVar[int]
    ENG_HELD_FIELD_NUMBER: _ClassVar[int]
    ENG_GONE_FIELD_NUMBER: _ClassVar[int]
    ENG_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ENG_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_WAITING_FIELD_NUMBER: _ClassVar[int]
    SPEEDS_FIELD_NUMBER: _ClassVar[int]
    PACES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    engine_id: str
    prefill_queue: _containers.RepeatedScalarFieldContainer[int]
    decode_batch: int
    decode_context: int
    decode_waiting: int
    fits: _containers.RepeatedCompositeFieldContainer[PerfFit]
    sent_at: float
    step_tokens: int
    prefill_busy: float
    decode_batch_mean: float
    decode_context_mean: float
    kv_whole: bool
    kv_ram: _containers.RepeatedScalarFieldContainer[bytes]
    kv_disk: _containers.RepeatedScalarFieldContainer[bytes]
    kv_gone: _containers.RepeatedScalarFieldContainer[bytes]
    kv_namespace: bytes
    kv_chunk_tokens: int
    eng_whole: bool
    eng_held: _containers.RepeatedScalarFieldContainer[bytes]
    eng_gone: _containers.RepeatedScalarFieldContainer[bytes]
    eng_namespace: bytes
    eng_block_tokens: int
    kv_tokens: int
    kv_free_tokens: int
    engine_waiting: int
    speeds: _containers.RepeatedCompositeFieldContainer[PerfFit]
    paces: _containers.RepeatedCompositeFieldContainer[PerfFit]
    def __init__(self, node_id: _Optional[str] = ..., engine_id: _Optional[str] = ..., prefill_queue: _Optional[_Iterable[int]] = ..., decode_batch: _Optional[int] = ..., decode_context: _Optional[int] = ..., decode_waiting: _Optional[int] = ..., fits: _Optional[_Iterable[_Union[PerfFit, _Mapping]]] = ..., sent_at: _Optional[float] = ..., step_tokens: _Optional[int] = ..., prefill_busy: _Optional[float] = ..., decode_batch_mean: _Optional[float] = ..., decode_context_mean: _Optional[float] = ..., kv_whole: _Optional[bool] = ..., kv_ram: _Optional[_Iterable[bytes]] = ..., kv_disk: _Optional[_Iterable[bytes]] = ..., kv_gone: _Optional[_Iterable[bytes]] = ..., kv_namespace: _Optional[bytes] = ..., kv_chunk_tokens: _Optional[int] = ..., eng_whole: _Optional[bool] = ..., eng_held: _Optional[_Iterable[bytes]] = ..., eng_gone: _Optional[_Iterable[bytes]] = ..., eng_namespace: _Optional[bytes] = ..., eng_block_tokens: _Optional[int] = ..., kv_tokens: _Optional[int] = ..., kv_free_tokens: _Optional[int] = ..., engine_waiting: _Optional[int] = ..., speeds: _Optional[_Iterable[_Union[PerfFit, _Mapping]]] = ..., paces: _Optional[_Iterable[_Union[PerfFit, _Mapping]]] = ...) -> None: ...

class NodeCall(_message.Message):
    __slots__ = ("call_id", "prefill", "decode", "cancel")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    prefill: PrefillRequest
    decode: DecodeRequest
    cancel: bool
    def __init__(self, call_id: _Optional[int] = ..., prefill: _Optional[_Union[PrefillRequest, _Mapping]] = ..., decode: _Optional[_Union[DecodeRequest, _Mapping]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class NodeCallBatch(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[NodeCall]
    def __init__(self, calls: _Optional[_Iterable[_Union[NodeCall, _Mapping]]] = ...) -> None: ...

class CallError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class NodeReply(_message.Message):
    __slots__ = ("call_id", "prefill", "decode", "error", "done")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    prefill: PrefillResponse
    decode: DecodeResponse
    error: CallError
    done: bool
    def __init__(self, call_id: _Optional[int] = ..., prefill: _Optional[_Union[PrefillResponse, _Mapping]] = ..., decode: _Optional[_Union[DecodeResponse, _Mapping]] = ..., error: _Optional[_Union[CallError, _Mapping]] = ..., done: _Optional[bool] = ...) -> None: ...

class NodeReplyBatch(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[NodeReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[NodeReply, _Mapping]]] = ...) -> None: ...

class KVHandle(_message.Message):
    __slots__ = ("engine_id", "address", "remote_request_id", "block_ids", "num_tokens", "lease_deadline", "capability")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    address: str
    remote_request_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    lease_deadline: float
    capability: str
    def __init__(self, engine_id: _Optional[str] = ..., address: _Optional[str] = ..., remote_request_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., lease_deadline: _Optional[float] = ..., capability: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "hold_kv", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    HOLD_KV_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    hold_kv: bool
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., hold_kv: _Optional[bool] = ..., priority: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token", "finish_reason", "handle", "num_cached_tokens", "prefill_s")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    finish_reason: str
    handle: KVHandle
    num_cached_tokens: int
    prefill_s: float
    def __init__(self, first_token: _Optional[int] = ..., finish_reason: _Optional[str] = ..., handle: _Optional[_Union[KVHandle, _Mapping]] = ..., num_cached_tokens: _Optional[int] = ..., prefill_s: _Optional[float] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "handle")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    handle: KVHandle
    def __init__(self, request_id: _Optional[str] = ..., handle: _Optional[_Union[KVHandle, _Mapping]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "handle", "prefill_here", "stream_interval")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_HERE_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    handle: KVHandle
    prefill_here: bool
    stream_interval: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., handle: _Optional[_Union[KVHandle, _Mapping]] = ..., prefill_here: _Optional[bool] = ..., stream_interval: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "stop_reason")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    stop_reason: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., stop_reason: _Optional[str] = ...) -> None: ...
