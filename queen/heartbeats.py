"""The QueenRegistry service: hives heartbeat their worker tables into the registry."""

from __future__ import annotations

import grpc
import structlog

from apiary.serving import Context
from apiary.validation import name_problem
from protos.v1 import queen_pb2, queen_pb2_grpc
from queen.cluster import Cluster

log = structlog.get_logger("queen.heartbeats")


def certificate_names(context: Context) -> set[str]:
    """DNS names and the common name of the peer's TLS client certificate (empty without one)."""
    auth = context.auth_context() or {}
    names = {
        value.decode(errors="replace") for value in auth.get("x509_subject_alternative_name", [])
    }
    names |= {value.decode(errors="replace") for value in auth.get("x509_common_name", [])}
    return names


def heartbeat_problem(beat: queen_pb2.HiveHeartbeat) -> str | None:
    """What is wrong with a heartbeat's fields, the first thing found (None: nothing)."""
    problem = name_problem("hive_id", beat.hive_id)
    if not problem and not beat.leaving and not beat.address:
        problem = "address is required: the queen dials it to reach the hive"
    if problem:
        return problem
    for record in beat.workers:
        problem = name_problem("worker id", record.id) or name_problem("model", record.model)
        if not problem and record.hive_id and record.hive_id != beat.hive_id:
            problem = (
                f"worker {record.id} says it belongs to hive {record.hive_id!r}, "
                f"not {beat.hive_id!r}"
            )
        if problem:
            return problem
    return None


class QueenRegistryService(queen_pb2_grpc.QueenRegistryServicer):
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def Heartbeat(
        self, request: queen_pb2.HiveHeartbeat, context: Context
    ) -> queen_pb2.HeartbeatReply:
        problem = heartbeat_problem(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.cluster.hive_identity_from_cert:
            names = certificate_names(context)
            if request.hive_id not in names:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"hive id {request.hive_id!r} is not a name in this hive's client certificate "
                    f"({', '.join(sorted(names)) or 'no certificate'}); give each hive a "
                    "certificate for its id (apiary certs init --host ID=ADDRESS)",
                )
        self.cluster.metrics.heartbeats.inc()
        self.cluster.apply_heartbeat(request)
        return queen_pb2.HeartbeatReply(interval_seconds=self.cluster.registry.interval)
