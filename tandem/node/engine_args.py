"""vLLM's own engine arguments on a node's command line.

`tandem prefill|decode` takes every flag of vLLM's ``AsyncEngineArgs.add_cli_args``
beside its own, so an operator's vLLM flags (``--gpu-memory-utilization``,
``--tensor-parallel-size``, ``--quantization``, ``--compilation-config.mode 3``,
``-O3``, ...) work on a node, in vLLM's own syntax. Tandem's parser takes its own
flags first, so where a name is Tandem's too (``--model``, ``--dtype``,
``--max-model-len``, ...) Tandem's flag wins; another spelling of one of them that
would reach vLLM (``--max_model_len``) is refused, naming Tandem's flag, and so are
the arguments Tandem must own. vLLM's flags have no TANDEM_* variables. Only flags
given on the command line are passed on (``--no-enforce-eager`` too), and vLLM is
imported only when a node has some.
"""

from __future__ import annotations

import argparse
from typing import Any

# AsyncEngineArgs fields Tandem sets itself, and what to use instead of each.
OWNED = {
    "kv_transfer_config": "Tandem's connector moves the KV cache between the pools (--kv-transport, --kv-lease-s)",
    "kv_events_config": "the node follows its engine's KV events itself (--engine-kv-events)",
    "kv_cache_memory_bytes": "use --kv-cache-gib (and --decode-kv-cache-gib)",
    "shutdown_timeout": "use --drain-grace-s",
    "served_model_name": "use --served-model-name (Tandem's: the coordinator routes by it)",
    "model": "use --model", "dtype": "use --dtype", "max_model_len": "use --max-model-len",
    "block_size": "use --block-size", "max_num_seqs": "use --max-num-seqs",
    "max_num_batched_tokens": "use --max-num-batched-tokens", "scheduling_policy": "use --scheduling-policy",
}
_UNSET = object()


def parse_engine_args(extra: list[str]) -> dict[str, Any]:
    """{AsyncEngineArgs field: value} for the vLLM flags in ``extra`` (what Tandem's parser left);
    ValueError naming an argument that is neither Tandem's nor vLLM's, or one Tandem owns."""
    if not extra:
        return {}
    for token in extra:  # by name first: vLLM would validate (and refuse) some values before us
        if token.startswith("--"):
            field = token[2:].split("=", 1)[0].split(".", 1)[0].replace("-", "_")
            if field in OWNED:
                raise _owned(field)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise ValueError(f"vLLM engine argument: {message} (neither Tandem's nor vLLM's engine flags)"
                             if message.startswith("unrecognized") else f"vLLM engine argument: {message}")

    parser = AsyncEngineArgs.add_cli_args(Parser(prog="vLLM engine arguments", add_help=False, allow_abbrev=False))
    # Given or not is known by a default nothing can equal (--no-enforce-eager equals vLLM's default).
    parser.set_defaults(**{a.dest: _UNSET for a in parser._actions if a.dest != argparse.SUPPRESS})
    given = {k: v for k, v in vars(parser.parse_args(extra)).items() if v is not _UNSET}
    for field in given:  # what reached a field by another spelling (an alias, a short option)
        if field in OWNED:
            raise _owned(field)
    return given


def _owned(field: str) -> ValueError:
    return ValueError(f"vLLM's --{field.replace('_', '-')} is Tandem's to set on a node: {OWNED[field]}")
