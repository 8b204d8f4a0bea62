"""The coordinator: Tandem's front door (gRPC and OpenAI HTTP), membership view, routing.

It never loads an engine (no vllm or torch import) and talks to nodes over gRPC only.
"""
