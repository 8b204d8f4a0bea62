"""Fixtures shared by the end-to-end modules; each module defines its own ``cluster``."""

from __future__ import annotations

import pytest

from tandem.proto import tandem_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(cluster):
    """A Coordinator stub on the module's cluster."""
    ch = cluster.channel(cluster.grpc_address)
    yield pb_grpc.CoordinatorStub(ch)
    ch.close()
