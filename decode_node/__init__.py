"""The decode node: hosts vLLM as a KV consumer and serves DecodeNode over gRPC."""
