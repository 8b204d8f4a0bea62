"""KV handle conversions between vLLM kv_transfer_params and the KVHandle proto."""

from __future__ import annotations

from typing import Any

from tandem.kvtransfer.handle import CONSUME, TransferHandle
from tandem.proto import tandem_pb2 as pb


def handle_to_proto(h: TransferHandle) -> pb.KVHandle:
    return pb.KVHandle(engine_id=h.engine_id, address=h.address, remote_request_id=h.remote_request_id,
                       block_ids=h.block_ids, num_tokens=h.num_tokens, lease_deadline=h.lease_deadline)


def handle_from_proto(m: pb.KVHandle) -> TransferHandle:
    return TransferHandle(engine_id=m.engine_id, address=m.address, remote_request_id=m.remote_request_id,
                          block_ids=list(m.block_ids), num_tokens=m.num_tokens, lease_deadline=m.lease_deadline)


def consume_params(m: pb.KVHandle) -> dict[str, Any]:
    return handle_from_proto(m).to_params(CONSUME)
