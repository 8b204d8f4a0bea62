"""KV handle conversions between vLLM kv_transfer_params and the KVHandle proto, and the
check a decode node makes before a handle gets anywhere near its engine."""

from __future__ import annotations

import time
from typing import Any

from tandem.errors import InvalidRequest, KVUnavailable
from tandem.kvtransfer.handle import CONSUME, TransferHandle
from tandem.kvtransfer.wire import parse_address
from tandem.proto import tandem_pb2 as pb

MAX_REQUEST_ID_CHARS = 256


def handle_to_proto(h: TransferHandle) -> pb.KVHandle:
    return pb.KVHandle(engine_id=h.engine_id, address=h.address, remote_request_id=h.remote_request_id,
                       block_ids=h.block_ids, num_tokens=h.num_tokens, lease_deadline=h.lease_deadline,
                       capability=h.capability)


def handle_from_proto(m: pb.KVHandle) -> TransferHandle:
    return TransferHandle(engine_id=m.engine_id, address=m.address, remote_request_id=m.remote_request_id,
                          block_ids=list(m.block_ids), num_tokens=m.num_tokens, lease_deadline=m.lease_deadline,
                          capability=m.capability)


def consume_params(m: pb.KVHandle) -> dict[str, Any]:
    return handle_from_proto(m).to_params(CONSUME)


def check_for_decode(m: pb.KVHandle, prompt_len: int, block_size: int) -> None:
    """Reject a handle that cannot describe this request's KV, before the engine sees it.

    ``prompt_len`` counts the first token too (the handle covers the tokens before it).
    Malformed handles are INVALID_ARGUMENT; a lease already over is KVUnavailable (the
    blocks are gone, but a fresh prefill would do)."""
    if not m.engine_id or not m.remote_request_id or len(m.remote_request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("KV handle: engine_id and remote_request_id must be set "
                             f"(remote_request_id at most {MAX_REQUEST_ID_CHARS} characters)")
    try:
        parse_address(m.address)
    except ValueError as exc:
        raise InvalidRequest(f"KV handle: {exc}") from None
    if m.num_tokens != prompt_len - 1:
        raise InvalidRequest(f"KV handle covers {m.num_tokens} tokens; expected the prompt's {prompt_len - 1} "
                             "(the prompt here includes the first token)")
    need = -(-m.num_tokens // block_size)
    if len(m.block_ids) != need:
        raise InvalidRequest(f"KV handle names {len(m.block_ids)} blocks; {m.num_tokens} tokens in blocks of "
                             f"{block_size} need {need}")
    # Whether they are the blocks held for that request, only their holder can tell (it refuses others).
    if any(b < 0 for b in m.block_ids) or len(set(m.block_ids)) != len(m.block_ids):
        raise InvalidRequest("KV handle: block ids must be distinct and non-negative")
    if m.lease_deadline <= time.time():
        raise KVUnavailable(f"KV handle: the lease on {m.engine_id}'s blocks ran out "
                            f"{time.time() - m.lease_deadline:.1f} s ago")
