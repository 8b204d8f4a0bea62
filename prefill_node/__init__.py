"""The prefill node: hosts vLLM as a KV producer and serves PrefillNode over gRPC."""
