"""The node runtime shared by prefill and decode daemons: the vLLM engine host, the
daemon's life (serve, register, drain, exit), its flags, and the KV handle's edges."""
