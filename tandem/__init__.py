"""Tandem: disaggregated prefill/decode LLM serving on vLLM, UCX and etcd.

This package is the small shared layer (CLI, config helpers, membership,
logging, metrics, the engine host both node kinds use); the components live
in tandem.coordinator, tandem.prefill_node, tandem.decode_node,
tandem.kvtransfer and tandem.kvstore.
"""

__version__ = "0.1.0"
