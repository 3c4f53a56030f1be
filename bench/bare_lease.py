"""A bare grpc.aio server of Queen.Lease and Queen.ReleaseLease: a counter and a dict, nothing
else. The floor any Python lease server pays on this machine, measured beside the queen by
bench/lease.py."""

from __future__ import annotations

import argparse
import asyncio
import itertools

import grpc

from apiary.serving import Context, stop_event_on_signals, write_port_file
from protos.v1 import queen_pb2, queen_pb2_grpc


class BareLeases(queen_pb2_grpc.QueenServicer):
    """Lease and ReleaseLease only (the others answer UNIMPLEMENTED)."""

    Infer = queen_pb2_grpc.QueenServicer.Infer
    ListModels = queen_pb2_grpc.QueenServicer.ListModels
    Embed = queen_pb2_grpc.QueenServicer.Embed

    def __init__(self, address: str) -> None:
        self.address = address
        self.numbers = itertools.count()
        self.active: dict[str, int] = {}

    async def Lease(
        self, request: queen_pb2.LeaseRequest, context: Context
    ) -> queen_pb2.LeaseResponse:
        # About as long as the queen's: an id, an expiry and a signature.
        lease_id = f"l-{next(self.numbers):022d}.1700000000000.{'s' * 22}"
        self.active[lease_id] = 1
        return queen_pb2.LeaseResponse(
            lease_id=lease_id, worker_id="w-000000000000", address=self.address,
            ttl_seconds=request.ttl_seconds,
        )  # fmt: skip

    async def ReleaseLease(
        self, request: queen_pb2.ReleaseLeaseRequest, context: Context
    ) -> queen_pb2.ReleaseLeaseResponse:
        if self.active.pop(request.lease_id, None) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such lease")
        return queen_pb2.ReleaseLeaseResponse()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--port-file", required=True)
    args = p.parse_args()
    stop = stop_event_on_signals()
    server = grpc.aio.server()
    queen_pb2_grpc.add_QueenServicer_to_server(BareLeases("127.0.0.1:1"), server)
    port = server.add_insecure_port(args.listen)
    await server.start()
    write_port_file(args.port_file, port)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
