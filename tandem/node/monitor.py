"""NodeMonitor: a node pushes its load and fitted performance model to each coordinator.

One stream per coordinator (``Watch``): a message at once, then one whenever
work starts or ends here (at most every ``MIN_GAP_S``, so a burst costs one
message), and a heartbeat every ``HEARTBEAT_S`` that carries the drift in
between (context tokens growing, newly fitted coefficients). The coordinator
predicts each request's TTFT and TPOT from it (coordinator/admission.py).
"""

from __future__ import annotations

import asyncio

import grpc

from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc

from .perf import NodePerf

MIN_GAP_S = 0.02
HEARTBEAT_S = 1.0


class NodeMonitorServicer(pb_grpc.NodeMonitorServicer):
    def __init__(self, perf: NodePerf, node_id: str, engine_id: str) -> None:
        self.perf = perf
        self.node_id = node_id
        self.engine_id = engine_id

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        while True:
            changed = self.perf.changed()
            await context.write(self.perf.load(self.node_id, self.engine_id))
            try:
                await asyncio.wait_for(changed.wait(), HEARTBEAT_S)
            except TimeoutError:
                continue
            await asyncio.sleep(MIN_GAP_S)


def add_servicer(server: grpc.aio.Server, perf: NodePerf, node_id: str, engine_id: str) -> None:
    pb_grpc.add_NodeMonitorServicer_to_server(NodeMonitorServicer(perf, node_id, engine_id), server)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NodeMonitor"].full_name
