"""vLLM's own engine arguments on a node's command line.

`tandem prefill|decode` takes every flag of vLLM's ``AsyncEngineArgs.add_cli_args``
beside its own, so an operator's vLLM flags (``--gpu-memory-utilization``,
``--tensor-parallel-size``, ``--quantization``, ...) work on a node. Where a name is
Tandem's too (``--model``, ``--dtype``, ``--max-model-len``, ``--block-size``,
``--max-num-seqs``, ...) Tandem's parser takes it first, so Tandem's flag wins.
Arguments Tandem must own are refused with the flag to use instead. vLLM's flags
have no TANDEM_* variables. Only flags given on the command line are passed on,
and vLLM is imported only when a node has some.
"""

from __future__ import annotations

from typing import Any

# AsyncEngineArgs fields Tandem sets itself, and what to use instead of each.
OWNED = {
    "kv_transfer_config": "Tandem's connector moves the KV cache between the pools (--kv-transport, --kv-lease-s)",
    "kv_events_config": "the node follows its engine's KV events itself (--engine-kv-events)",
    "kv_cache_memory_bytes": "use --kv-cache-gib (and --decode-kv-cache-gib)",
    "shutdown_timeout": "use --drain-grace-s",
    "served_model_name": "use --served-model-name (Tandem's: the coordinator routes by it)",
}


def parse_engine_args(extra: list[str]) -> dict[str, Any]:
    """{AsyncEngineArgs field: value} for the vLLM flags in ``extra`` (what Tandem's parser left);
    ValueError naming an argument that is neither Tandem's nor vLLM's, or one Tandem owns."""
    if not extra:
        return {}
    for token in extra:  # before vLLM parses (and validates) them
        if token.startswith("--"):
            field = token[2:].split("=", 1)[0].split(".", 1)[0].replace("-", "_")
            if field in OWNED:
                raise ValueError(f"--{field.replace('_', '-')} is Tandem's to set on a node: {OWNED[field]}")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise ValueError(f"vLLM engine argument: {message}")

    parser = AsyncEngineArgs.add_cli_args(Parser(prog="vLLM engine arguments", add_help=False))
    ns, unknown = parser.parse_known_args(extra)
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)} (neither Tandem's nor vLLM's engine flags)")
    defaults = vars(parser.parse_known_args([])[0])
    return {k: v for k, v in vars(ns).items() if v != defaults.get(k)}
