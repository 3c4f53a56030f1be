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
from protos.v1 import common_pb2, worker_pb2_grpc


class Relay:
    def __init__(self, workers: list[str]) -> None:
        self.stubs = [worker_pb2_grpc.WorkerStub(grpc.aio.insecure_channel(a)) for a in workers]
        self.next = itertools.cycle(self.stubs)

    async def infer(
        self, request: common_pb2.InferRequest, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        async for chunk in next(self.next).Infer(request):
            yield chunk

    def handler(self) -> grpc.GenericRpcHandler[common_pb2.InferRequest, common_pb2.InferChunk]:
        """apiary.v1.Queen/Infer only, so clients use the same stub for relay and queen."""
        return grpc.method_handlers_generic_handler(
            "apiary.v1.Queen",
            {
                "Infer": grpc.unary_stream_rpc_method_handler(
                    self.infer,
                    request_deserializer=common_pb2.InferRequest.FromString,
                    response_serializer=common_pb2.InferChunk.SerializeToString,
                )
            },
        )


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--port-file", required=True)
    p.add_argument("--workers", required=True, help="comma-separated worker addresses")
    args = p.parse_args()
    stop = stop_event_on_signals()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Relay(args.workers.split(",")).handler(),))
    port = server.add_insecure_port(args.listen)
    await server.start()
    write_port_file(args.port_file, port)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
