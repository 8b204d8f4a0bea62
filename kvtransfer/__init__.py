"""KV transfer: Tandem's vLLM KV connector and the block transport beneath it.

- ``connector``: ``TandemConnector``, the vLLM v1 connector (one class, two
  roles), loaded by vLLM through ``kv_connector_module_path``.
- ``scheduler_side`` / ``worker_side``: the two halves; they share no objects,
  only the per-step ``TandemConnectorMetadata``.
- ``server`` (prefill worker) and ``client`` (decode worker): the control
  channel and the data plane (UCX through ucxx, or plain TCP) that move blocks.
- ``layout``: the KV layout both ends check at handshake.

This package knows nothing of the coordinator or the node daemons.
"""
