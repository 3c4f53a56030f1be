"""The QueenRegistry service: hives heartbeat their worker tables into the registry."""

from __future__ import annotations

import grpc
import structlog

from apiary.serving import Context
from apiary.validation import name_problem
from protos.v1 import queen_pb2, queen_pb2_grpc
from queen.router import Cluster

log = structlog.get_logger("queen.heartbeats")


def certificate_names(context: Context) -> set[str]:
    """DNS names and the common name of the peer's TLS client certificate (empty without one)."""
    auth = context.auth_context() or {}
    names = {
        value.decode(errors="replace") for value in auth.get("x509_subject_alternative_name", [])
    }
    names |= {value.decode(errors="replace") for value in auth.get("x509_common_name", [])}
    return names


class QueenRegistryService(queen_pb2_grpc.QueenRegistryServicer):
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.registry = cluster.registry

    async def Heartbeat(
        self, request: queen_pb2.HiveHeartbeat, context: Context
    ) -> queen_pb2.HeartbeatReply:
        problem = name_problem("hive_id", request.hive_id)
        if not problem and not request.leaving and not request.address:
            problem = "address is required: the queen dials it to reach the hive"
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        for record in request.workers:
            problem = name_problem("worker id", record.id) or name_problem("model", record.model)
            if not problem and record.hive_id and record.hive_id != request.hive_id:
                problem = (
                    f"worker {record.id} says it belongs to hive {record.hive_id!r}, "
                    f"not {request.hive_id!r}"
                )
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.c.hive_identity_from_cert:
            names = certificate_names(context)
            if request.hive_id not in names:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"hive id {request.hive_id!r} is not a name in this hive's client certificate "
                    f"({', '.join(sorted(names)) or 'no certificate'}); give each hive a "
                    "certificate for its id (apiary certs init --host ID=ADDRESS)",
                )
        self.c.metrics.heartbeats.inc()
        for address in self.registry.apply_heartbeat(request):
            self.c.channels.discard(address)
        self.c.scheduler.dispatch_all()
        return queen_pb2.HeartbeatReply(interval_seconds=self.registry.interval)
