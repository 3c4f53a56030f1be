"""A bare grpc.aio relay: forwards Infer streams round-robin to fixed workers.

No registry, no slots, no queue: the floor any Python router pays on this
machine, measured beside the queen by bench/route.py.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc

from apiary.serving import Context, stop_event_on_signals, write_port_file
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc, worker_pb2_grpc


class Relay(queen_pb2_grpc.QueenServicer):
    def __init__(self, workers: list[str]) -> None:
        self.stubs = [worker_pb2_grpc.WorkerStub(grpc.aio.insecure_channel(a)) for a in workers]
        self.next = itertools.cycle(self.stubs)

    async def Infer(
        self, request: common_pb2.InferRequest, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        async for chunk in next(self.next).Infer(request):
            yield chunk

    async def ListModels(
        self, request: queen_pb2.ListModelsRequest, context: Context
    ) -> queen_pb2.ListModelsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the bench relay only relays Infer")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--port-file", required=True)
    p.add_argument("--workers", required=True, help="comma-separated worker addresses")
    args = p.parse_args()
    stop = stop_event_on_signals()
    server = grpc.aio.server()
    queen_pb2_grpc.add_QueenServicer_to_server(Relay(args.workers.split(",")), server)
    port = server.add_insecure_port(args.listen)
    await server.start()
    write_port_file(args.port_file, port)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
