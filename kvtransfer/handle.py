"""The transfer handle: what a prefill engine hands out so a decode engine can pull a request's KV.

It travels as vLLM ``kv_transfer_params`` (a plain dict): the prefill request
asks for ``{"tandem": "produce"}``; the prefill engine's output carries
``{"tandem": "handle", ...}``; the decode request passes the same fields with
``{"tandem": "consume", ...}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PRODUCE = "produce"
HANDLE = "handle"
CONSUME = "consume"
# Set (true) in a request's kv_transfer_params: the node's KV store neither loads nor saves it
# (the startup profile's random prompts).
NO_STORE = "tandem_no_store"


@dataclass(frozen=True)
class TransferHandle:
    engine_id: str
    address: str
    remote_request_id: str
    block_ids: list[int]
    num_tokens: int
    lease_deadline: float  # unix seconds
    capability: str = ""  # capability.sign's HMAC; empty where the cluster has no KV secret

    def to_params(self, kind: str) -> dict[str, Any]:
        return {"tandem": kind, **asdict(self)}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TransferHandle:
        try:
            return cls(
                engine_id=str(params["engine_id"]),
                address=str(params["address"]),
                remote_request_id=str(params["remote_request_id"]),
                block_ids=[int(b) for b in params["block_ids"]],
                num_tokens=int(params["num_tokens"]),
                lease_deadline=float(params["lease_deadline"]),
                capability=str(params.get("capability") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed KV transfer handle: {exc}") from exc
